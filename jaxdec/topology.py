"""Communication graphs (networkx) and the mixing matrices built from them.

Graph constructors return :class:`networkx.Graph` objects on nodes ``0..n-1``;
:func:`mixing_matrix` turns a graph into a validated ``(n, n)`` NumPy matrix ``W``
whose entry ``W[i, j]`` is the weight worker ``i`` puts on worker ``j``'s value:
``x_i <- sum_j W_ij x_j``.

Example:
  >>> import jaxdec as jd
  >>> W = jd.topology.mixing_matrix(jd.topology.ring(8), "metropolis")
  >>> round(jd.topology.spectral_gap(W), 4)
  0.1953
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np

__all__ = [
    "ring",
    "torus",
    "complete",
    "star",
    "hypercube",
    "exponential",
    "erdos_renyi",
    "random_regular",
    "one_peer_exponential",
    "from_edges",
    "mixing_matrix",
    "complete_matrix",
    "MIXING_RULES",
    "spectral_gap",
    "second_largest_eigenvalue",
    "check_graph",
    "check_mixing_matrix",
    "is_doubly_stochastic",
    "is_symmetric",
    "neighbor_lists",
    "TOPOLOGIES",
    "by_name",
    "parametrized_mixing",
]

MIXING_RULES = ("metropolis", "max_degree", "uniform")


def _check_n(n: int, minimum: int = 1, name: str = "n") -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}.")
    return int(n)


def _relabel(G: nx.Graph, name: str) -> nx.Graph:
    G = nx.convert_node_labels_to_integers(G, ordering="sorted")
    G.graph["name"] = name
    return G


def ring(n: int) -> nx.Graph:
    """Cycle graph: worker ``i`` is linked to ``i - 1`` and ``i + 1`` (mod ``n``)."""
    n = _check_n(n)
    return _relabel(nx.cycle_graph(n), f"ring({n})")


def torus(rows: int, cols: int | None = None) -> nx.Graph:
    """2-D periodic grid of ``rows x cols`` workers (4 neighbours each).

    Worker ``(r, c)`` gets index ``r * cols + c``. With ``cols=None`` the grid is
    square and ``rows`` must be the total worker count and a perfect square.
    """
    if cols is None:
        n = _check_n(rows)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"torus({n}): {n} is not a perfect square; pass torus(rows, cols)."
            )
        rows = cols = side
    rows, cols = _check_n(rows, name="rows"), _check_n(cols, name="cols")
    G = nx.grid_2d_graph(rows, cols, periodic=True)
    G = nx.relabel_nodes(G, {(r, c): r * cols + c for r, c in G.nodes})
    G.graph["name"] = f"torus({rows}x{cols})"
    return nx.Graph(G)


def complete(n: int) -> nx.Graph:
    """Complete graph: every pair of workers is linked."""
    n = _check_n(n)
    return _relabel(nx.complete_graph(n), f"complete({n})")


def star(n: int) -> nx.Graph:
    """Star: worker 0 is the hub linked to the ``n - 1`` others."""
    n = _check_n(n)
    return _relabel(nx.star_graph(n - 1), f"star({n})")


def hypercube(n: int) -> nx.Graph:
    """Hypercube on ``n = 2^k`` workers: ``i ~ j`` iff they differ in one bit."""
    n = _check_n(n)
    k = n.bit_length() - 1
    if 1 << k != n:
        raise ValueError(f"hypercube({n}): n must be a power of two (got {n}).")
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from((i, i ^ (1 << b)) for i in range(n) for b in range(k))
    G.graph["name"] = f"hypercube({n})"
    return G


def _exponential_offsets(n: int) -> list[int]:
    return [1 << k for k in range(max(1, math.ceil(math.log2(n)))) if (1 << k) < n]


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: ``i`` is linked to ``i +/- 2^k (mod n)`` for
    ``k = 0, ..., ceil(log2 n) - 1`` (undirected, so both directions are edges)."""
    n = _check_n(n)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for off in _exponential_offsets(n):
        G.add_edges_from((i, (i + off) % n) for i in range(n) if (i + off) % n != i)
    G.graph["name"] = f"exponential({n})"
    return G


def erdos_renyi(n: int, p: float, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Connected Erdos-Renyi graph ``G(n, p)``.

    Draws ``G(n, p)`` with seeds ``seed, seed + 1, ...`` until the draw is connected.

    Raises:
      ValueError: if no connected draw is found in ``max_tries`` attempts (raise ``p``).
    """
    n = _check_n(n)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"erdos_renyi: p must be in (0, 1], got {p}.")
    for t in range(max_tries):
        G = nx.gnp_random_graph(n, p, seed=seed + t)
        if n == 1 or nx.is_connected(G):
            return _relabel(G, f"erdos_renyi({n}, {p}, seed={seed})")
    raise ValueError(
        f"erdos_renyi({n}, p={p}): no connected graph in {max_tries} draws; raise p "
        f"(connectivity needs p > ln(n)/n = {math.log(n) / n:.3f}) or max_tries."
    )


def random_regular(n: int, d: int, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Connected random ``d``-regular graph on ``n`` workers (``n * d`` even)."""
    n, d = _check_n(n), _check_n(d, minimum=1, name="d")
    if d >= n or (n * d) % 2:
        raise ValueError(
            f"random_regular(n={n}, d={d}): need d < n and n * d even; change d or n."
        )
    for t in range(max_tries):
        G = nx.random_regular_graph(d, n, seed=seed + t)
        if nx.is_connected(G):
            return _relabel(G, f"random_regular({n}, {d}, seed={seed})")
    raise ValueError(
        f"random_regular({n}, {d}): no connected draw in {max_tries} tries; raise d."
    )


def one_peer_exponential(n: int) -> list[np.ndarray]:
    """Time-varying one-peer exponential graph (Ying et al., 2021).

    At step ``t`` worker ``i`` averages with ``i + 2^(t mod tau) (mod n)``,
    ``tau = ceil(log2 n)``: ``W_t = (I + P^{2^(t mod tau)}) / 2`` with ``P`` the
    cyclic shift. Each ``W_t`` is doubly stochastic (circulant); for ``n`` a power of
    two the product of ``tau`` consecutive matrices is exactly ``11^T / n``.

    Returns:
      The list of ``tau`` matrices, to be cycled by step (``gossip.time_varying``).
    """
    n = _check_n(n)
    if n == 1:
        return [np.ones((1, 1))]
    mats = []
    for off in _exponential_offsets(n):
        W = 0.5 * np.eye(n)
        W[np.arange(n), (np.arange(n) + off) % n] += 0.5
        mats.append(W)
    return mats


def from_edges(n: int, edges: Sequence[tuple[int, int]]) -> nx.Graph:
    """Graph on ``0..n-1`` from an explicit edge list."""
    n = _check_n(n)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for e in edges:
        if len(e) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in e
        ):
            raise ValueError(
                f"from_edges: edge {e!r} is not a pair of integer node ids; pass "
                "edges as [(i, j), ...] with ints in 0..n-1."
            )
        i, j = e
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"from_edges: edge ({i}, {j}) is outside 0..{n - 1}.")
        if i != j:
            G.add_edge(int(i), int(j))
    return G


TOPOLOGIES = {
    "ring": ring,
    "torus": torus,
    "complete": complete,
    "star": star,
    "hypercube": hypercube,
    "exponential": exponential,
    "erdos_renyi": lambda n, p=0.25, seed=0: erdos_renyi(n, p, seed),
    "random_regular": lambda n, d=4, seed=0: random_regular(n, d, seed),
}


def by_name(name: str, n: int, **kwargs) -> nx.Graph:
    """Build a graph by name (a key of ``TOPOLOGIES``), e.g. ``by_name("ring", 16)``."""
    if name not in TOPOLOGIES:
        raise ValueError(
            f"unknown topology {name!r}; choose one of {sorted(TOPOLOGIES)}."
        )
    return TOPOLOGIES[name](n, **kwargs)


def check_graph(G: nx.Graph) -> int:
    """Validate a communication graph; return its number of workers.

    Raises:
      ValueError: if ``G`` is empty, directed, not labelled ``0..n-1``, or disconnected.
    """
    if not isinstance(G, nx.Graph):
        raise ValueError(f"expected a networkx.Graph, got {type(G).__name__}.")
    if G.is_directed():
        raise ValueError("the graph is directed; pass G.to_undirected().")
    n = G.number_of_nodes()
    if n == 0:
        raise ValueError("the graph has no nodes.")
    if set(G.nodes) != set(range(n)):
        raise ValueError(
            "graph nodes must be 0..n-1; relabel with "
            "networkx.convert_node_labels_to_integers(G)."
        )
    if not nx.is_connected(G):
        k = nx.number_connected_components(G)
        raise ValueError(
            f"the graph is disconnected ({k} components): gossip can never reach "
            "consensus. Add edges (e.g. a ring backbone) or use a connected generator."
        )
    return n


def mixing_matrix(G: nx.Graph, rule: str = "metropolis") -> np.ndarray:
    """Mixing matrix ``W`` supported on the edges of ``G`` (plus self-loops).

    Rules (``d_i`` = degree of worker ``i``, ``d_max`` = maximum degree):

    * ``"metropolis"`` (Metropolis-Hastings):
      ``W_ij = 1 / (1 + max(d_i, d_j))`` for ``(i, j)`` an edge,
      ``W_ii = 1 - sum_{j != i} W_ij``. Symmetric and doubly stochastic.
    * ``"max_degree"``: ``W_ij = 1 / (1 + d_max)`` on edges,
      ``W_ii = 1 - d_i / (1 + d_max)``. Symmetric and doubly stochastic.
    * ``"uniform"``: ``W_ij = 1 / (1 + d_i)`` for ``j`` in ``N(i) u {i}``.
      Row-stochastic only: on irregular graphs it is NOT doubly stochastic and gossip
      does not preserve the worker mean (it converges to a degree-weighted average).

    Args:
      G: connected undirected graph on nodes ``0..n-1``.
      rule: one of ``MIXING_RULES``.

    Returns:
      ``W`` as a float64 ``(n, n)`` NumPy array.

    Raises:
      ValueError: unknown rule or invalid / disconnected graph.
    """
    if rule not in MIXING_RULES:
        raise ValueError(f"unknown mixing rule {rule!r}; choose one of {MIXING_RULES}.")
    n = check_graph(G)
    A = nx.to_numpy_array(G, nodelist=range(n), weight=None)
    np.fill_diagonal(A, 0.0)
    A = (A > 0).astype(np.float64)
    deg = A.sum(axis=1)
    if rule == "metropolis":
        W = A / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    elif rule == "max_degree":
        W = A / (1.0 + deg.max())
    else:
        W = A / (1.0 + deg[:, None])
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def complete_matrix(n: int) -> np.ndarray:
    """The exact averaging matrix ``J = 11^T / n``."""
    n = _check_n(n)
    return np.full((n, n), 1.0 / n)


def is_symmetric(W: np.ndarray, atol: float = 1e-8) -> bool:
    """``True`` iff ``W == W^T`` to ``atol``."""
    W = np.asarray(W)
    return bool(np.allclose(W, W.T, atol=atol, rtol=0.0))


def is_doubly_stochastic(W: np.ndarray, atol: float = 1e-8) -> bool:
    """``True`` iff ``W >= 0``, ``W 1 = 1`` and ``1^T W = 1^T`` to ``atol``."""
    W = np.asarray(W, dtype=np.float64)
    return bool(
        (-atol <= W).all()
        and np.allclose(W.sum(axis=1), 1.0, atol=atol, rtol=0.0)
        and np.allclose(W.sum(axis=0), 1.0, atol=atol, rtol=0.0)
    )


def check_mixing_matrix(
    W, *, n: int | None = None, doubly_stochastic: bool = True, atol: float = 1e-6
) -> np.ndarray:
    """Validate a mixing matrix and return it as a float64 NumPy array.

    Checks: square 2-D, finite, non-negative, rows sum to one, and (if
    ``doubly_stochastic``) columns sum to one; optionally the size ``n``.

    Raises:
      ValueError: naming the violated property and the fix.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"mixing matrix must be square (n, n), got shape {W.shape}.")
    if n is not None and W.shape[0] != n:
        raise ValueError(
            f"mixing matrix is {W.shape[0]}x{W.shape[0]} but there are {n} workers; "
            "build W for the same number of workers as the params' leading axis."
        )
    if not np.isfinite(W).all():
        raise ValueError("mixing matrix has non-finite entries.")
    if (-atol > W).any():
        raise ValueError(
            f"mixing matrix has negative entries (min {W.min():.3g}); mixing weights "
            "must be >= 0."
        )
    rows = W.sum(axis=1)
    if not np.allclose(rows, 1.0, atol=atol, rtol=0.0):
        i = int(np.argmax(np.abs(rows - 1.0)))
        raise ValueError(
            f"mixing matrix is not row-stochastic: row {i} sums to {rows[i]:.6g}. "
            "Use jd.topology.mixing_matrix(G, rule) to build a valid W."
        )
    if doubly_stochastic:
        cols = W.sum(axis=0)
        if not np.allclose(cols, 1.0, atol=atol, rtol=0.0):
            j = int(np.argmax(np.abs(cols - 1.0)))
            raise ValueError(
                f"mixing matrix is not doubly stochastic: column {j} sums to "
                f"{cols[j]:.6g}, so gossip would not preserve the worker mean. Use "
                "rule='metropolis' or 'max_degree', or pass doubly_stochastic=False "
                "if a row-stochastic W is intended."
            )
    return W


def second_largest_eigenvalue(W) -> float:
    """``lambda = ||W - 11^T/n||_2``, the consensus contraction factor of ``W``.

    For symmetric ``W`` this is the second-largest eigenvalue magnitude
    ``max(|lambda_2|, |lambda_n|)``; in general the spectral norm of ``W - J``.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square (n, n) matrix, got shape {W.shape}.")
    n = W.shape[0]
    if n == 1:
        return 0.0
    M = W - np.full((n, n), 1.0 / n)
    if is_symmetric(W):
        return float(np.max(np.abs(np.linalg.eigvalsh(M))))
    return float(np.linalg.norm(M, 2))


def spectral_gap(W) -> float:
    """Spectral gap ``1 - lambda``, ``lambda`` from :func:`second_largest_eigenvalue`.

    In ``(0, 1]`` for a connected graph with a valid mixing matrix; ``1`` for ``J``.
    """
    return 1.0 - second_largest_eigenvalue(W)


def neighbor_lists(W) -> tuple[np.ndarray, np.ndarray]:
    """Padded neighbour index and weight arrays of ``W`` (self included).

    Returns:
      ``(idx, w)`` both ``(n, k_max)`` where row ``i`` lists the ``j`` with
      ``W_ij != 0`` and their weights; padding uses index ``i`` with weight 0, so
      ``(W x)_i = sum_k w[i, k] x[idx[i, k]]``.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(
            f"neighbor_lists: W must be a square (n, n) matrix, got shape {W.shape}."
        )
    n = W.shape[0]
    nz = [np.flatnonzero(W[i]) for i in range(n)]
    k = max(len(r) for r in nz)
    idx = np.tile(np.arange(n)[:, None], (1, k))
    w = np.zeros((n, k))
    for i, r in enumerate(nz):
        idx[i, : len(r)] = r
        w[i, : len(r)] = W[i, r]
    return idx.astype(np.int32), w


def parametrized_mixing(G: nx.Graph, theta: np.typing.ArrayLike):
    """Learnable symmetric doubly-stochastic ``W`` on the edges of ``G``.

    Thin lazy wrapper of :func:`jaxdec.hyper.parametrized_mixing` (see there for
    the construction ``W_ij = sigmoid(theta_e) / max(d_i, d_j)``, the edge order
    and the guarantees); imported on first use so this module stays NumPy-only.

    Args:
      G: connected undirected graph on ``0..n-1``.
      theta: ``[m]`` real edge parameters in ``jd.hyper.edge_list(G)`` order.

    Returns:
      ``W`` as a ``jax.Array`` ``(n, n)``, differentiable in ``theta``.
    """
    from jaxdec.hyper import parametrized_mixing as _parametrized_mixing

    return _parametrized_mixing(G, theta)
