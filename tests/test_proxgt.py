"""ProxGT and prox-DSGD: spec invariants (specs/proxgt.md, section 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip, topology
from jaxdec import prox as P
from jaxdec.algorithms import prox_tracking as PG

N, M_MAX, D, R = 6, 10, 5, 0.02
COUNTS = np.array([10, 8, 10, 7, 10, 9])


def loss_fn(params, batch, key):
    """Per-sample least squares plus a non-convex term 0.05 sum cos(w)."""
    X, y = batch
    w = params["w"]
    return 0.5 * jnp.mean(jnp.square(X @ w - y)) + 0.05 * jnp.sum(jnp.cos(w))


def np_grad(w, X, y):
    return X.T @ (X @ w - y) / len(y) - 0.05 * np.sin(w)


def _data(n=N, counts=COUNTS, seed=0):
    r = np.random.default_rng(seed)
    X = r.normal(size=(n, M_MAX, D)).astype(np.float32)
    w_true = r.normal(size=D)
    y = (X @ w_true + 0.3 * r.normal(size=(n, M_MAX)) + r.normal(size=(n, 1))).astype(
        np.float32
    )
    return jd.data.from_worker_arrays(X, y, counts)


def _x0(n=N, seed=1):
    w = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    return {"w": jnp.asarray(np.tile(w, (n, 1)))}


def _soft(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def _batches(sampler, steps, seed=3):
    key = jax.random.key(seed)
    return [jax.jit(sampler)(key, t) for t in range(steps)]


def _np_refresh(est, w, data, bt):
    Xd, yd, cnt = (np.asarray(a, np.float64) for a in (data.x, data.y, data.counts))
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        if est == "sa":
            idx = np.asarray(bt.batch.idx[i])
        elif est == "sr_online":
            idx = np.asarray(bt.refresh.idx[i])
        else:
            idx = np.arange(int(cnt[i]))
        out[i] = np_grad(w[i], Xd[i, idx], yd[i, idx])
    return out


def _np_mini(w, data, bt):
    Xd, yd = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        idx = np.asarray(bt.batch.idx[i])
        out[i] = np_grad(w[i], Xd[i, idx], yd[i, idx])
    return out


def np_proxgt(est, order, Mk, x0, data, batches, a_of, q, r=R):
    """The spec's equations as a plain NumPy loop; returns per-step (x, y, v)."""
    x = np.asarray(x0, np.float64)
    v = _np_refresh(est, x, data, batches[0])
    y = v.copy()
    out = [(x.copy(), y.copy(), v.copy())]
    for c in range(1, len(batches)):
        t, bt = c - 1, batches[c]
        a = a_of(t)
        z = x - a * y
        x_new = (
            Mk @ _soft(z, a * r) if order == "prox_then_mix" else _soft(Mk @ z, a * r)
        )
        if est == "sa":
            v_new = _np_mini(x_new, data, bt)
        elif (t + 1) % q == 0:
            v_new = _np_refresh(est, x_new, data, bt)
        else:
            v_new = v + _np_mini(x_new, data, bt) - _np_mini(x, data, bt)
        y = Mk @ (y + v_new - v)
        x, v = x_new, v_new
        out.append((x.copy(), y.copy(), v.copy()))
    return out


def _algo(est, order="prox_then_mix", K=2, n=N, lr=0.05, q=4, **kw):
    W = topology.mixing_matrix(topology.ring(n)) if n > 1 else np.ones((1, 1))
    mix = gossip.chebyshev(W, K)
    algo = PG.proxgt(
        loss_fn, P.l1(R), mix, estimator=est, lr=lr, q=q, order=order, **kw
    )
    return algo, gossip.chebyshev_matrix(W, K) if n > 1 else np.ones((1, 1))


@pytest.mark.parametrize("order", PG.ORDERS)
@pytest.mark.parametrize("est", PG.ESTIMATORS)
def test_matches_numpy_loop(est, order):
    """Invariant 11: step-by-step equality with the equations, compiled once."""
    data = _data()
    algo, Mk = _algo(est, order)
    sampler = PG.make_sampler(data, 3, estimator=est, refresh_size=6)
    batches = _batches(sampler, 21)
    ref = np_proxgt(est, order, Mk, _x0()["w"], data, batches, lambda t: 0.05, q=4)
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    for c, bt in enumerate(batches):
        state, info = step(state, bt, jax.random.key(c))
        xr, yr, vr = ref[c]
        np.testing.assert_allclose(state.x["w"], xr, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.y["w"], yr, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.v["w"], vr, rtol=1e-5, atol=1e-5)
    assert step._cache_size() == 1


def test_matches_numpy_loop_with_schedule():
    data = _data()
    sched = optax.exponential_decay(0.08, transition_steps=5, decay_rate=0.5)
    algo, Mk = _algo("sr_finite", lr=sched)
    sampler = PG.make_sampler(data, 3, estimator="sr_finite")
    batches = _batches(sampler, 21)
    ref = np_proxgt(
        "sr_finite",
        "prox_then_mix",
        Mk,
        _x0()["w"],
        data,
        batches,
        lambda t: float(sched(t)),
        q=4,
    )
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    for c, bt in enumerate(batches):
        state, _ = step(state, bt, jax.random.key(c))
    np.testing.assert_allclose(state.x["w"], ref[-1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("est", PG.ESTIMATORS)
def test_tracker_mean_equals_estimator_mean(est):
    """Invariant 1 and 2 (average dynamics) over 50 iterations."""
    data = _data()
    algo, _ = _algo(est, K=3)
    sampler = PG.make_sampler(data, 2, estimator=est, refresh_size=5)
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    key = jax.random.key(0)
    vprox = jax.vmap(P.l1(R), in_axes=(0, None))
    for c in range(51):
        prev = state
        state, _ = step(state, sampler(key, c), jax.random.key(c))
        my, mv = state.y["w"].mean(0), state.v["w"].mean(0)
        np.testing.assert_allclose(my, mv, atol=1e-6 * (1 + float(jnp.abs(mv).max())))
        if c > 0:
            z = vprox({"w": prev.x["w"] - 0.05 * prev.y["w"]}, 0.05)["w"]
            np.testing.assert_allclose(
                state.x["w"].mean(0), z.mean(0), rtol=1e-6, atol=1e-6
            )


def test_priming_step_leaves_x_and_sets_y_to_v():
    data = _data()
    algo, _ = _algo("sr_online")
    sampler = PG.make_sampler(data, 2, estimator="sr_online", refresh_size=7)
    s0 = algo.init(_x0())
    s1, info = jax.jit(algo.step)(s0, sampler(jax.random.key(0), 0), jax.random.key(1))
    np.testing.assert_array_equal(s1.x["w"], s0.x["w"])
    np.testing.assert_array_equal(s1.y["w"], s1.v["w"])
    assert float(jnp.abs(s1.v["w"]).max()) > 0
    np.testing.assert_array_equal(s1.samples, 7)
    np.testing.assert_array_equal(s1.comm_rounds, 0)
    with pytest.raises(ValueError, match="consensual"):
        algo.init({"w": jnp.asarray(np.random.default_rng(0).normal(size=(N, D)))})


def _np_prox_sarah(est, x0, data, batches, a, q, b_all=False):
    """Centralized ProxSARAH / prox-SGD on ONE worker's data (n = 1)."""
    x = np.asarray(x0, np.float64)[0]
    Xd, yd = np.asarray(data.x[0], np.float64), np.asarray(data.y[0], np.float64)
    cnt = int(data.counts[0])

    def g(w, idx):
        return np_grad(w, Xd[idx], yd[idx])

    def refresh(bt):
        if est == "sa":
            return np.asarray(bt.batch.idx[0])
        if est == "sr_online":
            return np.asarray(bt.refresh.idx[0])
        return np.arange(cnt)

    v = g(x, refresh(batches[0]))
    xs = [x]
    for c in range(1, len(batches)):
        t, bt = c - 1, batches[c]
        x_new = _soft(x - a * v, a * R)
        S = np.asarray(bt.batch.idx[0])
        if est == "sa":
            v = g(x_new, S)
        elif (t + 1) % q == 0:
            v = g(x_new, refresh(bt))
        else:
            v = v + g(x_new, S) - g(x, S)
        x = x_new
        xs.append(x)
    return xs


@pytest.mark.parametrize("est", PG.ESTIMATORS)
def test_one_worker_is_centralized_method(est):
    """Invariant 3: n = 1 gives prox-SGD / ProxSARAH step by step."""
    data = _data(n=1, counts=[9])
    algo, _ = _algo(est, n=1)
    sampler = PG.make_sampler(data, 3, estimator=est, refresh_size=6)
    batches = _batches(sampler, 15)
    ref = _np_prox_sarah(est, _x0(1)["w"], data, batches, 0.05, 4)
    step = jax.jit(algo.step)
    state = algo.init(_x0(1))
    for c, bt in enumerate(batches):
        state, _ = step(state, bt, jax.random.key(c))
        np.testing.assert_allclose(state.x["w"][0], ref[c], rtol=1e-6, atol=1e-6)


def test_full_averaging_is_centralized_with_batch_nb():
    """Invariant 4: W = J gives equal x_i and prox-SGD on the union batch."""
    data = _data(counts=None)
    W = topology.complete_matrix(N)
    algo = PG.proxgt(loss_fn, P.l1(R), gossip.dense(W), estimator="sa", lr=0.05)
    sampler = PG.make_sampler(data, 3)
    batches = _batches(sampler, 15)
    Xd, yd = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)

    def union_grad(w, bt):
        idx = np.asarray(bt.batch.idx)
        X = np.concatenate([Xd[i, idx[i]] for i in range(N)])
        y = np.concatenate([yd[i, idx[i]] for i in range(N)])
        return np_grad(w, X, y)

    w = np.asarray(_x0()["w"][0], np.float64)
    g = union_grad(w, batches[0])
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    for c, bt in enumerate(batches):
        state, _ = step(state, bt, jax.random.key(c))
        if c > 0:
            w = _soft(w - 0.05 * g, 0.05 * R)
            g = union_grad(w, bt)
        xs = np.asarray(state.x["w"])
        np.testing.assert_allclose(xs, np.broadcast_to(xs[:1], xs.shape), atol=1e-6)
        np.testing.assert_allclose(xs[0], w, rtol=1e-5, atol=1e-6)


def test_h_zero_is_gradient_tracking():
    """Invariant 5: with prox = identity the update is multi-round GT-SGD."""
    data = _data()
    W = topology.mixing_matrix(topology.ring(N))
    Mk = gossip.chebyshev_matrix(W, 3)
    algo = PG.proxgt(loss_fn, P.zero(), gossip.chebyshev(W, 3), estimator="sa", lr=0.05)
    batches = _batches(PG.make_sampler(data, 4), 10)
    x = np.asarray(_x0()["w"], np.float64)
    v = _np_mini(x, data, batches[0])
    y = v.copy()
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    state, _ = step(state, batches[0], jax.random.key(0))
    for c in range(1, 10):
        x = Mk @ (x - 0.05 * y)
        v_new = _np_mini(x, data, batches[c])
        y = Mk @ (y + v_new - v)
        v = v_new
        state, _ = step(state, batches[c], jax.random.key(c))
    np.testing.assert_allclose(state.x["w"], x, rtol=1e-5, atol=1e-6)


def test_sarah_refresh_and_exact_gradients():
    """Invariant 8: refresh steps give the full local gradient; with b = m (all
    rows, no replacement) sr_finite tracks grad f_i(x_i) at every t."""
    data = _data(counts=None)
    algo, _ = _algo("sr_finite", q=3)
    all_rows = jnp.tile(jnp.arange(M_MAX, dtype=jnp.int32), (N, 1))
    full = PG.IndexedBatch(data.x, data.y, all_rows)
    bt = PG.ProxGTBatch(full, PG.IndexedBatch(data.x, data.y))
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    Xd, yd = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
    for c in range(12):
        state, _ = step(state, bt, jax.random.key(c))
        w = np.asarray(state.x["w"], np.float64)
        exact = np.stack([np_grad(w[i], Xd[i], yd[i]) for i in range(N)])
        np.testing.assert_allclose(state.v["w"], exact, rtol=1e-5, atol=1e-5)


def test_refresh_uses_same_indices_at_both_points():
    """Between refreshes, v^{t+1} - v^t = g(x^{t+1}; S) - g(x^t; S) with one S."""
    data = _data()
    algo, _ = _algo("sr_online", q=100)
    sampler = PG.make_sampler(data, 2, estimator="sr_online", refresh_size=5)
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    state, _ = step(state, sampler(jax.random.key(0), 0), jax.random.key(0))
    bt = sampler(jax.random.key(0), 1)
    new, _ = step(state, bt, jax.random.key(1))
    d = np.asarray(new.v["w"] - state.v["w"], np.float64)
    ref = _np_mini(np.asarray(new.x["w"], np.float64), data, bt) - _np_mini(
        np.asarray(state.x["w"], np.float64), data, bt
    )
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_consensus_contracts_with_zero_step(K):
    """Invariant 9: with a = 0, sum_i ||x_i - x_bar||^2 shrinks by ||M_K - J||^2."""
    data = _data()
    W = topology.mixing_matrix(topology.ring(N))
    Mk = gossip.chebyshev_matrix(W, K)
    bound = np.linalg.norm(Mk - np.full((N, N), 1.0 / N), 2) ** 2
    algo = PG.proxgt(loss_fn, P.l1(R), gossip.chebyshev(W, K), lr=0.0, prox_step=1e-12)
    state = algo.init(_x0())
    sampler = PG.make_sampler(data, 2)
    state, _ = algo.step(state, sampler(jax.random.key(0), 0), jax.random.key(0))
    x = np.random.default_rng(5).normal(size=(N, D)).astype(np.float32)
    state = state._replace(x={"w": jnp.asarray(x)})
    step = jax.jit(algo.step)
    for c in range(1, 6):
        before = float(jd.tree.consensus_distance(state.x)) * N
        state, _ = step(state, sampler(jax.random.key(0), c), jax.random.key(c))
        after = float(jd.tree.consensus_distance(state.x)) * N
        assert after <= bound * before * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize(
    "est,per_step", [("sa", {3}), ("sr_online", {6, 5}), ("sr_finite", {6, None})]
)
def test_accounting(est, per_step):
    """Invariant 10: 2K rounds per iteration; b / 2b or B / 2b or m samples."""
    data = _data()
    K = 3
    algo, _ = _algo(est, K=K, q=4)
    sampler = PG.make_sampler(data, 3, estimator=est, refresh_size=5)
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    for c in range(13):
        prev = state
        state, info = step(state, sampler(jax.random.key(0), c), jax.random.key(c))
        ds = np.asarray(state.samples - prev.samples)
        dc = np.asarray(state.comm_rounds - prev.comm_rounds)
        np.testing.assert_array_equal(dc, 0 if c == 0 else 2 * K)
        refresh = c == 0 or (est != "sa" and c % 4 == 0)
        if est == "sa":
            expect = np.full(N, 3)
        elif refresh:
            expect = COUNTS if est == "sr_finite" else np.full(N, 5)
        else:
            expect = np.full(N, 6)
        np.testing.assert_array_equal(ds, expect)
        np.testing.assert_array_equal(info.samples, state.samples)
    assert per_step


def test_prox_dsgd_matches_numpy_and_counts():
    data = _data()
    W = topology.mixing_matrix(topology.ring(N))
    Mk = gossip.chebyshev_matrix(W, 2)
    algo = PG.prox_dsgd(loss_fn, P.l1(R), gossip.chebyshev(W, 2), lr=0.05)
    batches = _batches(PG.make_sampler(data, 3), 10)
    x = np.asarray(_x0()["w"], np.float64)
    step = jax.jit(algo.step)
    state = algo.init(_x0())
    for c, bt in enumerate(batches):
        x = Mk @ _soft(x - 0.05 * _np_mini(x, data, bt), 0.05 * R)
        state, _ = step(state, bt, jax.random.key(c))
    np.testing.assert_allclose(state.x["w"], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.comm_rounds, 20)
    np.testing.assert_array_equal(state.samples, 30)


def test_mixing_helpers():
    W = topology.mixing_matrix(topology.ring(16))
    assert PG.auto_rounds(W) == 5
    assert PG.auto_rounds(topology.complete_matrix(8)) == 1
    assert PG.mixing_rounds(PG.chebyshev_auto(W)) == 5
    assert PG.mixing_rounds(gossip.sparse(W)) == 1
    mr = PG.multi_round(W, 3)
    assert PG.mixing_rounds(mr) == 3
    np.testing.assert_allclose(
        gossip.as_matrix(mr, 16), np.linalg.matrix_power(W, 3), atol=1e-6
    )


def test_stationarity_info_and_random_output():
    data = _data(counts=None)
    Xf = data.x.reshape(-1, D)
    yf = data.y.reshape(-1)

    def full_grad(p):
        return jax.grad(loss_fn)(p, (Xf, yf), None)

    algo, _ = _algo("sr_finite", full_grad=full_grad, output="random")
    sampler = PG.make_sampler(data, 3, estimator="sr_finite")
    state, hist = jd.run(
        algo, algo.init(_x0()), sampler, jax.random.key(0), 200, progress=False
    )
    s = hist.train["stationarity"]
    assert s[-1] < 0.05 * s[0]
    xb = jd.tree.worker_mean(state.x)
    g = PG.prox_grad_mapping(full_grad, P.l1(R), 0.05)(xb)
    np.testing.assert_allclose(float(g), s[-1], rtol=1e-4)
    assert PG.output_params(state)["w"].shape == (D,)
    assert hist.train["comm_rounds"][-1] == 2 * 2 * 199


def test_lasso_converges_to_sklearn():
    """Invariant 6: distributed lasso reaches scikit-learn's Lasso solution."""
    from sklearn.linear_model import Lasso

    r = np.random.default_rng(0)
    n, m, d, alpha = 4, 25, 8, 0.05
    X = r.normal(size=(n * m, d))
    w_true = np.where(r.random(d) < 0.5, 0.0, r.normal(size=d) * 2)
    y = X @ w_true + 0.1 * r.normal(size=n * m)
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100000).fit(X, y)

    def lsq(params, batch, key):
        Xb, yb = batch
        return 0.5 * jnp.mean(jnp.square(Xb @ params["w"] - yb))

    data = jd.data.from_worker_arrays(
        X.reshape(n, m, d).astype(np.float32), y.reshape(n, m).astype(np.float32)
    )
    W = topology.mixing_matrix(topology.ring(n))
    Xj, yj = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
    algo = PG.proxgt(
        lsq,
        P.l1(alpha),
        gossip.chebyshev(W, 2),
        estimator="sr_finite",
        lr=0.1,
        q=1,
        full_grad=lambda p: jax.grad(lsq)(p, (Xj, yj), None),
    )
    sampler = PG.make_sampler(data, 5, estimator="sr_finite")
    x0 = {"w": jnp.zeros((n, d))}
    state, hist = jd.run(
        algo, algo.init(x0), sampler, jax.random.key(0), 600, progress=False
    )
    np.testing.assert_allclose(jd.tree.worker_mean(state.x)["w"], ref.coef_, atol=1e-3)
    s = hist.train["stationarity"]
    assert s[-1] < 1e-8 and s[-1] < 1e-6 * s[0]
    # exact zeros where the lasso solution is zero
    zeros = np.abs(ref.coef_) == 0
    assert np.all(np.asarray(state.x["w"])[:, zeros] == 0)


def test_validation():
    W = topology.mixing_matrix(topology.ring(N))
    mix = gossip.chebyshev(W, 2)
    with pytest.raises(ValueError, match="estimator"):
        PG.proxgt(loss_fn, P.l1(R), mix, estimator="svrg", lr=0.1)
    with pytest.raises(ValueError, match="order"):
        PG.proxgt(loss_fn, P.l1(R), mix, order="atc", lr=0.1)
    with pytest.raises(ValueError, match="prox_step"):
        PG.proxgt(loss_fn, P.l1(R), mix, optimizer=optax.adam(0.1))
    with pytest.raises(ValueError, match="lr"):
        PG.prox_dsgd(loss_fn, P.l1(R), mix)
    algo = PG.proxgt(loss_fn, P.l1(R), mix, estimator="sr_online", lr=0.1)
    state = algo.init(_x0())
    with pytest.raises(ValueError, match="ProxGTBatch"):
        algo.step(state, (jnp.zeros((N, 2, D)), jnp.zeros((N, 2))), jax.random.key(0))
