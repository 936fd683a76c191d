"""FeDLRT and FedLin: NumPy references and the invariants of specs/fedlrt.md, 6."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import lowrank as L
from jaxdec.algorithms.fedlin import fedlin, round_sampler
from jaxdec.algorithms.fedlrt import fedlrt

LAM = 0.02


def ls_loss(params, batch, key=None):
    """0.5 / N sum ||x W (+ b) - y||^2 for one client."""
    x, y = batch
    pred = x @ params["W"]
    if "b" in params:
        pred = pred + params["b"][None]
    return 0.5 * jnp.sum(jnp.square(pred - y)) / x.shape[0]


def np_grad(W, X, Y):
    return X.T @ (X @ W - Y) / len(X)


def problem(C=3, N=24, n=8, m=8, s=3, b=8, seed=0):
    """Heterogeneous least squares; gradient batch = all data, local minibatches."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(C, N, n)) * np.exp(0.5 * rng.normal(size=(C, 1, n)))
    Y = np.einsum("cni,cij->cnj", X, rng.normal(size=(C, n, m)))
    rows = np.stack([rng.choice(N, size=(s, b)) for _ in range(C)])
    Xl = np.stack([X[c][rows[c]] for c in range(C)])
    Yl = np.stack([Y[c][rows[c]] for c in range(C)])
    W0 = rng.normal(size=(n, m)) @ np.diag(np.logspace(0, -1.5, m))
    return (X, Y), (Xl, Yl), W0


def as_jax(batch):
    return jax.tree.map(jnp.asarray, batch)


def weights_of(clients, w):
    p = np.asarray(w, float)[np.asarray(clients)]
    return p / p.sum()


def np_fedlin(W, gb, lb, corr, clients, p):
    (X, Y), (Xl, Yl) = gb, lb
    g = {c: np_grad(W, X[c], Y[c]) for c in clients}
    gbar = sum(pc * g[c] for c, pc in zip(clients, p, strict=True))
    out = 0
    for c, pc in zip(clients, p, strict=True):
        y = W.copy()
        for s in range(Xl.shape[1]):
            d = np_grad(y, Xl[c, s], Yl[c, s])
            if corr == "full":
                d = d + gbar - g[c]
            y = y - LAM * d
        out = out + pc * y
    return out


def np_fedlrt(U, S, V, gb, lb, corr, clients, p, theta_rel, r_min, r_max):
    """One FeDLRT round as plain NumPy (own QR / SVD); returns (W, r1, q)."""
    (X, Y), (Xl, Yl) = gb, lb
    n, r = U.shape
    m = V.shape[0]
    W = U @ S @ V.T
    G = {c: np_grad(W, X[c], Y[c]) for c in clients}
    GU = sum(pc * G[c] @ V @ S.T for c, pc in zip(clients, p, strict=True))
    GV = sum(pc * G[c].T @ U @ S for c, pc in zip(clients, p, strict=True))
    a = min(r, n - r, m - r)
    Ut = np.linalg.qr(np.hstack([U, GU - U @ (U.T @ GU)]))[0][:, : r + a]
    Vt = np.linalg.qr(np.hstack([V, GV - V @ (V.T @ GV)]))[0][:, : r + a]
    q = r + a
    St = np.zeros((q, q))
    St[:r, :r] = (Ut[:, :r].T @ U) @ S @ (V.T @ Vt[:, :r])  # QR signs
    Vc = {c: np.zeros((q, q)) for c in clients}
    if corr == "full":
        Gt = {c: Ut.T @ G[c] @ Vt for c in clients}
        Gbar = sum(pc * Gt[c] for c, pc in zip(clients, p, strict=True))
        Vc = {c: Gbar - Gt[c] for c in clients}
    elif corr == "simplified":
        GS = {c: Ut[:, :r].T @ G[c] @ Vt[:, :r] for c in clients}
        GSbar = sum(pc * GS[c] for c, pc in zip(clients, p, strict=True))
        for c in clients:
            Vc[c][:r, :r] = GSbar - GS[c]
    Sstar = 0
    for c, pc in zip(clients, p, strict=True):
        Sc = St.copy()
        for s in range(Xl.shape[1]):
            d = Ut.T @ np_grad(Ut @ Sc @ Vt.T, Xl[c, s], Yl[c, s]) @ Vt + Vc[c]
            Sc = Sc - LAM * d
        Sstar = Sstar + pc * Sc
    P, sig, Qt = np.linalg.svd(Sstar)
    theta = theta_rel * np.linalg.norm(sig)
    r1 = next((j for j in range(q) if np.linalg.norm(sig[j:]) < theta), q)
    r1 = int(np.clip(r1, r_min, r_max))
    W1 = Ut @ P[:, :r1] @ np.diag(sig[:r1]) @ Qt[:r1] @ Vt.T
    return W1, r1, q


def compact(state):
    f, r = state.params["W"], int(state.rank["W"])
    return (np.asarray(f[k]) for k in "USV"), r


@pytest.mark.parametrize("corr, k", [("full", None), ("none", 2)])
def test_fedlin_matches_numpy(corr, k):
    with jax.enable_x64(True):
        gb, lb, W0 = problem()
        w = [1.0, 2.0, 3.0]
        algo = fedlin(
            ls_loss,
            optax.sgd(LAM),
            local_steps=3,
            correction=corr,
            clients_per_round=k,
            weights=w,
        )
        state = algo.init({"W": jnp.asarray(W0)})
        step = jax.jit(algo.step)
        for t in range(2):
            W = np.asarray(state.params["W"])
            state, info = step(state, as_jax((gb, lb)), jax.random.key(t))
            cl = np.asarray(info.clients)
            assert len(cl) == (k or 3)
            ref = np_fedlin(W, gb, lb, corr, cl, weights_of(cl, w))
            np.testing.assert_allclose(state.params["W"], ref, rtol=1e-10, atol=1e-12)
            d = W0.size
            assert float(info.floats_up) == d * (2 if corr == "full" else 1)


@pytest.mark.parametrize("corr, k", [("full", None), ("simplified", 2), ("none", None)])
def test_fedlrt_matches_numpy(corr, k):
    """Whole rounds against the NumPy equations (augment, correction, local loop,
    exact aggregation, truncation), weighted and partial; floats formula."""
    with jax.enable_x64(True):
        gb, lb, W0 = problem()
        w = [1.0, 2.0, 3.0]
        kw = dict(r0=2, r_min=1, r_max=4, theta=0.1, correction=corr)
        algo = fedlrt(
            L.densified(ls_loss),
            optax.sgd(LAM),
            factorize="W",
            local_steps=3,
            clients_per_round=k,
            weights=w,
            **kw,
        )
        state = algo.init({"W": jnp.asarray(W0)})
        step = jax.jit(algo.step)
        n, m = W0.shape
        for t in range(3):
            (U, S, V), r = compact(state)
            U, S, V = U[:, :r], S[:r, :r], V[:, :r]
            state, info = step(state, as_jax((gb, lb)), jax.random.key(t))
            cl = np.asarray(info.clients)
            W1, r1, q = np_fedlrt(
                U, S, V, gb, lb, corr, cl, weights_of(cl, w), 0.1, 1, 4
            )
            got = np.asarray(L.reconstruct(state.params["W"]))
            np.testing.assert_allclose(got, W1, rtol=0, atol=1e-10 * np.abs(W1).max())
            assert int(info.rank["W"]) == r1 and int(info.aug_rank["W"]) == q
            a = q - r
            down = (n + m) * r + r * r + (n + m) * a + (q * q if corr == "full" else 0)
            up = (n + m) * r + q * q
            up += {"full": q * q, "simplified": r * r, "none": 0}[corr]
            assert float(info.floats_down) == down and float(info.floats_up) == up


@pytest.mark.parametrize(
    "corr, bias, k",
    [pytest.param("none", False, 2, marks=pytest.mark.slow), ("full", True, None)],
)
def test_full_rank_reduces_to_fedavg_and_fedlin(corr, bias, k):
    """r = n = m, theta = 0: FeDLRT rounds equal FedAvg / FedLin rounds."""
    with jax.enable_x64(True):
        gb, lb, W0 = problem(n=5, m=5)
        p0 = {"W": jnp.asarray(W0)}
        if bias:
            p0["b"] = jnp.linspace(-1, 1, 5)
        common = dict(local_steps=3, correction=corr, clients_per_round=k)
        A = fedlin(ls_loss, optax.sgd(LAM), **common)
        B = fedlrt(
            L.densified(ls_loss),
            optax.sgd(LAM),
            factorize="W",
            r0=5,
            r_min=1,
            r_max=5,
            theta=0.0,
            non_factorized="corrected" if corr == "full" else "train",
            **common,
        )
        sa, sb = A.init(p0), B.init(p0)
        step_a, step_b = jax.jit(A.step), jax.jit(B.step)
        for t in range(2):
            batch, key = as_jax((gb, lb)), jax.random.key(t)
            sa, _ = step_a(sa, batch, key)
            sb, ib = step_b(sb, batch, key)
            Wb = np.asarray(L.reconstruct(sb.params["W"]))
            np.testing.assert_allclose(Wb, sa.params["W"], atol=1e-8, rtol=0)
            if bias:
                np.testing.assert_allclose(sb.params["b"], sa.params["b"], atol=1e-8)
            assert int(ib.rank["W"]) == 5


def test_one_local_step_is_a_centralized_step():
    """s* = 1, full local gradients: S* = S~ - lambda grad_S~ L for every mode;
    with one client the full correction vanishes."""
    with jax.enable_x64(True):
        gb, _, W0 = problem(C=3, N=16)
        X, Y = gb
        lb = (X[:, None], Y[:, None])
        out = {}
        for corr in ("full", "simplified", "none"):
            algo = fedlrt(
                L.densified(ls_loss),
                optax.sgd(LAM),
                factorize="W",
                local_steps=1,
                r0=2,
                r_min=1,
                r_max=4,
                theta=0.0,
                correction=corr,
            )
            s0 = algo.init({"W": jnp.asarray(W0)})
            s1, _ = jax.jit(algo.step)(s0, as_jax((gb, lb)), jax.random.key(0))
            out[corr] = np.asarray(L.reconstruct(s1.params["W"]))
        # centralized: W - lambda P_U~ G P_V~ on span(U~), span(V~) (NumPy)
        (U, S, V), r = compact(s0)
        U, S, V = U[:, :r], S[:r, :r], V[:, :r]
        W = U @ S @ V.T
        G = np.mean([np_grad(W, X[c], Y[c]) for c in range(3)], axis=0)
        Ut = np.linalg.qr(np.hstack([U, G @ V @ S.T]))[0][:, : 2 * r]
        Vt = np.linalg.qr(np.hstack([V, G.T @ U @ S]))[0][:, : 2 * r]
        ref = W - LAM * Ut @ Ut.T @ G @ Vt @ Vt.T
        for corr, Wc in out.items():
            np.testing.assert_allclose(Wc, ref, atol=1e-10, err_msg=corr)
        # C = 1: V_c = 0, so the full correction gives the uncorrected round
        algo = fedlrt(
            L.densified(ls_loss),
            optax.sgd(LAM),
            factorize="W",
            local_steps=3,
            r0=2,
            r_min=1,
            r_max=4,
            theta=0.01,
            correction="full",
        )
        s = algo.init({"W": jnp.asarray(W0)})
        _, lb3, _ = problem(C=3, N=16)
        b1 = ((X[:1], Y[:1]), (lb3[0][:1], lb3[1][:1]))
        s, _ = jax.jit(algo.step)(s, as_jax(b1), jax.random.key(0))
        ref, _, _ = np_fedlrt(U, S, V, *b1, "none", [0], [1.0], 0.01, 1, 4)
        np.testing.assert_allclose(
            np.asarray(L.reconstruct(s.params["W"])), ref, atol=1e-10
        )


def test_descent_and_no_recompilation():
    """Experiment A's setting (n = m = 20, C = 4, heterogeneous Hessians, full
    local gradients, lambda = 0.5 / L_max): the full correction never increases
    the global loss; ranks move inside one trace of ``step``."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        C, N, n, k = 4, 200, 20, 3
        A, B = rng.normal(size=(n, k)), rng.normal(size=(n, k))
        X, Y = [], []
        for _ in range(C):
            D = 0.5 * rng.normal(size=(n, k)) @ rng.normal(size=(n, k)).T
            x = rng.normal(size=(N, n)) * np.exp(rng.normal(size=n))
            X.append(x)
            Y.append(x @ ((A @ B.T + D) / np.sqrt(k)))
        X, Y = np.stack(X), np.stack(Y)
        lmax = max(np.linalg.eigvalsh(x.T @ x / N).max() for x in X)
        algo = fedlrt(
            L.densified(ls_loss),
            optax.sgd(0.5 / lmax),
            factorize="W",
            local_steps=10,
            r0=2,
            r_min=2,
            r_max=10,
            theta=1e-3,
            correction="full",
        )
        state = algo.init({"W": jnp.asarray(0.01 * rng.normal(size=(n, n)))})
        batch = as_jax(((X, Y), (X[:, None].repeat(10, 1), Y[:, None].repeat(10, 1))))
        step_traces = []

        def counted(s, b, key):
            step_traces.append(1)
            return algo.step(s, b, key)

        step = jax.jit(counted)
        losses, ranks = [], []
        for t in range(25):
            state, info = step(state, batch, jax.random.key(t))
            losses.append(float(info.global_loss))
            ranks.append(int(info.rank["W"]))
        assert len(step_traces) == 1
        assert len(set(ranks)) > 2  # 2 -> 4 -> 8 -> 10
        losses = np.asarray(losses)
        assert np.all(np.diff(losses) <= 1e-12 * losses[:-1]), np.diff(losses)
        assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_compute_buckets_give_the_same_rounds():
    """Client passes on the narrowest prefix bucket = passes on the full capacity."""
    with jax.enable_x64(True):
        gb, lb, W0 = problem(n=12, m=12)
        res = []
        for B in (1, 2):
            algo = fedlrt(
                L.densified(ls_loss),
                optax.sgd(LAM),
                factorize="W",
                local_steps=3,
                r0=1,
                r_min=1,
                r_max=6,
                theta=0.05,
                clients_per_round=2,
                compute_buckets=B,
            )
            state = algo.init({"W": jnp.asarray(W0)})
            step = jax.jit(algo.step)
            ranks = []
            for t in range(3):
                state, info = step(state, as_jax((gb, lb)), jax.random.key(t))
                ranks.append(int(info.rank["W"]))
            res.append((ranks, np.asarray(L.reconstruct(state.params["W"]))))
        assert res[0][0] == res[1][0] and len(set(res[0][0])) > 1
        np.testing.assert_allclose(res[0][1], res[1][1], atol=1e-12)


@pytest.mark.slow
def test_network_round():
    """LowRank(MLP) in fp32 with partial participation and frozen non-factorized
    leaves: finite, orthonormal bases, ranks in bounds, head untouched."""
    model = jd.models.MLP(hidden=(32, 16), num_classes=5)
    x = jax.random.normal(jax.random.key(0), (200, 12))
    y = jnp.argmax(x[:, :5] + 0.3 * x[:, 5:10], axis=1).astype(jnp.int32)
    data = jd.data.stack(np.asarray(x), np.asarray(y), jd.data.iid(200, 4, 0))
    sampler = round_sampler(data, 8, 3, grad_batch_size=16)
    params = jax.jit(model.init)(jax.random.key(1), x[:1])["params"]
    algo = fedlrt(
        jd.models.classification_loss(L.LowRank(model)),
        optax.sgd(0.1),
        factorize=r"body/Dense_\d/kernel",
        local_steps=3,
        r0=3,
        r_min=2,
        theta=0.05,
        non_factorized="frozen",
        clients_per_round=2,
    )
    state = algo.init(params)
    step = jax.jit(lambda s, k: algo.step(s, sampler(k, s.count), k))
    for t in range(2):
        state, info = step(state, jax.random.key(t))
    assert bool(jnp.all(info.finite)) and info.clients.shape == (2,)
    for path, r in state.rank.items():
        assert 2 <= int(r) <= 8, path
    f = state.params["body"]["Dense_0"]["kernel"]
    K = f["U"].shape[1]
    assert K == 12  # 2 * min(12, 32) // 2
    eye = np.diag((np.arange(K) < int(state.rank["body/Dense_0/kernel"])) * 1.0)
    np.testing.assert_allclose(np.asarray(f["U"].T @ f["U"]), eye, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(state.params["head"]),
        jax.tree.leaves(params["head"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_fedlrt_validation():
    p = {"W": jnp.ones((6, 6)), "b": jnp.ones(6)}
    ok = dict(factorize="W", r0=2, r_min=1)
    for bad, match in [
        (dict(correction="partial"), "correction"),
        (dict(theta=-1.0), "theta"),
        (dict(theta_mode="rel"), "theta_mode"),
        (dict(r_min=3), "r_min <= r0"),
        (dict(local_steps=0), "local_steps"),
        (dict(compute_buckets=0), "compute_buckets"),
    ]:
        with pytest.raises(ValueError, match=match):
            fedlrt(ls_loss, optax.sgd(0.1), **{**ok, **bad})
    with pytest.raises(ValueError, match="r_max=7 exceeds"):
        fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "r_max": 7}).init(p)
    with pytest.raises(ValueError, match="r0 <= r_max"):
        fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "r0": 4}).init(p)
    with pytest.raises(ValueError, match="selected no parameter"):
        fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "factorize": "Z"}).init(p)
    with pytest.raises(ValueError, match="only 2-D"):
        fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "factorize": "b"}).init(p)
    with pytest.raises(ValueError, match="needs init"):
        fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "init": "random"}).init(p)
    s = fedlrt(ls_loss, optax.sgd(0.1), **{**ok, "init": "random"}).init(
        p, jax.random.key(0)
    )
    assert int(s.rank["W"]) == 2 and s.params["W"]["U"].shape == (6, 6)
    algo = fedlrt(ls_loss, optax.sgd(0.1), local_steps=2, **ok)
    s = algo.init(p)
    x = jnp.ones((3, 2, 4, 6))
    with pytest.raises(ValueError, match="local_steps"):
        algo.step(s, ((x[:, 0], x[:, 0]), (x[:, :1], x[:, :1])), jax.random.key(0))
    with pytest.raises(ValueError, match="pair"):
        algo.step(s, x, jax.random.key(0))
    with pytest.raises(ValueError, match="correction"):
        fedlin(ls_loss, optax.sgd(0.1), local_steps=1, correction="simplified")
    with pytest.raises(ValueError, match="weights"):
        fedlin(ls_loss, optax.sgd(0.1), local_steps=1, weights=[-1.0, 1.0])
