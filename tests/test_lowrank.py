"""jaxdec.lowrank: factorized layers, augmentation, truncation (specs/fedlrt.md, 6)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import lowrank as L
from jaxdec.models import MLP


def _factors(rng, n, m, r, K):
    W = rng.normal(size=(n, m)) @ np.diag(np.linspace(2, 0.1, m))
    return L.truncated_svd(jnp.asarray(W), r, K)


def _eye(q, K):
    return np.diag((np.arange(K) < q).astype(float))


def test_truncated_svd_prefix_layout():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        W = rng.normal(size=(7, 5))
        f = L.truncated_svd(jnp.asarray(W), 3, 6)
        U, S, V = (np.asarray(f[k]) for k in "USV")
        assert U.shape == (7, 6) and S.shape == (6, 6) and V.shape == (5, 6)
        np.testing.assert_allclose(U.T @ U, _eye(3, 6), atol=1e-12)
        np.testing.assert_allclose(V.T @ V, _eye(3, 6), atol=1e-12)
        assert np.all(S[3:] == 0) and np.all(S[:, 3:] == 0)
        sv = np.linalg.svd(W, compute_uv=False)
        err = np.linalg.norm(W - np.asarray(L.reconstruct(f)))
        np.testing.assert_allclose(err, np.linalg.norm(sv[3:]), rtol=1e-10)


@pytest.mark.parametrize(
    "n, m, r, K, x64",
    [
        (12, 9, 3, 8, True),
        (6, 6, 4, 8, True),
        pytest.param(40, 30, 5, 16, False, marks=pytest.mark.slow),
    ],
)
def test_augmentation_invariants(n, m, r, K, x64):
    """Orthonormality, exact model preservation, U~[:, :r] = U, span of G_U."""
    with jax.enable_x64(x64):
        rng = np.random.default_rng(n + r)
        f = _factors(rng, n, m, r, K)
        G = jnp.asarray(rng.normal(size=(n, m)), f["U"].dtype)
        GU = G @ f["V"] @ f["S"].T
        GV = G.T @ f["U"] @ f["S"]
        fa, q = L.augment(f, GU, GV, r)
        a = min(r, n - r, m - r, K - r)
        assert int(q) == r + a
        Ut, Vt = np.asarray(fa["U"]), np.asarray(fa["V"])
        tol = 1e-10 if x64 else 1e-5
        np.testing.assert_allclose(Ut.T @ Ut, _eye(r + a, K), atol=tol)
        np.testing.assert_allclose(Vt.T @ Vt, _eye(r + a, K), atol=tol)
        assert np.array_equal(Ut[:, :r], np.asarray(f["U"])[:, :r])
        assert np.array_equal(Vt[:, :r], np.asarray(f["V"])[:, :r])
        W0, W1 = np.asarray(L.reconstruct(f)), np.asarray(L.reconstruct(fa))
        np.testing.assert_allclose(W1, W0, atol=tol * np.abs(W0).max())
        if x64 and a == r:  # the full gradient directions fit
            for B, GB in ((Ut, np.asarray(GU)), (Vt, np.asarray(GV))):
                res = np.linalg.norm(GB - B @ (B.T @ GB))
                assert res <= 1e-8 * np.linalg.norm(GB)
        S_gal = np.asarray(L.galerkin(fa["U"], fa["V"], f))
        np.testing.assert_allclose(S_gal, np.asarray(f["S"]), atol=tol * 10)


def test_augmentation_rank_deficient_gradient():
    """(I - U U^T) G_U of low rank (here zero): any orthonormal completion."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        f = _factors(rng, 10, 8, 3, 8)
        GU = f["U"] @ jnp.asarray(rng.normal(size=(8, 8)))  # inside span(U)
        GU = jnp.where(jnp.arange(8) < 3, GU, 0)
        GV = jnp.zeros((8, 8))
        fa, q = L.augment(f, GU, GV, 3)
        assert int(q) == 6
        for B in (fa["U"], fa["V"]):
            np.testing.assert_allclose(np.asarray(B.T @ B), _eye(6, 8), atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(L.reconstruct(fa)), np.asarray(L.reconstruct(f)), atol=1e-12
        )


def _np_rule(sig, theta, r_min, r_max):
    """Reference: smallest j with ||sig[j:]|| < theta, clamped."""
    q = len(sig)
    j = next((j for j in range(q) if np.linalg.norm(sig[j:]) < theta), q)
    return int(np.clip(j, r_min, r_max))


@pytest.mark.parametrize(
    "theta, relative, r_min, r_max, deficient",
    [
        (0.3, False, 1, 8, False),
        (0.05, True, 1, 8, False),
        (0.9, True, 3, 8, False),  # clamped up by r_min
        (0.0, False, 1, 4, False),  # clamped down by r_max
        (0.0, False, 1, 8, True),  # theta = 0 on a rank-deficient S
    ],
)
def test_truncation_rule(theta, relative, r_min, r_max, deficient):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        n, m, K, q = 11, 9, 8, 6
        f = _factors(rng, n, m, 3, K)
        G = rng.normal(size=(n, m))
        fa, q_ = L.augment(
            f, jnp.asarray(G) @ f["V"] @ f["S"].T, jnp.asarray(G).T @ f["U"] @ f["S"], 3
        )
        assert int(q_) == q
        A = rng.normal(size=(q, q)) @ np.diag(np.logspace(0, -2, q))
        if deficient:
            A[:, -2:] = 0
        S = np.zeros((K, K))
        S[:q, :q] = A
        fs = dict(fa, S=jnp.asarray(S))
        trunc = jax.jit(
            lambda f, q, th: L.truncate(f, q, th, r_min, r_max, relative=relative)
        )
        ft, r1, tail = trunc(fs, q, theta)
        sig = np.linalg.svd(A, compute_uv=False)
        th = theta * np.linalg.norm(sig) if relative else theta
        r1 = int(r1)
        assert r1 == _np_rule(sig, th, r_min, r_max)
        assert r_min <= r1 <= min(r_max, q)
        if r_min < r1 < r_max and th > 0:  # minimality and the tolerance
            assert np.linalg.norm(sig[r1:]) < th
            assert np.linalg.norm(sig[r1 - 1 :]) >= th
        kept = np.diag(np.asarray(ft["S"]))[:r1]
        np.testing.assert_allclose(kept, sig[:r1], rtol=1e-12, atol=1e-14)
        assert np.all(np.diff(kept) <= 0)
        change = np.linalg.norm(np.asarray(L.reconstruct(fs) - L.reconstruct(ft)))
        np.testing.assert_allclose(change, np.linalg.norm(sig[r1:]), atol=1e-10)
        np.testing.assert_allclose(float(tail), np.linalg.norm(sig[r1:]), atol=1e-12)
        for B in (ft["U"], ft["V"]):
            np.testing.assert_allclose(np.asarray(B.T @ B), _eye(r1, K), atol=1e-10)
        if theta == 0.0 and r_max >= q:  # drops no singular value at all
            assert r1 == q


def test_truncation_rank_function():
    s = jnp.asarray([3.0, 2.0, 1.0, 0.5, 0.0, 0.0])
    # tails: ||(1, .5)|| = 1.118, ||.5|| = .5
    assert int(L.truncation_rank(s, 4, 1.2, 1, 6)) == 2
    assert int(L.truncation_rank(s, 4, 0.4, 1, 6)) == 4
    assert int(L.truncation_rank(s, 4, 0.6, 1, 6)) == 3
    assert int(L.truncation_rank(s, 4, 0.0, 1, 6)) == 4
    assert int(L.truncation_rank(s, 4, 100.0, 2, 6)) == 2


def _smooth_loss(W, X, Y):
    return jnp.sum(jnp.log(jnp.cosh(X @ W - Y))) + 0.1 * jnp.sum(jnp.sin(W))


def test_gradient_identities():
    """grad_U = G V S^T, grad_V = G^T U S, grad_S~ = U~^T G V~ (autodiff)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        n, m, r, K = 9, 7, 3, 6
        X = jnp.asarray(rng.normal(size=(20, n)))
        Y = jnp.asarray(rng.normal(size=(20, m)))
        f = _factors(rng, n, m, r, K)

        @jax.jit
        def grads(f):
            G = jax.grad(_smooth_loss)(L.reconstruct(f), X, Y)
            gf = jax.grad(lambda f: _smooth_loss(L.reconstruct(f), X, Y))(f)
            fa, _ = L.augment(f, gf["U"], gf["V"], r)
            gS = jax.grad(lambda S: _smooth_loss(L.reconstruct(dict(fa, S=S)), X, Y))(
                fa["S"]
            )
            return G, gf, fa, gS

        G, gf, fa, gS = grads(f)
        U, S, V = f["U"], f["S"], f["V"]
        for got, want in (
            (gf["U"], G @ V @ S.T),
            (gf["V"], G.T @ U @ S),
            (gf["S"], U.T @ G @ V),
            (gS, fa["U"].T @ G @ fa["V"]),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_lowrank_model_matches_dense_and_gradients():
    """LowRank(model) on factorize(params) = the dense model at full rank; its
    autodiff factor gradients follow the identities with the dense gradient."""
    with jax.enable_x64(True):
        model = MLP(hidden=(12, 10), num_classes=4)
        lrm = L.LowRank(model)
        x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64),
            jax.jit(model.init)(jax.random.key(1), x)["params"],
        )
        sel = r"body/Dense_1/kernel"
        lp = L.factorize(params, sel, rank=10, capacity=12)
        lp2 = L.factorize(params, sel, rank=2, capacity=12)
        assert L.is_factors(lp["body"]["Dense_1"]["kernel"])

        def loss(p, m):
            return jnp.sum(jnp.sin(m.apply({"params": p}, x)))

        @jax.jit
        def run(params, lp, lp2):
            out = {
                "dense": model.apply({"params": params}, x),
                "lowrank": lrm.apply({"params": lp}, x),
                "densified": model.apply({"params": L.densify(lp)}, x),
                "truncated": lrm.apply({"params": lp2}, x),
                "h_dense": model.apply({"params": params}, x, method="features"),
                "h_lowrank": lrm.apply({"params": lp}, x, method="features"),
            }
            G = jax.grad(loss)(params, model)["body"]["Dense_1"]["kernel"]
            gf = jax.grad(loss)(lp, lrm)["body"]["Dense_1"]["kernel"]
            return out, G, gf

        out, G, gf = run(params, lp, lp2)
        for k in ("lowrank", "densified"):
            np.testing.assert_allclose(out[k], out["dense"], atol=1e-10)
        np.testing.assert_allclose(out["h_lowrank"], out["h_dense"], atol=1e-10)
        assert np.abs(out["truncated"] - out["dense"]).max() > 1e-3
        f = lp["body"]["Dense_1"]["kernel"]
        U, S, V = f["U"], f["S"], f["V"]
        for got, want in (
            (gf["U"], G @ V @ S.T),
            (gf["V"], G.T @ U @ S),
            (gf["S"], U.T @ G @ V),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
        # initializing the wrapper gives the dense params of the model
        p_init = jax.jit(lrm.init)(jax.random.key(1), x)["params"]
        assert jax.tree.structure(p_init) == jax.tree.structure(params)


def test_lowrank_dense_layer():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return L.LowRankDense(6, rank=2, capacity=4)(x)

    x = jnp.ones((3, 5))
    p = jax.jit(Net().init)(jax.random.key(0), x)["params"]
    k = p["LowRankDense_0"]["kernel"]
    assert L.is_factors(k) and k["U"].shape == (5, 4) and k["S"].shape == (4, 4)
    np.testing.assert_allclose(np.asarray(k["U"].T @ k["U"]), _eye(2, 4), atol=1e-5)
    y = Net().apply({"params": p}, x)
    dense = L.densify(p)["LowRankDense_0"]["kernel"]
    np.testing.assert_allclose(
        y, x @ dense + p["LowRankDense_0"]["bias"][None], atol=1e-5
    )
    assert np.linalg.matrix_rank(np.asarray(dense), tol=1e-5) == 2


def test_random_factors_are_galerkin():
    with jax.enable_x64(True):
        W = jnp.asarray(np.random.default_rng(5).normal(size=(9, 7)))
        f = L.random_factors(jax.random.key(0), W, 3, 6)
        U, S, V = (np.asarray(f[k]) for k in "USV")
        np.testing.assert_allclose(U.T @ U, _eye(3, 6), atol=1e-12)
        np.testing.assert_allclose(V.T @ V, _eye(3, 6), atol=1e-12)
        np.testing.assert_allclose(S, U.T @ np.asarray(W) @ V, atol=1e-12)


def test_factorize_errors():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match="matched no parameter"):
        L.factorize(params, "nothing", rank=2)
    with pytest.raises(ValueError, match="only 2-D"):
        L.factorize(params, "b", rank=1)
    with pytest.raises(ValueError, match="exceeds"):
        L.factorize(params, "w", rank=4)
    with pytest.raises(ValueError, match="regular expression"):
        L.factorize(params, 3, rank=1)
