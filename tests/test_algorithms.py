"""D-SGD and gradient tracking against plain NumPy loops of their equations, plus the
shared battery: complete-graph reduction, exactness of tracking, compile-once,
optax chains, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip, topology

N, D, STEPS = 5, 4, 20


def _quadratics(n=N, d=D, seed=0):
    r = np.random.default_rng(seed)
    Q = r.normal(size=(n, d, d))
    A = np.einsum("nij,nkj->nik", Q, Q) / d + 0.5 * np.eye(d)
    b = 2.0 * r.normal(size=(n, d))
    return A.astype(np.float32), b.astype(np.float32)


def quad_loss(params, batch, key):
    """f_i(x; xi) = 0.5 x^T A_i x - (b_i + xi)^T x (one worker)."""
    A, b, xi = batch
    x = params["x"]
    return 0.5 * x @ A @ x - (b + xi) @ x


def _noises(steps=STEPS, n=N, d=D, seed=1, scale=0.3):
    return (scale * np.random.default_rng(seed).normal(size=(steps, n, d))).astype(
        np.float32
    )


def _np_grad(A, b, xi, x):
    return np.einsum("nij,nj->ni", A, x) - (b + xi)


def _run_jax(algo, x0, A, b, noise):
    state = algo.init({"x": jnp.asarray(x0)})
    step = jax.jit(algo.step)
    for t in range(noise.shape[0]):
        state, info = step(state, (A, b, noise[t]), jax.random.key(t))
    return state, info


@pytest.mark.parametrize("order", ["atc", "cta"])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_dsgd_matches_numpy_loop(order, momentum):
    A, b = _quadratics()
    W = topology.mixing_matrix(topology.ring(N))
    x0 = np.random.default_rng(2).normal(size=(N, D)).astype(np.float32)
    noise = _noises()
    lr = 0.05
    algo = jd.algorithms.dsgd(
        quad_loss, optax.sgd(lr, momentum=momentum), gossip.dense(W), order=order
    )
    state, _ = _run_jax(algo, x0, A, b, noise)

    x = x0.astype(np.float64)
    m = np.zeros_like(x)
    for t in range(STEPS):
        g = _np_grad(A, b, noise[t], x)
        if momentum is None:
            u = -lr * g
        else:
            m = g + momentum * m
            u = -lr * m
        x = W @ (x + u) if order == "atc" else W @ x + u
    np.testing.assert_allclose(state.params["x"], x, rtol=1e-5, atol=1e-5)
    assert int(state.count) == STEPS


@pytest.mark.parametrize("order", ["cta", "atc"])
def test_gradient_tracking_matches_numpy_loop(order):
    A, b = _quadratics(seed=3)
    W = topology.mixing_matrix(topology.ring(N))
    x0 = np.random.default_rng(4).normal(size=(N, D)).astype(np.float32)
    noise = _noises(seed=5)
    lr = 0.05
    algo = jd.algorithms.gradient_tracking(
        quad_loss, optax.sgd(lr), gossip.sparse(W), order=order
    )
    state, info = _run_jax(algo, x0, A, b, noise)

    # DIGing: y^0 = g(x^0); y^{t} = W y^{t-1} + g^t - g^{t-1}; x^{t+1} = W x^t - a y^t
    x = x0.astype(np.float64)
    y = np.zeros_like(x)
    g_prev = np.zeros_like(x)
    for t in range(STEPS):
        g = _np_grad(A, b, noise[t], x)
        if order == "cta":
            y = W @ y + g - g_prev
            x = W @ x - lr * y
        else:
            y = W @ (y + g - g_prev)
            x = W @ (x - lr * y)
        g_prev = g
    np.testing.assert_allclose(state.params["x"], x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.tracker["x"], y, rtol=1e-5, atol=1e-5)
    # tracking invariant: mean(y) == mean(g)
    np.testing.assert_allclose(
        state.tracker["x"].mean(0), state.prev_grad["x"].mean(0), atol=1e-5
    )


def lsq_loss(params, batch, key):
    """Mean squared error of a linear model on one worker's minibatch."""
    a, y = batch
    return jnp.mean((a @ params["w"] + params["c"] - y) ** 2)


def test_complete_graph_dsgd_equals_centralized_sgd():
    n, b, d = 6, 8, 3
    r = np.random.default_rng(0)
    w0 = {"w": jnp.asarray(r.normal(size=d), jnp.float32), "c": jnp.zeros(())}
    params = jd.tree.replicate(w0, n)
    lr = 0.1
    algo = jd.algorithms.dsgd(
        lsq_loss, optax.sgd(lr), gossip.dense(np.full((n, n), 1 / n))
    )
    state = algo.init(params)
    central = w0
    cgrad = jax.grad(lsq_loss)
    for t in range(10):
        a = jnp.asarray(r.normal(size=(n, b, d)), jnp.float32)
        y = jnp.asarray(r.normal(size=(n, b)), jnp.float32)
        state, _ = algo.step(state, (a, y), jax.random.key(t))
        g = cgrad(central, (a.reshape(n * b, d), y.reshape(n * b)), None)
        central = jax.tree.map(lambda p, gg: p - lr * gg, central, g)
    for k in ("w", "c"):
        for i in range(n):
            np.testing.assert_allclose(
                state.params[k][i], central[k], rtol=1e-5, atol=1e-6
            )


def test_tracking_is_exact_and_dsgd_is_biased_on_heterogeneous_quadratics():
    n, d = 8, 4
    A, b = _quadratics(n, d, seed=7)
    x_star = np.linalg.solve(A.sum(0).astype(np.float64), b.sum(0).astype(np.float64))
    W = topology.mixing_matrix(topology.ring(n))
    zero = np.zeros((n, d), np.float32)
    params = {"x": jnp.zeros((n, d))}
    lr = 0.05

    def final(algo):
        state = algo.init(params)
        step = jax.jit(algo.step)

        def body(s, t):
            return step(s, (A, b, zero), jax.random.key(0))[0], None

        state, _ = jax.lax.scan(body, state, jnp.arange(3000))
        return np.asarray(state.params["x"], np.float64)

    gt = final(
        jd.algorithms.gradient_tracking(quad_loss, optax.sgd(lr), gossip.dense(W))
    )
    ds = final(jd.algorithms.dsgd(quad_loss, optax.sgd(lr), gossip.dense(W)))
    gt_err = np.max(np.linalg.norm(gt - x_star, axis=1))
    ds_err = np.max(np.linalg.norm(ds - x_star, axis=1))
    assert gt_err < 1e-4
    assert ds_err > 1e-2
    assert ds_err > 100 * gt_err


@pytest.mark.parametrize(
    "factory", [jd.algorithms.dsgd, jd.algorithms.gradient_tracking]
)
def test_step_compiles_once(factory):
    traces = []

    def loss(params, batch, key):
        traces.append(1)
        return lsq_loss(params, batch, key)

    n, d = 4, 3
    W = topology.mixing_matrix(topology.ring(n))
    algo = factory(loss, optax.sgd(0.1), gossip.sparse(W))
    state = algo.init(jd.tree.replicate({"w": jnp.zeros(d), "c": jnp.zeros(())}, n))
    step = jax.jit(algo.step)
    for t in range(4):
        batch = (jnp.ones((n, 5, d)) * t, jnp.ones((n, 5)))
        state, _ = step(state, batch, jax.random.key(t))
    assert len(traces) == 1
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    "factory", [jd.algorithms.dsgd, jd.algorithms.gradient_tracking]
)
def test_works_with_optax_chain_and_matches_independent_workers(factory):
    """With W = I every worker is an independent optax run of clip + adam."""
    n, d = 3, 3
    opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.05))
    algo = factory(lsq_loss, opt, gossip.identity())
    r = np.random.default_rng(0)
    p0 = {"w": jnp.asarray(r.normal(size=(n, d)), jnp.float32), "c": jnp.zeros((n,))}
    state = algo.init(p0)
    per_worker = [jax.tree.map(lambda x, i=i: x[i], p0) for i in range(n)]
    opt_states = [opt.init(p) for p in per_worker]
    for t in range(15):
        a = jnp.asarray(r.normal(size=(n, 6, d)), jnp.float32)
        y = jnp.asarray(r.normal(size=(n, 6)), jnp.float32)
        state, info = algo.step(state, (a, y), jax.random.key(t))
        for i in range(n):
            g = jax.grad(lsq_loss)(per_worker[i], (a[i], y[i]), None)
            u, opt_states[i] = opt.update(g, opt_states[i], per_worker[i])
            per_worker[i] = optax.apply_updates(per_worker[i], u)
    for i in range(n):
        for k in ("w", "c"):
            np.testing.assert_allclose(
                state.params[k][i], per_worker[i][k], rtol=1e-5, atol=1e-6
            )
    assert bool(jnp.all(info.finite))


def test_info_fields_and_communication_accounting():
    n, d = 6, 3
    W = topology.mixing_matrix(topology.ring(n))
    algo = jd.algorithms.dsgd(
        lsq_loss, optax.sgd(0.1), gossip.every(2, gossip.sparse(W))
    )
    params = jd.tree.replicate({"w": jnp.zeros(d), "c": jnp.zeros(())}, n)
    state = algo.init(params)
    batch = (jnp.ones((n, 4, d)), jnp.arange(n * 4.0).reshape(n, 4))
    state, info0 = algo.step(state, batch, jax.random.key(0))
    state, info1 = algo.step(state, batch, jax.random.key(1))
    assert info0.loss.shape == (n,)
    assert float(info0.floats_sent) == 0.0  # no gossip at step 0 with H = 2
    assert float(info1.floats_sent) == 2 * (d + 1)  # 2 ring neighbours x 4 floats
    # heterogeneous targets -> workers disagree after local steps
    assert float(info0.consensus) > 0
    np.testing.assert_allclose(
        info0.consensus,
        jd.tree.consensus_distance(
            algo.step(algo.init(params), batch, jax.random.key(0))[0].params
        ),
    )


def test_has_aux():
    def loss(params, batch, key):
        value = lsq_loss(params, batch, key)
        return value, {"double": 2 * value}

    n, d = 3, 2
    algo = jd.algorithms.dsgd(loss, optax.sgd(0.1), gossip.complete(), has_aux=True)
    state = algo.init(jd.tree.replicate({"w": jnp.ones(d), "c": jnp.zeros(())}, n))
    batch = (jnp.ones((n, 2, d)), jnp.zeros((n, 2)))
    _, info = algo.step(state, batch, jax.random.key(0))
    np.testing.assert_allclose(info.aux["double"], 2 * info.loss)


def test_factory_validation():
    W = topology.mixing_matrix(topology.ring(4))
    with pytest.raises(ValueError, match="order"):
        jd.algorithms.dsgd(lsq_loss, optax.sgd(0.1), gossip.dense(W), order="both")
    with pytest.raises(ValueError, match="optax"):
        jd.algorithms.dsgd(lsq_loss, 0.1, gossip.dense(W))
    with pytest.raises(ValueError, match="MixingFn"):
        jd.algorithms.gradient_tracking(lsq_loss, optax.sgd(0.1), W)
    algo = jd.algorithms.dsgd(lsq_loss, optax.sgd(0.1), gossip.dense(W))
    state = algo.init(jd.tree.replicate({"w": jnp.ones(2), "c": jnp.zeros(())}, 5))
    with pytest.raises(ValueError, match="built for 4 workers"):
        algo.step(state, (jnp.ones((5, 2, 2)), jnp.ones((5, 2))), jax.random.key(0))
    with pytest.raises(ValueError, match="leading dimension|scalar"):
        algo.init({"w": jnp.ones((4, 2)), "c": jnp.zeros(())})
