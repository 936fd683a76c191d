"""jaxdec.clustering against NumPy / SciPy references and the FedTSDP sheet's
invariants (section 6, items 1-3 and the averaging matrix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import adjusted_rand_score

from jaxdec import clustering as C

LN2 = np.log(2.0)


def _probs(rng, shape, zeros=0.0):
    p = rng.dirichlet(np.full(shape[-1], 0.5), size=shape[:-1])
    if zeros:
        p = np.where(rng.uniform(size=p.shape) < zeros, 0.0, p)
        p[..., 0] += p.sum(-1) == 0  # keep every row a distribution
        p = p / p.sum(-1, keepdims=True)
    return p.astype(np.float32)


# ---------------------------------------------------------------- JS divergence


def test_js_matches_scipy_and_basic_properties():
    rng = np.random.default_rng(0)
    p, q = _probs(rng, (200, 10), zeros=0.3), _probs(rng, (200, 10), zeros=0.3)
    js = np.asarray(C.js_divergence(p, q))
    ref = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q, strict=True)])
    np.testing.assert_allclose(js, ref, atol=1e-6)
    assert np.isfinite(js).all()
    np.testing.assert_array_equal(js, np.asarray(C.js_divergence(q, p)))  # symmetric
    assert (js >= 0).all() and (js <= LN2).all()
    np.testing.assert_array_equal(np.asarray(C.js_divergence(p, p)), 0.0)
    e = np.eye(10, dtype=np.float32)
    np.testing.assert_allclose(C.js_divergence(e[0], e[3]), LN2, rtol=1e-7)
    # zero iff equal: distinct distributions are strictly positive
    assert (js[np.abs(p - q).sum(1) > 1e-3] > 0).all()


def test_sqrt_js_triangle_inequality():
    rng = np.random.default_rng(1)
    a, b, c = (_probs(rng, (1000, 6), zeros=0.2) for _ in range(3))
    d = lambda x, y: np.sqrt(np.asarray(C.js_divergence(x, y), np.float64))  # noqa: E731
    assert (d(a, c) <= d(a, b) + d(b, c) + 1e-6).all()


def test_pairwise_js_equals_loop_and_distances():
    rng = np.random.default_rng(2)
    P = _probs(rng, (7, 5, 4), zeros=0.2)
    ref = np.zeros((7, 7))
    for i in range(7):
        for j in range(7):
            ref[i, j] = np.mean(
                [jensenshannon(P[i, s], P[j, s]) ** 2 for s in range(5)]
            )
    for chunk in (None, 3):
        J = np.asarray(C.pairwise_js(P, chunk=chunk))
        np.testing.assert_allclose(J, ref, atol=1e-6)
        np.testing.assert_array_equal(J, J.T)
        np.testing.assert_array_equal(np.diag(J), 0.0)
    np.testing.assert_allclose(C.js_distances(P), np.sqrt(ref), atol=1e-3)


def test_skew_score_reference_values():
    h = np.zeros((4, 10))
    h[0, 3] = 50  # one class
    h[1, [1, 2]] = 20  # two balanced classes
    h[2] = 7  # uniform
    h[3] = np.arange(1, 11)
    s = np.asarray(C.skew_score(h))
    u = np.full(10, 0.1)
    ref = [jensenshannon(r / r.sum(), u) ** 2 / LN2 for r in h]
    np.testing.assert_allclose(s, ref, atol=1e-6)
    np.testing.assert_allclose(s[:3], [0.758, 0.610, 0.0], atol=2e-3)


# ---------------------------------------------------------------------- Hopkins


def _hopkins_np(points, idx, w, e):
    """The sheet's definition with the same draws (NumPy reference)."""
    u = np.sqrt(((w[:, None] - points[None]) ** 2).sum(-1)).min(1)
    d = np.sqrt(((points[idx][:, None] - points[None]) ** 2).sum(-1))
    d[np.arange(len(idx)), idx] = np.inf
    v = d.min(1)
    return (u**e).sum() / ((u**e).sum() + (v**e).sum())


def test_hopkins_matches_reference_and_is_deterministic():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(60, 3)).astype(np.float32)
    key = jax.random.key(5)
    h = float(C.hopkins(key, Z, 10, exponent=2.0))
    assert h == float(C.hopkins(key, Z, 10, exponent=2.0))
    k_pick, k_unif = jax.random.split(key)
    idx = np.asarray(jax.random.choice(k_pick, 60, (10,), replace=False))
    lo, hi = Z.min(0), Z.max(0)
    w = np.asarray(jax.random.uniform(k_unif, (10, 3))) * (hi - lo) + lo
    np.testing.assert_allclose(h, _hopkins_np(Z, idx, w, 2.0), rtol=1e-5)
    assert 0.0 <= h <= 1.0


_hop20 = jax.jit(lambda keys, Z: jax.lax.map(lambda k: C.hopkins(k, Z, 200), keys))


@pytest.mark.parametrize("d", [2, 10])
def test_hopkins_uniform_is_one_half(d):
    rng = np.random.default_rng(d)
    Z = rng.uniform(size=(2000, d)).astype(np.float32)
    hs = _hop20(jax.random.split(jax.random.key(0), 20), Z)
    assert abs(float(jnp.mean(hs)) - 0.5) < 0.05


def test_hopkins_clustered_invariances():
    rng = np.random.default_rng(4)
    centers = 10.0 * np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    Z = (centers[rng.integers(4, size=2000)] + rng.normal(size=(2000, 2))).astype(
        np.float32
    )
    key = jax.random.key(1)
    hop = jax.jit(
        lambda Z: (
            [C.hopkins(key, Z, 200, exponent=e) for e in (1.0, 2.0)]
            + [C.hopkins_mean(key, Z, 50, repeats=4)]
        )
    )
    h1, h2, h = (float(v) for v in hop(Z))
    assert h1 > 0.9 and h2 > 0.9
    moved = float(hop(2.5 * Z + np.float32(3.0))[2])
    assert abs(h - moved) < 1e-6


# ------------------------------------------------------------------- clustering


def _planted(rng, sizes, n_samples=30, k=10):
    """Client predictions: groups far apart in JS (>= 0.3), members close (<= 0.01)."""
    P, truth = [], []
    for g, m in enumerate(sizes):
        base = np.full((n_samples, k), 0.02)
        base[:, (3 * g) % k] += 0.8
        base /= base.sum(-1, keepdims=True)
        for _ in range(m):
            noisy = base * np.exp(0.05 * rng.normal(size=base.shape))
            P.append(noisy / noisy.sum(-1, keepdims=True))
            truth.append(g)
    return np.asarray(P, np.float32), np.asarray(truth)


def test_planted_groups_recovered_exactly_and_permutation_equivariant():
    rng = np.random.default_rng(5)
    P, truth = _planted(rng, [5, 4, 6, 5])
    J = np.asarray(C.pairwise_js(P))
    same = truth[:, None] == truth[None, :]
    assert J[~same].min() >= 0.3 and J[same].max() <= 0.01
    D = np.asarray(C.js_distances(P))
    labels, k, s = C.best_silhouette(D, range(2, 11))
    assert k == 4 and adjusted_rand_score(truth, labels) == 1.0
    coarse, fine, _ = C.two_stage(D, None)
    assert adjusted_rand_score(truth, coarse) == 1.0
    np.testing.assert_array_equal(coarse, fine)
    perm = rng.permutation(len(truth))
    lab_p, _, _ = C.best_silhouette(D[np.ix_(perm, perm)], range(2, 11))
    assert adjusted_rand_score(labels[perm], lab_p) == 1.0
    # threshold cut: clusters merge below the gap between groups
    lab_t = C.agglomerative(D, threshold=0.3)
    assert adjusted_rand_score(truth, lab_t) == 1.0


def test_identical_clients_share_a_cluster():
    rng = np.random.default_rng(6)
    P = _probs(rng, (9, 8, 5))
    P[4] = P[1]
    P[7] = P[1]
    D = np.asarray(C.js_distances(P))
    for k in range(2, 8):
        lab = C.agglomerative(D, n_clusters=k)
        assert lab[1] == lab[4] == lab[7]


def test_two_stage_splits_by_cosine_inside_a_coarse_cluster():
    rng = np.random.default_rng(7)
    P, truth = _planted(rng, [8, 5])
    # coarse cluster 0 hides two subgroups whose updates point different ways
    dirs = rng.normal(size=(2, 2000))
    sub = np.array([0, 0, 0, 0, 1, 1, 1, 1] + [0] * 5)
    X = dirs[sub] + 0.05 * rng.normal(size=(13, 2000))
    # coarse cluster 1: isotropic noise, nearly equal distances, no 2-group structure
    X[8:] = rng.normal(size=2000) + 0.3 * rng.normal(size=(5, 2000))
    D2 = np.asarray(C.cosine_distances(X))
    coarse, fine, det = C.two_stage(
        np.asarray(C.js_distances(P)), D2, min_silhouette=0.1
    )
    assert adjusted_rand_score(truth, coarse) == 1.0
    want = np.array([0] * 4 + [1] * 4 + [2] * 5)
    assert adjusted_rand_score(want, fine) == 1.0
    assert [s["accepted"] for s in det["splits"]] == [True, False]
    # a member without an update joins the fine group nearest in stage-1 distance
    coarse2, fine2, _ = C.two_stage(
        np.asarray(C.js_distances(P)), D2, fine_members=np.arange(13) != 0
    )
    assert fine2[0] in (fine2[1], fine2[4])


def test_labels_to_matrix():
    labels = np.array([0, 1, 0, 2, 1, 0])
    w = np.array([1.0, 2.0, 3.0, 1.0, 1.0, 4.0], np.float32)
    m = np.array([1, 1, 1, 1, 0, 0], bool)
    A = np.asarray(C.labels_to_matrix(labels, w, m))
    ref = np.zeros((6, 6))
    for k in range(6):
        c = (labels == labels[k]) * w * m
        ref[k] = c / c.sum() if c.sum() > 0 else np.eye(6)[k]
    np.testing.assert_allclose(A, ref, rtol=1e-6)
    np.testing.assert_allclose(A.sum(1), 1.0, rtol=1e-6)
    A2 = np.asarray(C.labels_to_matrix(np.array([0, 0, 1]), mask=np.array([0, 0, 1])))
    np.testing.assert_array_equal(A2, np.eye(3))  # no contributor: identity rows


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n_clusters or threshold|exactly one"):
        C.agglomerative(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        C.agglomerative(np.full((3, 3), np.nan), n_clusters=2)
    with pytest.raises(ValueError, match="q must be"):
        C.hopkins(jax.random.key(0), np.zeros((5, 2)), 9)
    with pytest.raises(ValueError, match=r"\[C, N, K\]"):
        C.pairwise_js(np.zeros((2, 3, 4, 5)))
