"""Federated algorithms against plain NumPy loops of their equations, plus the
claims of issue 5: FedAvg = centralized SGD, SCAFFOLD's control variates and its
advantage on heterogeneous quadratics, personal leaves, client sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import adjusted_rand_score

import jaxdec as jd
from jaxdec import participation
from jaxdec.algorithms import federated as F

N, E, B, D = 5, 3, 4, 3


def lsq_loss(params, batch, key):
    """Mean squared error of a linear model ``a w + c`` (ONE client)."""
    a, y = batch
    return jnp.mean((a @ params["w"] + params["head"] - y) ** 2)


def _np_grad(w, c, a, y):
    r = a @ w + c - y
    return 2.0 * a.T @ r / len(y), 2.0 * r.mean()


def _data(rounds, n=N, e=E, seed=0):
    r = np.random.default_rng(seed)
    shift = r.normal(size=(n, 1, 1, 1))  # heterogeneous clients
    a = (r.normal(size=(rounds, n, e, B, D)) + shift[None]).astype(np.float32)
    w_true = r.normal(size=(n, D))
    y = np.einsum("rnebd,nd->rneb", a, w_true) + 0.1 * r.normal(size=(rounds, n, e, B))
    return a, y.astype(np.float32)


def _params(n=N, seed=1):
    r = np.random.default_rng(seed)
    one = {"w": r.normal(size=D).astype(np.float32), "head": np.float32(0.3)}
    return jd.tree.replicate(jax.tree.map(jnp.asarray, one), n)


def _run(algo, state, a, y):
    step = jax.jit(algo.step)
    infos = []
    for t in range(a.shape[0]):
        state, info = step(state, (a[t], y[t]), jax.random.key(t))
        infos.append(info)
    return state, infos


def test_fedavg_one_local_step_full_participation_is_centralized_sgd():
    a, y = _data(6, e=1)
    weights = np.array([1.0, 2.0, 3.0, 1.0, 5.0], np.float32)
    lr = 0.05
    algo = F.fedavg(lsq_loss, optax.sgd(lr))
    state, _ = _run(algo, algo.init(_params(), weights), a, y)
    c = weights / weights.sum()
    w, hd = np.asarray(_params()["w"][0], np.float64), 0.3
    for t in range(6):  # SGD on the union of the batches, data-size weighted
        gs = [_np_grad(w, hd, a[t, i, 0], y[t, i, 0]) for i in range(N)]
        w = w - lr * sum(c[i] * gs[i][0] for i in range(N))
        hd = hd - lr * sum(c[i] * gs[i][1] for i in range(N))
    np.testing.assert_allclose(state.server["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["w"], np.tile(w, (N, 1)), atol=1e-5)
    np.testing.assert_allclose(state.params["head"], hd, atol=1e-5)


@pytest.mark.parametrize(
    "mu,server_m,personal,k",
    [(0.0, None, False, 3), (0.2, 0.5, False, 3), (0.0, None, True, 2)],
    ids=["fedavg", "fedprox+fedavgm", "fedper"],
)
def test_fedavg_family_matches_numpy_loop(mu, server_m, personal, k):
    R, lr, beta = 5, 0.05, 0.5
    a, y = _data(R, seed=2)
    weights = np.array([3.0, 1.0, 2.0, 2.0, 4.0], np.float32)
    kw = dict(clients_per_round=k, seed=7, prox_mu=mu)
    if server_m is not None:
        kw["server_optimizer"] = optax.sgd(1.0, momentum=server_m)
    if personal:
        kw["personal"] = ("head",)
    algo = F.fedavg(lsq_loss, optax.sgd(lr, momentum=beta), **kw)
    state, infos = _run(algo, algo.init(_params(), weights), a, y)

    p0 = _params()
    srv_w, srv_c = np.asarray(p0["w"][0], np.float64), 0.3
    cw = np.tile(srv_w, (N, 1))
    cc = np.full(N, 0.3)
    mom_w, mom_c = np.zeros((N, D)), np.zeros(N)
    sm_w, sm_c = np.zeros(D), 0.0
    for t in range(R):
        mask = np.asarray(participation.round_mask(jax.random.key(7), t, N, k))
        np.testing.assert_array_equal(np.asarray(infos[t].participation) > 0, mask)
        idx = np.flatnonzero(mask)
        ys_w, ys_c = {}, {}
        for i in idx:
            w0, c0 = srv_w.copy(), (cc[i] if personal else srv_c)
            w, c = w0.copy(), c0
            for e in range(E):
                gw, gc = _np_grad(w, c, a[t, i, e], y[t, i, e])
                gw, gc = gw + mu * (w - w0), gc + mu * (c - c0)
                mom_w[i] = gw + beta * mom_w[i]
                mom_c[i] = gc + beta * mom_c[i]
                w, c = w - lr * mom_w[i], c - lr * mom_c[i]
            ys_w[i], ys_c[i] = w, c
        cn = weights[idx] / weights[idx].sum()
        avg_w = sum(cn[j] * ys_w[i] for j, i in enumerate(idx))
        avg_c = sum(cn[j] * ys_c[i] for j, i in enumerate(idx))
        if server_m is None:
            new_w, new_c = avg_w, avg_c
        else:
            sm_w = (srv_w - avg_w) + server_m * sm_w
            sm_c = (srv_c - avg_c) + server_m * sm_c
            new_w, new_c = srv_w - sm_w, srv_c - sm_c
        srv_w = new_w
        if not personal:
            srv_c = new_c
        for i in idx:
            cc[i] = ys_c[i] if personal else srv_c
        if not personal:
            cc[:] = srv_c
        cw[:] = srv_w
    np.testing.assert_allclose(state.params["w"], cw, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(state.params["head"], cc, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(state.server["w"], srv_w, rtol=1e-5, atol=2e-5)
    d = D + (0 if personal else 1)
    np.testing.assert_allclose(infos[-1].floats_sent, k / N * d, rtol=1e-6)


def test_personal_leaves_never_aggregated():
    a, y = _data(3, seed=3)
    algo = F.fedper(lsq_loss, optax.sgd(0.05), ("head",), clients_per_round=2)
    st0 = algo.init(_params())
    step = jax.jit(algo.step)
    st = st0
    for t in range(3):
        before = st
        st, info = step(st, (a[t], y[t]), jax.random.key(t))
        out = np.asarray(info.participation) == 0
        np.testing.assert_array_equal(  # non-participants: bit-identical heads
            np.asarray(st.params["head"])[out], np.asarray(before.params["head"])[out]
        )
        w = np.asarray(st.params["w"])
        np.testing.assert_array_equal(w, np.broadcast_to(w[0], w.shape))
    heads = np.asarray(st.params["head"])
    assert len(np.unique(heads)) > 1  # trained heads differ, never averaged


def _scaffold_np(a, y, x0, lr, k, seed, rounds):
    n = a.shape[1]
    x = x0.astype(np.float64).copy()
    ci = np.zeros((n, D + 1))
    c = np.zeros(D + 1)
    cs = []
    for t in range(rounds):
        idx = np.flatnonzero(
            np.asarray(participation.round_mask(jax.random.key(seed), t, n, k))
        )
        ys, dcs = [], []
        for i in idx:
            v = x.copy()
            for e in range(a.shape[2]):
                gw, gc = _np_grad(v[:D], v[D], a[t, i, e], y[t, i, e])
                g = np.append(gw, gc) - ci[i] + c
                v = v - lr * g
            new_ci = ci[i] - c + (x - v) / (a.shape[2] * lr)
            dcs.append(new_ci - ci[i])
            ci[i] = new_ci
            ys.append(v)
        x = np.mean(ys, axis=0)  # equal weights
        c = c + np.sum(dcs, axis=0) / n
        cs.append((c.copy(), ci.copy()))
    return x, c, ci, cs


def test_scaffold_matches_numpy_loop_and_control_variates_sum():
    R, lr, k = 4, 0.05, 3
    a, y = _data(R, seed=4)
    algo = F.scaffold(lsq_loss, optax.sgd(lr), local_lr=lr, clients_per_round=k, seed=3)
    st = algo.init(_params())
    step = jax.jit(algo.step)
    x0 = np.append(np.asarray(_params()["w"][0]), 0.3)
    x, c, ci, cs = _scaffold_np(a, y, x0, lr, k, 3, R)
    for t in range(R):
        st, info = step(st, (a[t], y[t]), jax.random.key(t))
        got_c = np.append(st.server_control["w"], st.server_control["head"])
        got_ci = np.concatenate(
            [st.control["w"], np.asarray(st.control["head"])[:, None]], axis=1
        )
        np.testing.assert_allclose(got_c, cs[t][0], atol=2e-4)
        np.testing.assert_allclose(got_ci, cs[t][1], atol=2e-4)
        # the paper's invariant: c = (1/n) sum_i c_i
        np.testing.assert_allclose(got_c, got_ci.mean(0), atol=1e-5)
    got_x = np.append(st.server["w"], st.server["head"])
    np.testing.assert_allclose(got_x, x, rtol=1e-4, atol=1e-5)
    d = D + 1
    np.testing.assert_allclose(info.floats_sent, 2 * k / N * d, rtol=1e-6)


def quad_loss(params, batch, key):
    """f_i(x) = 0.5 x^T A_i x - b_i^T x (deterministic)."""
    A, b = batch
    x = params["x"]
    return 0.5 * x @ A @ x - b @ x


def test_scaffold_beats_fedavg_on_heterogeneous_quadratics():
    n, d, Ei, R, lr = 8, 4, 10, 60, 0.05
    A, b = jd.data.heterogeneous_quadratics(n, d, seed=0, heterogeneity=2.0)
    x_star = jd.data.quadratic_optimum(A, b)
    batch = (
        jnp.broadcast_to(jnp.asarray(A)[:, None], (n, Ei, d, d)),
        jnp.broadcast_to(jnp.asarray(b)[:, None], (n, Ei, d)),
    )
    params = {"x": jnp.zeros((n, d))}
    dist = {}
    for name, algo in {
        "fedavg": F.fedavg(quad_loss, optax.sgd(lr)),
        "scaffold": F.scaffold(quad_loss, optax.sgd(lr), local_lr=lr),
    }.items():
        run = jax.jit(
            lambda s, algo=algo: jax.lax.fori_loop(
                0, R, lambda t, s: algo.step(s, batch, jax.random.key(0))[0], s
            )
        )
        st = run(algo.init(params))
        dist[name] = float(np.linalg.norm(np.asarray(st.server["x"]) - x_star))
    assert dist["scaffold"] < 1e-3
    assert dist["fedavg"] > 10 * dist["scaffold"]


def test_ifca_recovers_planted_groups():
    n, e, R = 8, 3, 30
    r = np.random.default_rng(0)
    truth = np.array([0, 1] * 4)
    w_true = np.array([[2.0, -1.0, 0.5], [-2.0, 1.0, -0.5]])
    a = r.normal(size=(R, n, e, 16, D)).astype(np.float32)
    y = np.einsum("rnebd,nd->rneb", a, w_true[truth]).astype(np.float32)
    params = jd.tree.replicate({"w": jnp.zeros(D), "head": jnp.zeros(())}, n)
    models = {
        "w": jnp.asarray(r.normal(size=(2, D)), jnp.float32),
        "head": jnp.zeros((2,)),
    }
    algo = F.ifca(lsq_loss, optax.sgd(0.05), 2)
    st, infos = _run(algo, algo.init(params, models=models), a, y)
    assert adjusted_rand_score(truth, np.asarray(st.cluster)) == 1.0
    for g in range(2):
        w = np.asarray(st.models["w"])[st.cluster[truth == g][0]]
        np.testing.assert_allclose(w, w_true[g], atol=0.05)
    assert int(infos[-1].num_clusters) == 2


def test_client_sampling_reproducible_and_unbiased():
    n, k, rounds = 20, 5, 10_000
    key = jax.random.key(11)
    masks = np.asarray(
        jax.jit(jax.vmap(lambda r: F.participants(key, r, n, k)[0]))(jnp.arange(rounds))
    )
    assert (masks.sum(1) == k).all()
    p = k / n
    se = np.sqrt(p * (1 - p) / rounds)
    assert np.all(np.abs(masks.mean(0) - p) < 3 * se)
    # the algorithm's rounds use exactly these masks; same seed, same clients
    a, y = _data(3, n=n)
    algo = F.fedavg(lsq_loss, optax.sgd(0.01), clients_per_round=k, seed=11)
    _, i1 = _run(algo, algo.init(_params(n)), a, y)
    for t in range(3):
        np.testing.assert_array_equal(np.asarray(i1[t].participation) > 0, masks[t])
    other = np.asarray(F.participants(jax.random.key(12), 0, n, k)[0])
    assert not np.array_equal(other, masks[0])


def test_validation_errors():
    p = _params()
    with pytest.raises(ValueError, match="round_sampler"):
        algo = F.fedavg(lsq_loss, optax.sgd(0.1))
        algo.step(
            algo.init(p), (jnp.zeros((N, B, D)), jnp.zeros((N,))), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="weights"):
        F.fedavg(lsq_loss, optax.sgd(0.1)).init(p, np.zeros(N))
    with pytest.raises(ValueError, match="clients_per_round"):
        F.fedavg(lsq_loss, optax.sgd(0.1), clients_per_round=N + 1).init(p)
    with pytest.raises(ValueError, match="local_lr"):
        F.scaffold(lsq_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="identical"):
        F.ifca(lsq_loss, optax.sgd(0.1), 2).init(p)
    with pytest.raises(ValueError, match="server_optimizer"):
        F.fedavg(lsq_loss, optax.sgd(0.1), server_optimizer="adam")
