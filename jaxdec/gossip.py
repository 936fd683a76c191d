"""Gossip: mixing functions on the worker axis.

A :data:`~jaxdec.types.MixingFn` is ``mix(tree, step) -> tree``: a linear map applied to
the leading (worker) axis of every leaf, ``x_i <- sum_j W_ij(step) x_j``. All
constructors here return a :class:`Mixer`, a callable with that signature that also
knows how many messages every worker sends at a given step (for communication
accounting). Mixers compose: ``every(H, chebyshev(W, 3))`` mixes with a 3-round
Chebyshev polynomial of ``W`` every ``H`` steps.

Randomized mixers derive their randomness from ``jax.random.fold_in(key(seed), step)``,
so a run is a pure function of its seeds.

Example:
  >>> import jaxdec as jd, jax.numpy as jnp
  >>> W = jd.topology.mixing_matrix(jd.topology.ring(4), "metropolis")
  >>> mix = jd.gossip.sparse(W)
  >>> mix({"w": jnp.arange(4.0)}, 0)["w"]          # x_i <- (x_{i-1}+x_i+x_{i+1})/3
  Array([1.6666666, 1.       , 2.       , 2.3333333], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import topology
from jaxdec import tree as jtree
from jaxdec.types import MixingFn, PyTree

__all__ = [
    "Mixer",
    "dense",
    "sparse",
    "time_varying",
    "every",
    "schedule",
    "random_matching",
    "chebyshev",
    "chebyshev_matrix",
    "identity",
    "complete",
    "masked",
    "messages_sent",
    "random_pull",
    "connectivity",
    "truncate",
    "dense_window",
    "communication_budget",
    "as_matrix",
]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class Mixer:
    """A :data:`MixingFn` with communication accounting.

    Attributes:
      fn: ``fn(tree, step) -> tree``, the mixing map.
      sends: ``sends(step, n) -> [n]`` float32, number of messages (full copies of
        the mixed leaves) each worker sends at ``step``; jittable.
      n: number of workers the mixer is built for (``None`` = any).
      name: short human-readable description.
      expected: ``expected(step, n) -> [n]``, the expectation of ``sends`` over the
        mixer's randomness (``None``: ``sends`` is deterministic).
    """

    fn: Callable[[PyTree, jax.Array], PyTree]
    sends: Callable[[jax.Array, int], jax.Array]
    n: int | None
    name: str
    expected: Callable[[jax.Array, int], jax.Array] | None = None

    def expected_sends(self, step, n: int) -> jax.Array:
        """Expected messages per worker at ``step`` (``[n]``)."""
        f = self.sends if self.expected is None else self.expected
        return f(jnp.asarray(step, jnp.int32), n)

    def __call__(self, tree: PyTree, step) -> PyTree:
        if self.n is not None:
            n = jtree.num_workers(tree)
            if n != self.n:
                raise ValueError(
                    f"{self.name} was built for {self.n} workers but the tree has "
                    f"{n} on its leading axis; build the mixer for {n} workers."
                )
        with jax.named_scope("gossip"):  # labels the ops in profiles
            return self.fn(tree, jnp.asarray(step, jnp.int32))

    def __repr__(self) -> str:
        return f"Mixer({self.name})"


def messages_sent(mix: MixingFn, step, n: int) -> jax.Array:
    """Messages each worker sends at ``step`` (``[n]``); zeros for a plain function."""
    if isinstance(mix, Mixer):
        return mix.sends(jnp.asarray(step, jnp.int32), n)
    return jnp.zeros((n,), jnp.float32)


def _at(f: Callable[[jax.Array, int], jax.Array], n: int):
    """``step -> f(step, n)`` (a ``lax.switch`` branch for a message counter)."""
    return lambda step: f(step, n)


def _no_sends(step: jax.Array, n: int) -> jax.Array:
    return jnp.zeros((n,), jnp.float32)


def _const_sends(W: np.ndarray) -> Callable[[jax.Array, int], jax.Array]:
    off = (np.abs(W) > 0) & ~np.eye(W.shape[0], dtype=bool)
    per_worker = jnp.asarray(off.sum(axis=0), jnp.float32)  # column j: receivers of j
    return lambda step, n: per_worker


def _matmul_leaf(W: jax.Array, x: jax.Array) -> jax.Array:
    x2 = x.reshape(x.shape[0], -1)
    y = jnp.matmul(W.astype(jnp.promote_types(x.dtype, jnp.float32)), x2, precision=_HI)
    return y.reshape(x.shape).astype(x.dtype)


def dense(W, *, doubly_stochastic: bool = True) -> Mixer:
    """Dense gossip ``X <- W X`` as one matrix product per leaf (``O(n^2 d)``).

    Args:
      W: ``(n, n)`` non-negative row-stochastic matrix, ``W_ij`` = weight ``i`` puts
        on ``j``.
      doubly_stochastic: also require column sums of one (mean preservation). Pass
        ``False`` for a row-stochastic matrix such as ``mixing_matrix(G, "uniform")``.

    Returns:
      A :class:`Mixer` that ignores ``step``.
    """
    Wn = topology.check_mixing_matrix(W, doubly_stochastic=doubly_stochastic)
    Wj = jnp.asarray(Wn, jnp.float32)

    def fn(tree, step):
        return jax.tree.map(lambda x: _matmul_leaf(Wj, x), tree)

    return Mixer(fn, _const_sends(Wn), Wn.shape[0], f"dense(n={Wn.shape[0]})")


def _circulant_offsets(W: np.ndarray, atol: float = 0.0):
    """Return ``{offset: weight}`` if ``W_ij`` depends only on ``(j - i) mod n``."""
    n = W.shape[0]
    first = W[0]
    rows = np.stack([np.roll(first, i) for i in range(n)])
    if not np.allclose(rows, W, atol=atol, rtol=0.0):
        return None
    return {int(o): float(first[o]) for o in np.flatnonzero(first)}


def sparse(W, *, doubly_stochastic: bool = True) -> Mixer:
    """Sparse neighbour gossip ``x_i <- sum_{j in N[i]} W_ij x_j`` (``O(n deg d)``).

    Circulant matrices (ring, exponential, one-peer graphs) run as a weighted sum of
    rolls of the worker axis, ``X <- sum_o w_o roll(X, -o)``; any other sparsity
    pattern runs as a gather of padded neighbour lists. Both equal :func:`dense` to
    float tolerance.

    Args:
      W: ``(n, n)`` mixing matrix (see :func:`dense`).
      doubly_stochastic: require column sums of one.
    """
    Wn = topology.check_mixing_matrix(W, doubly_stochastic=doubly_stochastic)
    n = Wn.shape[0]
    offsets = _circulant_offsets(Wn)
    if offsets is not None:
        items = sorted(offsets.items())

        def leaf(x):
            acc = jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
            for o, w in items:
                acc = acc + w * jnp.roll(x, -o, axis=0).astype(acc.dtype)
            return acc.astype(x.dtype)

        name = f"sparse(n={n}, circulant, {len(items)} offsets)"
    else:
        idx, w = topology.neighbor_lists(Wn)
        idx_j, w_j = jnp.asarray(idx), jnp.asarray(w, jnp.float32)

        def leaf(x):
            g = x[idx_j]  # [n, k, ...]
            wk = w_j.reshape(w_j.shape + (1,) * (x.ndim - 1))
            return jnp.sum(wk * g, axis=1).astype(x.dtype)

        name = f"sparse(n={n}, gather, k={idx.shape[1]})"

    def fn(tree, step):
        return jax.tree.map(leaf, tree)

    return Mixer(fn, _const_sends(Wn), n, name)


def _as_mixer(m, *, doubly_stochastic: bool = True, use_sparse: bool = True) -> Mixer:
    if isinstance(m, Mixer):
        return m
    if callable(m):
        return Mixer(m, _no_sends, None, "custom")
    return (sparse if use_sparse else dense)(m, doubly_stochastic=doubly_stochastic)


def time_varying(
    Ws: Sequence, *, use_sparse: bool = True, doubly_stochastic: bool = True
) -> Mixer:
    """Cycle through a list of mixing matrices (or mixers): ``W(t) = W_{t mod T}``.

    Example: ``time_varying(jd.topology.one_peer_exponential(16))``.

    Args:
      Ws: non-empty sequence of ``(n, n)`` matrices or :class:`Mixer` objects.
      use_sparse: build matrix entries with :func:`sparse` (else :func:`dense`).
      doubly_stochastic: validation for matrix entries.
    """
    if len(Ws) == 0:
        raise ValueError("time_varying: give at least one mixing matrix.")
    mixers = [
        _as_mixer(W, doubly_stochastic=doubly_stochastic, use_sparse=use_sparse)
        for W in Ws
    ]
    ns = {m.n for m in mixers if m.n is not None}
    if len(ns) > 1:
        raise ValueError(f"time_varying: matrices have different sizes {sorted(ns)}.")
    T = len(mixers)

    def fn(tree, step):
        return jax.lax.switch(step % T, [m.fn for m in mixers], tree, step)

    def sends(step, n):
        return jax.lax.switch(step % T, [_at(m.sends, n) for m in mixers], step)

    def expected(step, n):
        branches = [_at(m.expected_sends, n) for m in mixers]
        return jax.lax.switch(step % T, branches, step)

    return Mixer(fn, sends, ns.pop() if ns else None, f"time_varying(T={T})", expected)


def every(H: int, mix: MixingFn) -> Mixer:
    """Mix only at the end of every round of ``H`` local steps (local SGD).

    ``mix_t = mix(., t // H)`` if ``(t + 1) mod H == 0`` else the identity; the inner
    mixer sees the round index ``rho = t // H`` as its step, so random inner mixers
    draw once per round.
    """
    if isinstance(H, bool) or int(H) != H or int(H) < 1:
        raise ValueError(f"every: H must be an integer >= 1, got {H!r}.")
    H = int(H)
    inner = _as_mixer(mix)

    def fn(tree, step):
        return jax.lax.cond(
            (step + 1) % H == 0,
            lambda t: inner.fn(t, step // H),
            lambda t: t,
            tree,
        )

    def sends(step, n):
        return jnp.where((step + 1) % H == 0, inner.sends(step // H, n), 0.0)

    def expected(step, n):
        return jnp.where((step + 1) % H == 0, inner.expected_sends(step // H, n), 0.0)

    return Mixer(fn, sends, inner.n, f"every({H}, {inner.name})", expected)


def schedule(boundaries: Sequence[int], mixers: Sequence) -> Mixer:
    """Piecewise-constant mixing by step: ``mixers[k]`` for ``b_{k-1} <= t < b_k``.

    Args:
      boundaries: strictly increasing step boundaries ``b_0 < b_1 < ...``.
      mixers: ``len(boundaries) + 1`` mixers or matrices; ``mixers[0]`` runs for
        ``t < b_0`` and ``mixers[-1]`` for ``t >= b_{-1}``.

    Example: sparse gossip, then one complete merge at the last step ``T - 1``:
      ``schedule([T - 1], [sparse(W), complete()])``.
    """
    b = np.asarray(boundaries, dtype=np.int64)
    if b.ndim != 1 or (np.diff(b) <= 0).any():
        raise ValueError(f"schedule: boundaries must be strictly increasing, got {b}.")
    if len(mixers) != len(b) + 1:
        raise ValueError(
            f"schedule: need len(boundaries) + 1 = {len(b) + 1} mixers, got "
            f"{len(mixers)}."
        )
    ms = [_as_mixer(m) for m in mixers]
    ns = {m.n for m in ms if m.n is not None}
    if len(ns) > 1:
        raise ValueError(f"schedule: mixers are built for different n {sorted(ns)}.")
    bj = jnp.asarray(b, jnp.int32)

    def branch(step):
        return jnp.searchsorted(bj, step, side="right")

    def fn(tree, step):
        return jax.lax.switch(branch(step), [m.fn for m in ms], tree, step)

    def sends(step, n):
        return jax.lax.switch(branch(step), [_at(m.sends, n) for m in ms], step)

    def expected(step, n):
        branches = [_at(m.expected_sends, n) for m in ms]
        return jax.lax.switch(branch(step), branches, step)

    name = f"schedule({list(b)})"
    return Mixer(fn, sends, ns.pop() if ns else None, name, expected)


def _matching(n: int, key: jax.Array, p: float) -> jax.Array:
    """Partner of every worker in a random perfect matching; pairs kept w.p. ``p``."""
    k_perm, k_keep = jax.random.split(key)
    perm = jax.random.permutation(k_perm, n)
    half = n // 2
    a, b = perm[: 2 * half : 2], perm[1 : 2 * half : 2]
    keep = jax.random.bernoulli(k_keep, p, (half,))
    a_p = jnp.where(keep, b, a)
    b_p = jnp.where(keep, a, b)
    partner = jnp.arange(n).at[a].set(a_p).at[b].set(b_p)
    return partner


def random_matching(n: int, seed: int = 0, p: float = 1.0) -> Mixer:
    """Random pairwise averaging: a fresh uniformly random perfect matching each step.

    At step ``t`` draw a matching from ``fold_in(key(seed), t)`` (one worker idles
    when ``n`` is odd), keep each pair with probability ``p``, and set
    ``x_i, x_j <- (x_i + x_j) / 2`` for kept pairs. ``W(t)`` is a symmetric
    permutation average, hence doubly stochastic.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"random_matching: n must be >= 1, got {n}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_matching: p must be in [0, 1], got {p}.")
    key = jax.random.key(seed)

    def partner(step):
        return _matching(n, jax.random.fold_in(key, step), p)

    def fn(tree, step):
        q = partner(step)
        return jax.tree.map(
            lambda x: (0.5 * (x.astype(jnp.float32) + x[q].astype(jnp.float32))).astype(
                x.dtype
            ),
            tree,
        )

    def sends(step, n_):
        return (partner(step) != jnp.arange(n)).astype(jnp.float32)

    def expected(step, n_):  # a worker is in one of the n // 2 pairs, kept w.p. p
        return jnp.full((n,), p * 2 * (n // 2) / n, jnp.float32)

    return Mixer(fn, sends, n, f"random_matching(n={n}, p={p})", expected)


def chebyshev_coefficients(lam: float, rounds: int) -> list[tuple[float, float]]:
    """Recurrence coefficients ``(alpha_k, beta_k)`` of Chebyshev-accelerated gossip.

    ``a_0 = 1``, ``a_1 = 1/lambda``, ``a_{k+1} = (2/lambda) a_k - a_{k-1}``;
    ``u_{k+1} = alpha_k W u_k - beta_k u_{k-1}`` with
    ``alpha_k = 2 a_k / (lambda a_{k+1})`` and ``beta_k = a_{k-1} / a_{k+1}``
    for ``k = 1 .. K-1``. ``alpha_k - beta_k = 1``, so the mean is preserved.
    """
    a = [1.0, 1.0 / lam]
    for _ in range(1, rounds):
        a.append((2.0 / lam) * a[-1] - a[-2])
    return [
        (2.0 * a[k] / (lam * a[k + 1]), a[k - 1] / a[k + 1]) for k in range(1, rounds)
    ]


def chebyshev(
    W,
    rounds: int,
    *,
    base: MixingFn | None = None,
    lam: float | None = None,
    method: str = "chebyshev",
) -> Mixer:
    """K-round accelerated consensus ``M_K = T_K(W / lambda) / T_K(1 / lambda)``.

    Stable recurrence (``lambda = ||W - J||_2``, computed once on the host):
    ``u_0 = X``, ``u_1 = W X``, ``u_{k+1} = alpha_k W u_k - beta_k u_{k-1}``
    (see :func:`chebyshev_coefficients`); returns ``u_K``. ``M_K`` is symmetric,
    preserves the worker mean exactly and ``||M_K - J||_2 = 1 / T_K(1/lambda)
    <= 2 c^K`` with ``c = (1 - sqrt(1 - lambda^2)) / lambda``; it can have negative
    entries. ``K = 1`` gives plain ``W``. The base mix is called exactly ``K`` times.

    ``method="fastmix"`` uses the heavy-ball form ``x^{k+1} = (1 + e) W x^k -
    e x^{k-1}``, ``x^{-1} = x^0``, ``e = (1 - sqrt(1 - lambda^2)) /
    (1 + sqrt(1 - lambda^2))``.

    Args:
      W: symmetric doubly-stochastic ``(n, n)`` matrix.
      rounds: ``K >= 1`` gossip rounds per call.
      base: mixer applying ``W`` (default :func:`sparse` of ``W``).
      lam: override ``lambda`` (default from ``W``).
      method: ``"chebyshev"`` or ``"fastmix"``.
    """
    if isinstance(rounds, bool) or int(rounds) != rounds or int(rounds) < 1:
        raise ValueError(f"chebyshev: rounds must be an integer >= 1, got {rounds!r}.")
    if method not in ("chebyshev", "fastmix"):
        raise ValueError(
            f"chebyshev: method must be 'chebyshev' or 'fastmix', got {method!r}."
        )
    K = int(rounds)
    Wn = topology.check_mixing_matrix(W, doubly_stochastic=True)
    if not topology.is_symmetric(Wn):
        raise ValueError(
            "chebyshev: W must be symmetric (its eigenvalues must be real); use "
            "mixing_matrix(G, 'metropolis') or 'max_degree'."
        )
    lam = topology.second_largest_eigenvalue(Wn) if lam is None else float(lam)
    base_m = sparse(Wn) if base is None else _as_mixer(base)
    name = f"{method}(K={K}, lam={lam:.4f})"
    if lam <= 0.0:  # W == J: one round is already exact averaging
        coefs = [(1.0, 0.0)]
    elif method == "chebyshev":
        coefs = [(1.0, 0.0), *chebyshev_coefficients(lam, K)]
    else:
        s = float(np.sqrt(1.0 - lam**2))
        e = (1.0 - s) / (1.0 + s)
        coefs = [(1.0 + e, e)] * K

    def fn(tree, step):
        prev = cur = tree
        for alpha, beta in coefs:
            wu = base_m.fn(cur, step)
            new = jax.tree.map(
                lambda w, p, a=alpha, b=beta: _affine(a, w, b, p), wu, prev
            )
            prev, cur = cur, new
        return cur

    def sends(step, n):
        return len(coefs) * base_m.sends(step, n)

    def expected(step, n):
        return len(coefs) * base_m.expected_sends(step, n)

    return Mixer(fn, sends, base_m.n, name, expected)


def _affine(a: float, w: jax.Array, b: float, p: jax.Array) -> jax.Array:
    """``a * w - b * p`` in at least float32, cast back to ``w.dtype``."""
    if b == 0.0:
        return w if a == 1.0 else (a * w.astype(jnp.float32)).astype(w.dtype)
    f32 = jnp.promote_types(w.dtype, jnp.float32)
    return (a * w.astype(f32) - b * p.astype(f32)).astype(w.dtype)


def chebyshev_matrix(W, rounds: int, method: str = "chebyshev") -> np.ndarray:
    """The matrix ``M_K`` that :func:`chebyshev` applies, in float64 NumPy.

    Runs the same recurrence on the identity matrix (for analysis and plots).
    """
    Wn = topology.check_mixing_matrix(W, doubly_stochastic=True)
    n = Wn.shape[0]
    lam = topology.second_largest_eigenvalue(Wn)
    if lam <= 0.0:
        return Wn.copy()
    if method == "chebyshev":
        coefs = [(1.0, 0.0), *chebyshev_coefficients(lam, int(rounds))]
    else:
        s = np.sqrt(1.0 - lam**2)
        e = (1.0 - s) / (1.0 + s)
        coefs = [(1.0 + e, e)] * int(rounds)
    prev = cur = np.eye(n)
    for a, b in coefs:
        prev, cur = cur, a * (Wn @ cur) - b * prev
    return cur


def as_matrix(mix: MixingFn, n: int, step: int = 0) -> np.ndarray:
    """Materialize a linear mixer as its ``(n, n)`` matrix at ``step`` (``mix(I)``)."""
    return np.asarray(mix(jnp.eye(n, dtype=jnp.float32), step))


def identity() -> Mixer:
    """No communication: ``X <- X`` (local-only training)."""
    return Mixer(lambda tree, step: tree, _no_sends, None, "identity")


def complete(n: int | None = None) -> Mixer:
    """Exact averaging ``X <- J X`` with ``J = 11^T / n`` (server / all-reduce).

    Counted as ``n - 1`` messages per worker (all-to-all); a server round trip is
    two messages per worker, see the federated algorithms for that accounting.
    """

    def fn(tree, step):
        return jtree.broadcast_mean(tree)

    def sends(step, n_):
        return jnp.full((n_,), n_ - 1.0, jnp.float32)

    return Mixer(fn, sends, n, f"complete(n={n})")


def masked(mix: MixingFn, mask: PyTree) -> Mixer:
    """Mix only the leaves where ``mask`` is ``True``; others pass through unchanged.

    ``mask`` is a pytree of Python bools with the structure of the mixed tree (e.g.
    ``jd.tree.invert_mask(jd.tree.mask_under(params, "head"))`` mixes the body and
    keeps personal heads). All selected leaves go through one ``mix`` call.
    """
    inner = _as_mixer(mix)
    mask_leaves = jax.tree.leaves(mask)

    def fn(tree, step):
        jtree.validate_mask(mask, tree, name="masked(): mask")
        leaves, treedef = jax.tree.flatten(tree)
        sel = [x for x, m in zip(leaves, mask_leaves, strict=True) if m]
        mixed = iter(inner.fn(sel, step) if sel else [])
        out = [
            next(mixed) if m else x for x, m in zip(leaves, mask_leaves, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)

    return Mixer(fn, inner.sends, inner.n, f"masked({inner.name})", inner.expected)


def random_pull(n: int, r: float, seed: int = 0) -> Mixer:
    """Row-stochastic random pull gossip with connectivity ``r`` (the paper's code).

    At step ``t`` (randomness from ``fold_in(key(seed), t)``) every worker ``k``
    pulls from ``k_k = floor(r) + Bernoulli(r - floor(r))`` peers drawn uniformly
    without replacement from the others and averages uniformly over itself and
    them: ``W_kk = W_kj = 1 / (k_k + 1)``. ``r = 1`` with ``p`` mixing: row ``k`` is
    ``e_k`` w.p. ``1 - p`` else ``(e_k + e_j) / 2``; ``r = n - 1`` gives exactly
    ``J``. Rows sum to one but columns do not: this gossip does NOT preserve the
    worker mean (use :func:`random_matching` for the doubly-stochastic version).
    Messages: each pull is one message from the peer, so a worker sends ``r``
    messages per step in expectation.

    The rule for non-integer ``r > 1`` is reconstructed from the method family.
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"random_pull: needs n >= 2 workers, got {n}.")
    if not 0.0 <= r <= n - 1:
        raise ValueError(
            f"random_pull: connectivity r must be in [0, n - 1] = [0, {n - 1}], "
            f"got {r}."
        )
    key = jax.random.key(seed)
    base, frac = int(np.floor(r)), float(r - np.floor(r))
    eye = jnp.eye(n, dtype=jnp.float32)

    def adjacency(step):
        k_sel, k_extra = jax.random.split(jax.random.fold_in(key, step))
        u = jax.random.uniform(k_sel, (n, n))
        u = jnp.where(eye > 0, jnp.inf, u)  # never pick yourself
        rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
        k = base + jax.random.bernoulli(k_extra, frac, (n,)).astype(jnp.int32)
        return (rank < k[:, None]).astype(jnp.float32)  # A[k, j] = 1: k pulls j

    def matrix(step):
        A = adjacency(step)
        return (A + eye) / (1.0 + jnp.sum(A, axis=1, keepdims=True))

    def fn(tree, step):
        W = matrix(step)
        return jax.tree.map(lambda x: _matmul_leaf(W, x), tree)

    def sends(step, n_):
        return jnp.sum(adjacency(step), axis=0)  # column j: how many pulled from j

    def expected(step, n_):
        return jnp.full((n,), float(r), jnp.float32)

    return Mixer(fn, sends, n, f"random_pull(n={n}, r={r})", expected)


def connectivity(n: int, r: float, *, seed: int = 0, mode: str = "pairing") -> Mixer:
    """The mixer of connectivity ``r`` (extra peers per worker per round).

    ``r = 0``: :func:`identity`; ``r >= n - 1``: exact averaging :func:`complete`;
    otherwise ``mode="pairing"`` (default, doubly stochastic, needs ``r <= 1``):
    :func:`random_matching` with keep probability ``p = r``; ``mode="pull"``:
    :func:`random_pull` (row-stochastic, the paper's code).
    """
    n = int(n)
    if mode not in ("pairing", "pull"):
        raise ValueError(
            f"connectivity: mode must be 'pairing' or 'pull', got {mode!r}."
        )
    if r < 0:
        raise ValueError(f"connectivity: r must be >= 0, got {r}.")
    if r == 0:
        return identity()
    if r >= n - 1:
        return complete(n)
    if mode == "pull":
        return random_pull(n, r, seed)
    if r > 1:
        raise ValueError(
            f"connectivity: pairing gossip gives at most one peer per round (r <= 1), "
            f"got r={r}; use mode='pull' or r = n - 1 for exact averaging."
        )
    return random_matching(n, seed, p=float(r))


def _round_of_progress(pi: float, max_steps: int, H: int) -> int:
    """First round ``rho`` whose last step has progress ``(rho + 1) H / T >= pi``."""
    return max(0, int(np.ceil(pi * max_steps / H - 1e-9)) - 1)


def _check_rounds(max_steps: int, H: int, name: str) -> int:
    if int(H) < 1 or int(max_steps) < 1 or max_steps % H:
        raise ValueError(
            f"{name}: max_steps={max_steps} must be a positive multiple of H={H}."
        )
    return max_steps // H


def truncate(
    n: int,
    r_start: float,
    r_end: float,
    point1: float,
    *,
    max_steps: int,
    H: int = 1,
    seed: int = 0,
    mode: str = "pairing",
) -> Mixer:
    """Sparse gossip, then dense: connectivity ``r_start`` while the progress of a
    round's last step ``pi = (rho + 1) H / T < point1``, ``r_end`` afterwards.

    Gossip happens every ``H`` steps (``every(H, ...)``); the final round always uses
    ``r_end`` (``pi = 1 >= point1``). Single final merge: ``r_end = n - 1``, e.g.
    ``truncate(16, 0.2, 15, 0.997, max_steps=3000, H=20)``.
    """
    rounds = _check_rounds(max_steps, H, "truncate")
    if not 0.0 < point1 <= 1.0:
        raise ValueError(f"truncate: point1 must be in (0, 1], got {point1}.")
    switch = _round_of_progress(point1, max_steps, H)
    inner = schedule(
        [switch],
        [
            connectivity(n, r_start, seed=seed, mode=mode),
            connectivity(n, r_end, seed=seed, mode=mode),
        ],
    )
    m = every(H, inner)
    name = f"truncate(r={r_start}->{r_end} at round {switch}/{rounds}, H={H})"
    return dataclasses.replace(m, name=name)


def dense_window(
    n: int,
    start: float,
    length: float,
    *,
    r_sparse: float,
    r_dense: float | None = None,
    max_steps: int,
    H: int = 1,
    seed: int = 0,
    mode: str = "pairing",
) -> Mixer:
    """Connectivity ``r_dense`` (default ``n - 1``: exact averaging) for rounds whose
    progress ``pi = (rho + 1) H / T`` lies in ``[start, start + length)``,
    ``r_sparse`` elsewhere; gossip every ``H`` steps (the code's ``truncate_v2``)."""
    _check_rounds(max_steps, H, "dense_window")
    if not (0.0 <= start < 1.0 and 0.0 < length <= 1.0):
        raise ValueError(
            "dense_window: need 0 <= start < 1 and 0 < length <= 1, got "
            f"start={start}, length={length}."
        )
    r_dense = n - 1 if r_dense is None else r_dense
    a = _round_of_progress(start, max_steps, H) if start > 0 else 0
    b = _round_of_progress(start + length, max_steps, H) if start + length < 1 else None
    sparse_m = connectivity(n, r_sparse, seed=seed, mode=mode)
    dense_m = connectivity(n, r_dense, seed=seed, mode=mode)
    if b is None:
        inner = schedule([a], [sparse_m, dense_m]) if a > 0 else dense_m
    elif a == 0:
        inner = schedule([b], [dense_m, sparse_m])
    else:
        inner = schedule([a, b], [sparse_m, dense_m, sparse_m])
    m = every(H, inner)
    return dataclasses.replace(m, name=f"dense_window({start}, {length}, H={H})")


def communication_budget(
    mix: MixingFn, num_steps: int, n: int, params: PyTree | None = None
) -> dict[str, float]:
    """Expected and realized peer exchanges of ``mix`` over steps ``0..T-1``.

    Realized counts replay the mixer's own randomness (the same draws a run makes);
    expected counts average over it analytically. With ``params`` (worker-axis
    tree) the floats sent are ``exchanges * d`` with ``d`` the parameters per
    worker.

    Returns:
      ``{"expected_exchanges_per_worker", "realized_exchanges_per_worker",
      "floats_sent_per_worker"(if params), "steps"}``, means over workers.
    """
    m = _as_mixer(mix)
    chunk = 1024

    @jax.jit
    def totals(start):
        def body(c, t):
            return (c[0] + m.sends(t, n), c[1] + m.expected_sends(t, n)), None

        z = jnp.zeros((n,), jnp.float32)
        ts = start + jnp.arange(chunk, dtype=jnp.int32)
        return jax.lax.scan(body, (z, z), ts)[0]

    # float32 sums within chunks of 1024 steps, float64 across chunks
    realized, expected = np.zeros(n), np.zeros(n)
    for start in range(0, int(num_steps), chunk):
        r, e = totals(jnp.int32(start))
        keep = min(chunk, int(num_steps) - start)
        if keep < chunk:  # recount the last partial chunk exactly
            r, e = _partial_totals(m, start, keep, n)
        realized += np.asarray(r, np.float64)
        expected += np.asarray(e, np.float64)
    out = {
        "steps": int(num_steps),
        "expected_exchanges_per_worker": float(expected.mean()),
        "realized_exchanges_per_worker": float(realized.mean()),
    }
    if params is not None:
        out["floats_sent_per_worker"] = float(realized.mean()) * jtree.num_params(
            params
        )
    return out


def _partial_totals(m: Mixer, start: int, length: int, n: int):
    def body(c, t):
        return (c[0] + m.sends(t, n), c[1] + m.expected_sends(t, n)), None

    z = jnp.zeros((n,), jnp.float32)
    ts = start + jnp.arange(length, dtype=jnp.int32)
    return jax.jit(lambda ts: jax.lax.scan(body, (z, z), ts)[0])(ts)
