"""Mixing functions: equivalences, mean preservation, Chebyshev bounds, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec as jd
from jaxdec import gossip as G
from jaxdec import topology as T


def _tree(n, seed=0):
    r = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(r.normal(size=(n, 3, 2)), jnp.float32),
        "b": [jnp.asarray(r.normal(size=(n,)), jnp.float32)],
    }


def _np_apply(W, tree):
    return jax.tree.map(lambda x: np.tensordot(W, np.asarray(x), axes=1), tree)


def _assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


GRAPH_W = {
    "ring": T.mixing_matrix(T.ring(10)),
    "exponential": T.mixing_matrix(T.exponential(10)),
    "erdos_renyi": T.mixing_matrix(T.erdos_renyi(10, 0.3, seed=1)),
    "star": T.mixing_matrix(T.star(10), "max_degree"),
    "torus": T.mixing_matrix(T.torus(2, 5)),
}


@pytest.mark.parametrize("name", sorted(GRAPH_W))
def test_dense_and_sparse_equal_numpy(name):
    W = GRAPH_W[name]
    x = _tree(10)
    ref = _np_apply(W, x)
    _assert_tree_close(G.dense(W)(x, 0), ref, rtol=1e-5, atol=1e-6)
    _assert_tree_close(G.sparse(W)(x, 0), ref, rtol=1e-5, atol=1e-6)


def test_sparse_uses_rolls_for_circulant_and_gather_otherwise():
    assert "circulant" in G.sparse(GRAPH_W["ring"]).name
    assert "gather" in G.sparse(GRAPH_W["erdos_renyi"]).name


def _mean_preserving_mixers(n):
    W = T.mixing_matrix(T.ring(n))
    return {
        "dense": G.dense(W),
        "sparse": G.sparse(W),
        "time_varying": G.time_varying(T.one_peer_exponential(n)),
        "random_matching": G.random_matching(n, seed=3),
        "random_matching_p": G.random_matching(n, seed=3, p=0.4),
        "chebyshev": G.chebyshev(W, 5),
        "fastmix": G.chebyshev(W, 5, method="fastmix"),
        "every": G.every(3, G.sparse(W)),
        "schedule": G.schedule([2, 5], [G.sparse(W), G.identity(), G.complete()]),
        "complete": G.complete(),
    }


@pytest.mark.parametrize("n", [8, 9])
@pytest.mark.parametrize("name", sorted(_mean_preserving_mixers(8)))
def test_doubly_stochastic_mixers_preserve_mean(name, n):
    mix = _mean_preserving_mixers(n)[name]
    x = _tree(n, seed=1)
    for step in range(7):
        y = jax.jit(mix)(x, jnp.int32(step))
        _assert_tree_close(jd.tree.worker_mean(y), jd.tree.worker_mean(x), atol=2e-6)
        x = y


def test_random_matching_is_a_matching_and_deterministic():
    n = 11
    mix = G.random_matching(n, seed=5)
    for step in range(5):
        M = G.as_matrix(mix, n, step)
        np.testing.assert_allclose(M, M.T)
        np.testing.assert_allclose(M.sum(0), 1.0)
        # each row: either e_i (idle) or (e_i + e_j) / 2
        idle = np.isclose(np.diag(M), 1.0)
        assert idle.sum() == 1  # n odd -> exactly one idles when p = 1
        assert set(np.round(M[~idle].max(1), 6)) == {0.5}
        np.testing.assert_array_equal(M, G.as_matrix(mix, n, step))
    assert not np.array_equal(G.as_matrix(mix, n, 0), G.as_matrix(mix, n, 1))
    sends = np.asarray(mix.sends(jnp.int32(0), n))
    assert sends.sum() == n - 1


def test_time_varying_cycles():
    n = 8
    mats = T.one_peer_exponential(n)
    mix = G.time_varying(mats)
    for step in range(7):
        np.testing.assert_allclose(
            G.as_matrix(mix, n, step), mats[step % len(mats)], atol=1e-7
        )


def test_every_and_schedule_switch_on_step():
    n = 6
    W = T.mixing_matrix(T.ring(n))
    ev = G.every(3, G.dense(W))
    for step in range(7):
        expected = W if (step + 1) % 3 == 0 else np.eye(n)
        np.testing.assert_allclose(G.as_matrix(ev, n, step), expected, atol=1e-7)
    sch = G.schedule([4], [G.dense(W), G.complete()])
    np.testing.assert_allclose(G.as_matrix(sch, n, 3), W, atol=1e-7)
    np.testing.assert_allclose(
        G.as_matrix(sch, n, 4), np.full((n, n), 1 / n), atol=1e-7
    )
    sends = [float(jnp.mean(ev.sends(jnp.int32(s), n))) for s in range(3)]
    assert sends == [0.0, 0.0, 2.0]


def _cheb_T(K, z):
    return np.cosh(K * np.arccosh(z))


@pytest.mark.parametrize("K", [1, 2, 3, 10, 20])
def test_chebyshev_norm_matches_theory(K):
    W = T.mixing_matrix(T.ring(16))
    lam = T.second_largest_eigenvalue(W)
    assert lam == pytest.approx(0.9493, abs=1e-4)
    M = G.chebyshev_matrix(W, K)
    J = np.full((16, 16), 1 / 16)
    np.testing.assert_allclose(M, M.T, atol=1e-10)
    np.testing.assert_allclose(M.sum(1), 1.0, atol=1e-10)
    assert np.linalg.norm(M - J, 2) == pytest.approx(1 / _cheb_T(K, 1 / lam), abs=1e-8)
    if K == 1:
        np.testing.assert_allclose(M, W, atol=1e-12)
    else:
        assert np.linalg.norm(M - J, 2) < lam**K
    # the jitted float32 mixer applies the same matrix
    np.testing.assert_allclose(G.as_matrix(G.chebyshev(W, K), 16), M, atol=1e-5)


def test_chebyshev_spec_numbers():
    W = T.mixing_matrix(T.ring(16))
    J = np.full((16, 16), 1 / 16)
    M2 = G.chebyshev_matrix(W, 2)
    assert np.linalg.norm(M2 - J, 2) == pytest.approx(0.8200, abs=1e-4)
    assert M2.min() == pytest.approx(-0.213, abs=1e-3)
    assert np.linalg.norm(G.chebyshev_matrix(W, 10) - J, 2) == pytest.approx(
        0.0770, abs=1e-4
    )
    assert np.linalg.norm(np.linalg.matrix_power(W, 10) - J, 2) == pytest.approx(
        0.594, abs=1e-3
    )


@pytest.mark.parametrize("K", [2, 4, 8])
def test_chebyshev_contracts_consensus_error_as_bounded(K):
    n = 16
    W = T.mixing_matrix(T.ring(n))
    lam = T.second_largest_eigenvalue(W)
    bound = (1 / _cheb_T(K, 1 / lam)) ** 2
    mix = G.chebyshev(W, K)
    for seed in range(5):
        x = _tree(n, seed)
        before = float(jd.tree.consensus_distance(x))
        after = float(jd.tree.consensus_distance(mix(x, 0)))
        assert after <= bound * before * (1 + 1e-4) + 1e-10
        # and strictly better than K plain rounds' worst case
        assert after <= lam ** (2 * K) * before


def test_chebyshev_calls_base_mix_k_times():
    W = T.mixing_matrix(T.ring(8))
    calls = []
    base = G.dense(W)

    def counting(tree, step):
        calls.append(1)
        return base(tree, step)

    for K in (1, 3, 6):
        calls.clear()
        G.chebyshev(W, K, base=counting)(_tree(8), 0)
        assert len(calls) == K


def test_masked_mixes_only_selected_leaves():
    n = 5
    W = T.mixing_matrix(T.ring(n))
    x = {
        "body": {"w": jnp.arange(n * 2.0).reshape(n, 2)},
        "head": {"w": jnp.arange(n * 1.0)},
    }
    mask = jd.tree.invert_mask(jd.tree.mask_under(x, "head"))
    y = G.masked(G.dense(W), mask)(x, 0)
    np.testing.assert_allclose(y["head"]["w"], x["head"]["w"])
    np.testing.assert_allclose(
        y["body"]["w"], W @ np.asarray(x["body"]["w"]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="does not match"):
        G.masked(G.dense(W), {"body": True})(x, 0)


def test_identity_and_complete():
    x = _tree(4)
    _assert_tree_close(G.identity()(x, 0), x)
    _assert_tree_close(
        G.complete()(x, 0), _np_apply(np.full((4, 4), 0.25), x), atol=1e-6
    )


def test_mixer_validation():
    W = T.mixing_matrix(T.ring(6))
    with pytest.raises(ValueError, match="built for 6 workers"):
        G.dense(W)(_tree(5), 0)
    with pytest.raises(ValueError, match="doubly stochastic"):
        G.dense(T.mixing_matrix(T.star(5), "uniform"))
    G.dense(T.mixing_matrix(T.star(5), "uniform"), doubly_stochastic=False)
    with pytest.raises(ValueError, match="rounds"):
        G.chebyshev(W, 0)
    with pytest.raises(ValueError, match="H must be"):
        G.every(0, G.dense(W))
    with pytest.raises(ValueError, match="strictly increasing"):
        G.schedule([5, 2], [G.identity()] * 3)
    with pytest.raises(ValueError, match="mixers"):
        G.schedule([5], [G.identity()])
    with pytest.raises(ValueError, match="p must be"):
        G.random_matching(4, p=1.5)
