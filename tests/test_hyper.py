"""jaxdec.hyper: hypergradients vs finite differences, learned mixing invariants,
vmapped sweeps vs separate runs, checkpointed vs plain unrolls."""

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdec as jd
from jaxdec import gossip, hyper, topology
from jaxdec.run import step_keys

N, D, M, T = 5, 3, 30, 12


def _graph():
    # ring(5) plus a chord: degrees (3, 2, 3, 2, 2), so edge caps differ
    return topology.from_edges(N, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2)])


def _problem(dtype):
    r = np.random.default_rng(0)
    a = r.normal(size=(N, M, D))
    w_true = r.normal(size=(N, D))
    y = np.einsum("nmd,nd->nm", a, w_true) + 0.1 * r.normal(size=(N, M))
    a_j, y_j = jnp.asarray(a, dtype), jnp.asarray(y, dtype)

    def sample(a_j, y_j, key, step):
        idx = jax.random.randint(jax.random.fold_in(key, step), (N, 6), 0, M)
        return (
            jnp.take_along_axis(a_j, idx[..., None], 1),
            jnp.take_along_axis(y_j, idx, 1),
        )

    sampler = jax.tree_util.Partial(sample, a_j, y_j)  # data as pytree leaves

    def loss(params, batch, key):
        aa, yy = batch
        return 0.5 * jnp.mean((aa @ params["w"] - yy) ** 2)

    def val_loss(state):
        x_bar = jd.tree.worker_mean(state.params)["w"]
        return 0.5 * jnp.mean((jnp.einsum("nmd,d->nm", a_j, x_bar) - y_j) ** 2)

    return sampler, loss, val_loss, (a, y)


def _make_algo_factory(G, loss):
    def make_algo(hp):
        W = hyper.parametrized_mixing(G, hp["theta"])
        opt = optax.chain(
            optax.add_decayed_weights(hp["wd"]),
            hyper.inject(optax.sgd, learning_rate=hp["lr"], momentum=hp["momentum"]),
        )
        return jd.algorithms.dsgd(loss, opt, hyper.traced_dense(W))

    return make_algo


def _np_mixing(G, theta):
    """Plain NumPy loop of the parametrized_mixing equations (float64)."""
    n = G.number_of_nodes()
    edges = sorted((min(i, j), max(i, j)) for i, j in G.edges)
    deg = np.array([G.degree(i) for i in range(n)], float)
    W = np.zeros((n, n))
    for e, (i, j) in enumerate(edges):
        w = 1.0 / (1.0 + np.exp(-theta[e])) / max(deg[i], deg[j])
        W[i, j] = W[j, i] = w
    for i in range(n):
        W[i, i] = 1.0 - sum(W[i, j] for j in range(n) if j != i)
    return W


# ----------------------------------------------------------------- hypergradients


def test_unroll_matches_numpy_momentum_dsgd_loop():
    G = _graph()
    sampler, loss, _, _ = _problem(jnp.float32)
    make_algo = _make_algo_factory(G, loss)
    theta = np.linspace(-1.0, 2.0, G.number_of_edges())
    hp = {"lr": 0.05, "momentum": 0.8, "wd": 0.01, "theta": jnp.asarray(theta)}
    x0 = np.random.default_rng(1).normal(size=(N, D))
    key = jax.random.key(7)
    s, summ = jax.jit(lambda hp, x, smp: hyper.unroll(make_algo, hp, x, smp, key, T))(
        hp, {"w": jnp.asarray(x0, jnp.float32)}, sampler
    )
    W = _np_mixing(G, theta)
    batches = jax.jit(
        jax.vmap(lambda t, smp: smp(step_keys(key, t)[0], t), in_axes=(0, None))
    )(jnp.arange(T, dtype=jnp.int32), sampler)
    batches = [(batches[0][t], batches[1][t]) for t in range(T)]
    x, buf = x0.copy(), np.zeros_like(x0)
    for t in range(T):
        aa, yy = (np.asarray(v, float) for v in batches[t])
        g = np.einsum("nbd,nb->nd", aa, np.einsum("nbd,nd->nb", aa, x) - yy)
        g = g / aa.shape[1] + 0.01 * x
        buf = g + 0.8 * buf  # optax.sgd momentum (trace)
        x = W @ (x - 0.05 * buf)  # adapt then combine
    np.testing.assert_allclose(s.params["w"], x, rtol=2e-5, atol=2e-6)
    assert summ["loss"].shape == (T,)


def test_hypergradients_match_central_finite_differences():
    """lr, momentum, weight decay and every mixing parameter, float64."""
    G = _graph()
    with jax.enable_x64(True):
        sampler, loss, val_loss, _ = _problem(jnp.float64)
        make_algo = _make_algo_factory(G, loss)
        x0 = {"w": jnp.zeros((N, D), jnp.float64)}
        key = jax.random.key(3)

        def objective(hp):
            s, _ = hyper.unroll(make_algo, hp, x0, sampler, key, T, checkpoint_every=3)
            return val_loss(s)

        m = G.number_of_edges()
        hp = {
            "lr": jnp.float64(0.08),
            "momentum": jnp.float64(0.6),
            "wd": jnp.float64(0.05),
            "theta": jnp.asarray(np.linspace(-1.5, 1.5, m)),
        }
        grad = jax.jit(jax.grad(objective))(hp)
        f = jax.jit(objective)
        eps = 1e-6

        def fd(name, idx=None):
            def shifted(sign):
                h = dict(hp)
                if idx is None:
                    h[name] = hp[name] + sign * eps
                else:
                    h[name] = hp[name].at[idx].add(sign * eps)
                return f(h)

            return (shifted(1.0) - shifted(-1.0)) / (2 * eps)

        for name in ("lr", "momentum", "wd"):
            assert grad[name].dtype == jnp.float64
            np.testing.assert_allclose(grad[name], fd(name), rtol=1e-6, atol=1e-10)
        fd_theta = np.array([fd("theta", e) for e in range(m)])
        np.testing.assert_allclose(grad["theta"], fd_theta, rtol=1e-6, atol=1e-10)
        assert np.abs(fd_theta).max() > 1e-4  # the mixing weights matter


def test_per_worker_data_weights_via_set_hyperparams_fd():
    """Per-worker lr scalings injected into an initialized state: d val / d a_i."""
    G = _graph()
    with jax.enable_x64(True):
        sampler, loss, val_loss, _ = _problem(jnp.float64)
        W = topology.mixing_matrix(G)
        opt = hyper.inject(optax.sgd, learning_rate=0.1)
        algo = jd.algorithms.dsgd(loss, opt, gossip.dense(W))
        state0 = algo.init({"w": jnp.zeros((N, D), jnp.float64)})
        assert hyper.get_hyperparams(state0)["learning_rate"].shape == (N,)
        key = jax.random.key(5)

        def objective(a):
            st = hyper.set_hyperparams(state0, learning_rate=0.1 * a)
            s, _ = hyper.unroll(lambda _: algo, None, st, sampler, key, T)
            return val_loss(s)

        a = jnp.asarray([1.0, 0.5, 1.5, 0.8, 1.2])
        g = jax.jit(jax.grad(objective))(a)
        f = jax.jit(objective)
        eps = 1e-6
        fd = [
            (f(a.at[i].add(eps)) - f(a.at[i].add(-eps))) / (2 * eps) for i in range(N)
        ]
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)
        # a uniform scaling equals a scalar learning rate
        s1 = hyper.set_hyperparams(state0, learning_rate=jnp.full(N, 0.2))
        s2 = hyper.set_hyperparams(state0, learning_rate=0.2)
        np.testing.assert_array_equal(
            hyper.get_hyperparams(s1)["learning_rate"],
            hyper.get_hyperparams(s2)["learning_rate"],
        )


def test_checkpointed_unroll_equals_plain_unroll():
    G = _graph()
    sampler, loss, val_loss, _ = _problem(jnp.float32)
    make_algo = _make_algo_factory(G, loss)
    x0 = {"w": jnp.zeros((N, D))}
    key = jax.random.key(11)
    hp = {
        "lr": jnp.float32(0.05),
        "momentum": jnp.float32(0.5),
        "wd": jnp.float32(0.0),
        "theta": jnp.zeros(G.number_of_edges()),
    }

    def objective(hp, ck):
        s, summ = hyper.unroll(make_algo, hp, x0, sampler, key, T, checkpoint_every=ck)
        return val_loss(s), (s.params["w"], summ["loss"])

    def both(hp, ck):
        return jax.jit(lambda h: jax.value_and_grad(objective, has_aux=True)(h, ck))(hp)

    (_, (ref_w, ref_loss)), ref_g = both(hp, None)
    for ck in (4, "auto"):
        (_, (w, losses)), g = both(hp, ck)
        np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(losses, ref_loss, rtol=1e-6)
        for k in hp:
            np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-5, atol=1e-7)
    assert hyper.auto_checkpoint(1000) == 25 and hyper.auto_checkpoint(12) == 3
    assert hyper.auto_checkpoint(7) == 1


def test_vmapped_sweep_equals_separate_runs():
    sampler, loss, val_loss, _ = _problem(jnp.float32)
    Ws = jnp.asarray(
        np.stack(
            [
                topology.mixing_matrix(topology.ring(N)),
                topology.mixing_matrix(topology.star(N)),
            ]
        ),
        jnp.float32,
    )
    flat, shape = hyper.grid(lr=jnp.asarray([0.01, 0.05, 0.1]), W=Ws)
    assert shape == (3, 2) and flat["lr"].shape == (6,) and flat["W"].shape[0] == 6
    x0 = {"w": jnp.zeros((N, D))}
    key = jax.random.key(2)

    def train(h, smp):
        def make_algo(hp):
            return jd.algorithms.dsgd(
                loss, optax.sgd(hp["lr"]), hyper.traced_dense(hp["W"])
            )

        s, summ = hyper.unroll(make_algo, h, x0, smp, key, T)
        return {"val": val_loss(s), "w": s.params["w"], "loss": summ["loss"]}

    out = jax.jit(lambda h, smp: hyper.sweep(train, h, smp, shape=shape))(flat, sampler)
    batched = jax.jit(
        lambda h, smp: hyper.sweep(train, h, smp, batch_size=4, shape=shape)
    )(flat, sampler)
    one = jax.jit(train)
    lrs = [0.01, 0.05, 0.1]
    for g in range(6):
        r, c = np.unravel_index(g, shape)
        assert float(flat["lr"][g]) == pytest.approx(lrs[r])
        np.testing.assert_array_equal(flat["W"][g], Ws[c])
        ref = one({"lr": flat["lr"][g], "W": flat["W"][g]}, sampler)
        for k in ref:
            np.testing.assert_allclose(out[k][r, c], ref[k], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(batched[k][r, c], ref[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- learned mixing


@st.composite
def _graph_and_theta(draw):
    n = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 10_000))
    p = draw(st.floats(0.0, 1.0))
    r = np.random.default_rng(seed)
    perm = r.permutation(n)  # random spanning tree keeps the graph connected
    edges = {
        tuple(sorted((int(perm[k]), int(perm[r.integers(0, k)])))) for k in range(1, n)
    }
    edges |= {(i, j) for i in range(n) for j in range(i + 1, n) if r.random() < p}
    G = topology.from_edges(n, sorted(edges))
    theta = draw(
        st.lists(
            st.floats(-60.0, 60.0, allow_nan=False),
            min_size=G.number_of_edges(),
            max_size=G.number_of_edges(),
        )
    )
    return G, np.asarray(theta, float)


@settings(max_examples=60, deadline=None)
@given(_graph_and_theta())
def test_parametrized_mixing_properties(gt):
    G, theta = gt
    W = np.asarray(hyper.parametrized_mixing(G, jnp.asarray(theta, jnp.float32)))
    n = G.number_of_nodes()
    A = nx.to_numpy_array(G, nodelist=range(n)) > 0
    np.testing.assert_array_equal(W, W.T)  # symmetric, exactly
    assert (W >= 0).all()  # non-negative, exactly
    assert (W[~A & ~np.eye(n, dtype=bool)] == 0).all()  # supported on the graph
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=2e-6)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=2e-6)
    np.testing.assert_allclose(W, _np_mixing(G, theta), atol=2e-6)
    assert topology.is_doubly_stochastic(W, atol=2e-6)


def test_parametrized_mixing_metropolis_edges_and_wrapper():
    for G in (topology.ring(6), topology.star(5), _graph(), topology.torus(9)):
        theta = hyper.metropolis_theta(G)
        with jax.enable_x64(True):
            W = np.asarray(hyper.parametrized_mixing(G, jnp.asarray(theta)))
        np.testing.assert_allclose(W, topology.mixing_matrix(G), atol=1e-12)
        E = hyper.edge_list(G)
        assert (E[:, 0] < E[:, 1]).all() and len(E) == G.number_of_edges()
        assert [tuple(e) for e in E] == sorted(tuple(e) for e in E)
    G = _graph()
    th = jnp.linspace(-2.0, 2.0, G.number_of_edges())
    np.testing.assert_array_equal(
        topology.parametrized_mixing(G, th), hyper.parametrized_mixing(G, th)
    )
    assert "parametrized_mixing" in topology.__all__
    with pytest.raises(ValueError, match="one entry per edge"):
        hyper.parametrized_mixing(G, jnp.zeros(3))
    with pytest.raises(ValueError, match="disconnected"):
        hyper.parametrized_mixing(topology.from_edges(4, [(0, 1)]), jnp.zeros(1))


def test_traced_dense_equals_gossip_dense():
    W = topology.mixing_matrix(_graph())
    x = {"w": jnp.arange(N * 4.0).reshape(N, 2, 2), "b": jnp.ones((N,))}
    a, b = hyper.traced_dense(jnp.asarray(W))(x, 0), gossip.dense(W)(x, 0)
    for k in x:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    np.testing.assert_array_equal(
        hyper.traced_dense(jnp.asarray(W)).sends(jnp.int32(0), N),
        gossip.dense(W).sends(jnp.int32(0), N),
    )
    with pytest.raises(ValueError, match="square"):
        hyper.traced_dense(jnp.ones((3, 4)))


def test_consensus_rate_closed_form_and_bounds():
    G = _graph()
    r = np.random.default_rng(0)
    for _ in range(3):
        th = r.normal(size=G.number_of_edges()) * 2
        with jax.enable_x64(True):
            W = np.asarray(hyper.parametrized_mixing(G, jnp.asarray(th)))
            lam = topology.second_largest_eigenvalue(W)
            for rounds, K in ((1, 1), (5, 8), (64, 64)):
                sig = np.linalg.svd(W - 1.0 / N)[1][:-1]  # drop the zero one
                ref = (np.sum(sig ** (2 * K)) / (N - 1)) ** (1 / (2 * K))
                got = float(hyper.consensus_rate(jnp.asarray(W), rounds))
                np.testing.assert_allclose(got, ref, rtol=1e-10)
                assert (N - 1) ** (-1 / (2 * K)) * lam - 1e-12 <= got <= lam + 1e-12


def test_tune_mixing_reaches_fastest_ring_mixing():
    """Learned ring weights approach the closed-form fastest-mixing spectral gap
    ``2(1 - cos(2 pi / n)) / (3 - cos(2 pi / n))`` (uniform weight
    ``1 / (3 - cos(2 pi / n))``), which no symmetric W on the ring can exceed."""
    n = 8
    G = topology.ring(n)
    res = hyper.tune_mixing(G, num_steps=300, rounds=256, optimizer=optax.adam(0.1))
    W = np.asarray(hyper.parametrized_mixing(G, res.best_x), float)
    c = np.cos(2 * np.pi / n)
    optimum = 2 * (1 - c) / (3 - c)
    metropolis = topology.spectral_gap(topology.mixing_matrix(G))
    gap = topology.spectral_gap(W)
    assert metropolis < 0.8 * optimum
    assert 0.99 * optimum <= gap <= optimum + 1e-5
    np.testing.assert_allclose(W[0, 1], 1 / (3 - c), rtol=0.02)
    assert res.values[-1] < res.values[0] and len(res.values) == 301
    assert topology.is_doubly_stochastic(W, atol=1e-6)


# ------------------------------------------------------------------ small pieces


def test_piecewise_constant_schedule():
    v = jnp.asarray([0.3, 0.2, 0.1])
    sched = hyper.piecewise_constant(v, 10)
    got = [float(sched(jnp.int32(t))) for t in range(12)]
    ref = [float(v[min(t * 3 // 10, 2)]) for t in range(12)]
    assert got == ref

    def total(v):
        sched = hyper.piecewise_constant(v, 10)
        return sum(sched(jnp.int32(t)) for t in range(10))

    g = jax.grad(total)(v)
    np.testing.assert_allclose(g, [4.0, 3.0, 3.0])  # steps 0-3, 4-6, 7-9
    with pytest.raises(ValueError, match="non-empty vector"):
        hyper.piecewise_constant(jnp.ones((2, 2)), 10)


def test_minimize_quadratic_and_plot(tmp_path):
    target = jnp.asarray([1.0, -2.0])
    res = hyper.minimize(
        lambda x, t: jnp.sum((x - t) ** 2), jnp.zeros(2), optax.sgd(0.25), 5, target
    )
    # x_{s+1} = x_s - 0.5 (x_s - t) = t (1 - 0.5^{s+1})
    np.testing.assert_allclose(res.x, target * (1 - 0.5**5), rtol=1e-6)
    np.testing.assert_allclose(res.values, 5.0 * 0.25 ** np.arange(6), rtol=1e-5)
    p = hyper.plot_sweep(
        np.arange(6.0).reshape(2, 3), tmp_path / "h.png", x=[1, 2, 3], y=["a", "b"]
    )
    assert p.stat().st_size > 1000
    p = hyper.plot_sweep(np.arange(3.0), tmp_path / "l.png", x=[0.1, 1, 10], log_x=True)
    assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="row labels"):
        hyper.plot_sweep(np.ones((2, 3)), tmp_path / "x.png", x=[1, 2, 3])


def test_validation_errors():
    sampler, loss, _, _ = _problem(jnp.float32)
    W = topology.mixing_matrix(_graph())
    algo = jd.algorithms.dsgd(loss, optax.sgd(0.1), gossip.dense(W))
    x0 = {"w": jnp.zeros((N, D))}
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="divide"):
        hyper.unroll(lambda h: algo, None, x0, sampler, key, 10, checkpoint_every=3)
    with pytest.raises(ValueError, match="num_steps"):
        hyper.unroll(lambda h: algo, None, x0, sampler, key, 0)
    with pytest.raises(ValueError, match="must return a jd.Algorithm"):
        hyper.unroll(lambda h: None, None, x0, sampler, key, 4)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        hyper.set_hyperparams(algo.init(x0), learning_rate=0.1)
    algo2 = jd.algorithms.dsgd(
        loss, hyper.inject(optax.sgd, learning_rate=0.1), gossip.dense(W)
    )
    s2 = algo2.init(x0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        hyper.set_hyperparams(s2, lr=0.1)
    with pytest.raises(ValueError, match="one value per worker"):
        hyper.set_hyperparams(s2, learning_rate=jnp.ones(N + 1))
    algo3 = jd.algorithms.dsgd(
        loss,
        hyper.inject(optax.sgd, learning_rate=optax.linear_schedule(0.1, 0.0, 10)),
        gossip.dense(W),
    )
    with pytest.raises(ValueError, match="schedule"):
        hyper.set_hyperparams(algo3.init(x0), learning_rate=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        hyper.grid(lr=[])
    with pytest.raises(ValueError, match="same leading grid axis"):
        hyper.sweep(lambda h: h, {"a": jnp.ones(3), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match="objective"):
        hyper.tune_mixing(_graph(), "fastest")
