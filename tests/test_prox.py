"""jaxdec.prox: closed forms, brute-force minimizers, firm non-expansiveness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from jaxdec import prox as P

D = 6


def _tree(v):
    v = np.asarray(v, np.float32)
    return {"a": jnp.asarray(v[:2].reshape(1, 2)), "b": (jnp.asarray(v[2:]),)}


def _vec(tree):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    )


def _soft(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def _proj_l1_bisect(x, rho):
    if np.abs(x).sum() <= rho:
        return x
    lo, hi = 0.0, np.abs(x).max()
    for _ in range(200):
        th = 0.5 * (lo + hi)
        if np.maximum(np.abs(x) - th, 0).sum() > rho:
            lo = th
        else:
            hi = th
    return _soft(x, 0.5 * (lo + hi))


# (prox, closed form in NumPy on the flat vector, h in NumPy or None for indicator,
#  constraint for brute force)
CASES = {
    "zero": (P.zero(), lambda x, a: x, lambda z: 0.0),
    "l1": (P.l1(0.3), lambda x, a: _soft(x, 0.3 * a), lambda z: 0.3 * np.abs(z).sum()),
    "l2_tree": (
        P.l2(0.5),
        lambda x, a: max(1 - 0.5 * a / np.linalg.norm(x), 0) * x,
        lambda z: 0.5 * np.linalg.norm(z),
    ),
    "elastic_net": (
        P.elastic_net(0.2, 0.7),
        lambda x, a: _soft(x, 0.2 * a) / (1 + 0.7 * a),
        lambda z: 0.2 * np.abs(z).sum() + 0.35 * (z @ z),
    ),
    "nonneg": (P.nonneg(), lambda x, a: np.maximum(x, 0), None),
    "box": (P.box(-0.4, 0.6), lambda x, a: np.clip(x, -0.4, 0.6), None),
    "l2_ball": (
        P.l2_ball(0.8),
        lambda x, a: x * min(1.0, 0.8 / np.linalg.norm(x)),
        None,
    ),
    "l1_ball": (P.l1_ball(0.9), lambda x, a: _proj_l1_bisect(x, 0.9), None),
}


def _inputs(seed, k=20):
    r = np.random.default_rng(seed)
    return r.normal(size=(k, D)) * r.choice([0.1, 1.0, 3.0], size=(k, 1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_prox_equals_closed_form(name):
    prox, closed, _ = CASES[name]
    f = jax.jit(prox.fn)
    for x in _inputs(0):
        for a in (0.1, 1.0, 2.5):
            got = _vec(f(_tree(x), a))
            np.testing.assert_allclose(got, closed(x.astype(np.float32), a), atol=1e-5)


def _brute(x, a, h, prox_name):
    """argmin_z h(z) + ||z - x||^2 / (2a) by a generic solver."""
    cons = {
        "nonneg": [{"type": "ineq", "fun": lambda z: z}],
        "box": [
            {"type": "ineq", "fun": lambda z: z + 0.4},
            {"type": "ineq", "fun": lambda z: 0.6 - z},
        ],
        "l2_ball": [{"type": "ineq", "fun": lambda z: 0.64 - z @ z}],
    }
    if prox_name == "l1_ball":  # split z = p - m, p, m >= 0: a smooth QP

        def obj(pm):
            z = pm[:D] - pm[D:]
            return (z - x) @ (z - x) / (2 * a)

        res = minimize(
            obj,
            np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)]) * 0.1,
            method="SLSQP",
            bounds=[(0, None)] * (2 * D),
            constraints=[{"type": "ineq", "fun": lambda pm: 0.9 - pm.sum()}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        return res.x[:D] - res.x[D:]
    if h is None:
        res = minimize(
            lambda z: (z - x) @ (z - x) / (2 * a),
            np.zeros(D),
            method="SLSQP",
            constraints=cons[prox_name],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        return res.x
    # non-smooth h: compare objective values from a derivative-free solver
    res = minimize(
        lambda z: h(z) + (z - x) @ (z - x) / (2 * a),
        x,
        method="Powell",
        options={"xtol": 1e-10, "ftol": 1e-14, "maxiter": 20000},
    )
    return res.x


@pytest.mark.parametrize("name", sorted(CASES))
def test_prox_is_a_minimizer(name):
    prox, _, h = CASES[name]
    for x in _inputs(1, k=5):
        a = 0.7
        z = _vec(prox(_tree(x), a))
        zb = _brute(x, a, h, name)
        if h is None:  # projection: same point
            np.testing.assert_allclose(z, zb, atol=1e-5)
        else:  # objective no worse than the generic solver's, and point close
            obj = lambda u, x=x, a=a: h(u) + (u - x) @ (u - x) / (2 * a)  # noqa: E731
            assert obj(z) <= obj(zb) + 1e-6
            np.testing.assert_allclose(z, zb, atol=1e-3)
        # prox.value agrees with h (finite on its domain)
        hv = float(prox.value(_tree(z)))
        assert np.isfinite(hv)
        if h is not None:
            np.testing.assert_allclose(hv, h(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prox_variational_inequality(name):
    """z = prox_{ah}(x) iff h(w) >= h(z) + <(x - z)/a, w - z> for all w."""
    prox, _, _ = CASES[name]
    r = np.random.default_rng(2)
    for x in _inputs(3, k=5):
        a = 0.5
        z = _vec(prox(_tree(x), a))
        hz = float(prox.value(_tree(z)))
        for _ in range(50):
            w = z + r.normal(size=D) * r.choice([1e-3, 0.1, 1.0])
            hw = float(prox.value(_tree(w)))
            assert hw >= hz + (x - z) @ (w - z) / a - 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_prox_firmly_nonexpansive(name):
    prox, _, _ = CASES[name]
    xs, ys = _inputs(4), _inputs(5)
    for x, y in zip(xs, ys, strict=True):
        px, py = _vec(prox(_tree(x), 0.8)), _vec(prox(_tree(y), 0.8))
        assert (px - py) @ (x - y) >= (px - py) @ (px - py) - 1e-5


def test_l2_leaf_groups_and_masked():
    t = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    out = P.l2(1.0, group="leaf")(t, 1.0)
    np.testing.assert_allclose(out["w"], [3 * 0.8, 4 * 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.0, 0.0], atol=1e-7)
    m = P.masked(P.l1(1.0), {"w": True, "b": False})
    out = m(t, 0.5)
    np.testing.assert_allclose(out["w"], [2.5, 3.5])
    np.testing.assert_allclose(out["b"], [0.3, 0.4])
    assert float(m.value(t)) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="mask"):
        m({"w": t["w"]}, 1.0)


def test_l1_ball_inside_and_edge_cases():
    x = {"a": jnp.array([0.1, -0.2])}
    np.testing.assert_allclose(P.l1_ball(1.0)(x, 1.0)["a"], [0.1, -0.2])
    np.testing.assert_allclose(P.l1_ball(0.0)(x, 1.0)["a"], [0.0, 0.0], atol=1e-7)
    out = P.l1_ball(0.5)({"a": jnp.array([2.0, 0.0, -1.0])}, 1.0)["a"]
    np.testing.assert_allclose(out, [0.5, 0.0, 0.0], atol=1e-6)


def test_separable_lasso_stationarity():
    """min 0.5||x - c||^2 + r||x||_1: x* = soft(c, r) and G_a(x*) = 0."""
    c = np.random.default_rng(6).normal(size=50).astype(np.float32)
    r = 0.4
    xs = P.l1(r)({"x": jnp.asarray(c)}, 1.0)["x"]
    np.testing.assert_allclose(xs, _soft(c, r), atol=1e-6)
    for a in (0.1, 0.5, 1.0):
        g = xs - P.l1(r)({"x": xs - a * (xs - c)}, a)["x"]
        assert float(jnp.max(jnp.abs(g / a))) < 1e-6


def test_validation_and_density():
    with pytest.raises(ValueError):
        P.l1(-1.0)
    with pytest.raises(ValueError):
        P.box(1.0, 0.0)
    with pytest.raises(ValueError):
        P.l2(1.0, group="row")
    assert float(P.density({"a": jnp.array([0.0, 1.0, 0.0, 2.0])})) == 0.5
