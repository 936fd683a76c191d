"""Graphs and mixing matrices: structure, stochasticity, spectra, validation."""

import networkx as nx
import numpy as np
import pytest

import jaxdec as jd
from jaxdec import topology as T

GRAPHS = {
    "ring": lambda: T.ring(12),
    "torus": lambda: T.torus(16),
    "torus_rect": lambda: T.torus(3, 5),
    "complete": lambda: T.complete(7),
    "star": lambda: T.star(9),
    "hypercube": lambda: T.hypercube(16),
    "exponential": lambda: T.exponential(12),
    "erdos_renyi": lambda: T.erdos_renyi(20, 0.25, seed=3),
    "random_regular": lambda: T.random_regular(14, 3, seed=1),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("rule", ["metropolis", "max_degree"])
def test_symmetric_doubly_stochastic_with_gap(name, rule):
    G = GRAPHS[name]()
    W = T.mixing_matrix(G, rule)
    n = G.number_of_nodes()
    assert W.shape == (n, n)
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    assert (W >= 0).all()
    # support = edges + diagonal
    A = nx.to_numpy_array(G, nodelist=range(n)) > 0
    assert not (W[~(A | np.eye(n, dtype=bool))] != 0).any()
    gap = T.spectral_gap(W)
    assert 0.0 < gap <= 1.0 + 1e-12
    # the gap agrees with a direct eigen-decomposition
    ev = np.sort(np.abs(np.linalg.eigvalsh(W)))
    assert gap == pytest.approx(1 - ev[-2], abs=1e-10)


def test_graph_structure():
    assert all(d == 2 for _, d in T.ring(10).degree())
    assert all(d == 4 for _, d in T.torus(25).degree())
    assert all(d == 4 for _, d in T.hypercube(16).degree())
    assert all(d == 3 for _, d in T.random_regular(10, 3).degree())
    assert dict(T.star(6).degree())[0] == 5
    E = T.exponential(16)
    # i ~ i +/- 1, 2, 4, 8
    assert set(E.neighbors(0)) == {1, 2, 4, 8, 15, 14, 12}
    assert nx.is_connected(T.erdos_renyi(30, 0.2, seed=0))


def test_metropolis_values_by_hand():
    # path-like star: hub degree 3, leaves degree 1 -> W_hub,leaf = 1/4
    W = T.mixing_matrix(T.star(4), "metropolis")
    np.testing.assert_allclose(W[0], [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(W[1], [0.25, 0.75, 0, 0])
    Wm = T.mixing_matrix(T.star(4), "max_degree")
    np.testing.assert_allclose(Wm[1], [0.25, 0.75, 0, 0])


def test_uniform_rule_is_row_stochastic_only():
    W = T.mixing_matrix(T.star(5), "uniform")
    np.testing.assert_allclose(W.sum(1), 1.0)
    assert not T.is_doubly_stochastic(W)
    np.testing.assert_allclose(W[1], [0.5, 0.5, 0, 0, 0])
    # regular graph: uniform == metropolis
    np.testing.assert_allclose(
        T.mixing_matrix(T.ring(6), "uniform"), T.mixing_matrix(T.ring(6), "metropolis")
    )


def test_spectral_gap_ordering():
    n = 16
    gaps = {
        name: T.spectral_gap(T.mixing_matrix(f(n)))
        for name, f in [
            ("complete", T.complete),
            ("exp", T.exponential),
            ("ring", T.ring),
        ]
    }
    assert gaps["complete"] == pytest.approx(1.0)
    assert gaps["complete"] > gaps["exp"] > gaps["ring"] > 0
    # ring closed form: lambda_2 = 1/3 + 2/3 cos(2 pi / n)
    assert T.second_largest_eigenvalue(T.mixing_matrix(T.ring(n))) == pytest.approx(
        1 / 3 + 2 / 3 * np.cos(2 * np.pi / n)
    )


@pytest.mark.parametrize("n", [2, 8, 16, 32])
def test_one_peer_exponential_exact_average(n):
    mats = T.one_peer_exponential(n)
    assert len(mats) == int(np.log2(n))
    P = np.eye(n)
    for W in mats:
        assert T.is_doubly_stochastic(W)
        assert (np.count_nonzero(W, axis=1) == 2).all()  # one peer each
        P = W @ P
    np.testing.assert_allclose(P, np.full((n, n), 1 / n), atol=1e-12)


def test_validation_errors():
    G = nx.Graph()
    G.add_nodes_from(range(4))
    G.add_edge(0, 1)
    G.add_edge(2, 3)
    with pytest.raises(ValueError, match="disconnected"):
        T.mixing_matrix(G)
    with pytest.raises(ValueError, match="unknown mixing rule"):
        T.mixing_matrix(T.ring(4), "laplacian")
    with pytest.raises(ValueError, match="square"):
        T.check_mixing_matrix(np.ones((3, 4)) / 4)
    with pytest.raises(ValueError, match="row-stochastic"):
        T.check_mixing_matrix(np.eye(3) * 0.5)
    with pytest.raises(ValueError, match="doubly stochastic"):
        T.check_mixing_matrix(T.mixing_matrix(T.star(5), "uniform"))
    with pytest.raises(ValueError, match="negative"):
        T.check_mixing_matrix(np.array([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="4 workers"):
        T.check_mixing_matrix(np.eye(3), n=4)
    with pytest.raises(ValueError, match="power of two"):
        T.hypercube(12)
    with pytest.raises(ValueError, match="perfect square"):
        T.torus(10)
    with pytest.raises(ValueError, match="raise p"):
        T.erdos_renyi(50, 0.01, seed=0, max_tries=3)
    with pytest.raises(ValueError, match="n \\* d even"):
        T.random_regular(5, 3)
    with pytest.raises(ValueError, match="unknown topology"):
        T.by_name("moebius", 8)
    with pytest.raises(ValueError, match="directed"):
        T.mixing_matrix(nx.DiGraph(T.ring(4)))


def test_neighbor_lists_reconstruct_W():
    W = T.mixing_matrix(T.erdos_renyi(15, 0.3, seed=2))
    idx, w = T.neighbor_lists(W)
    R = np.zeros_like(W)
    for i in range(W.shape[0]):
        np.add.at(R[i], idx[i], w[i])
    np.testing.assert_allclose(R, W)


def test_public_api_names():
    for name in [
        "ring",
        "torus",
        "complete",
        "star",
        "hypercube",
        "exponential",
        "erdos_renyi",
        "random_regular",
        "one_peer_exponential",
        "mixing_matrix",
        "spectral_gap",
        "second_largest_eigenvalue",
    ]:
        assert callable(getattr(jd.topology, name))
