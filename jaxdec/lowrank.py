r"""Factorized (low-rank) dense layers and the dynamical low-rank building blocks.

A factorized kernel is a dict ``{"U": U, "S": S, "V": V}`` standing for

.. math::
    W = U S V^\top, \qquad U \in \mathbb{R}^{n \times K},\;
    S \in \mathbb{R}^{K \times K},\; V \in \mathbb{R}^{m \times K},

with a *static capacity* ``K`` and an *active rank* ``r <= K`` carried separately (an
int32, possibly traced). Layout ("prefix rule"): the active basis is the first ``r``
columns of ``U`` and ``V``, they are orthonormal, and every column ``>= r`` of ``U``,
``V`` and every row/column ``>= r`` of ``S`` is exactly zero. Ranks therefore change
inside one compiled program; only ``K`` is static. The layer computes
``y = ((x U) S) V^T``: ``O((n + m) K + K^2)`` per example instead of ``O(n m)``.

Dynamical low-rank steps (Schotthoefer et al.; used by :mod:`jaxdec.algorithms.fedlrt`),
all jittable with static shapes:

* augmentation (:func:`augment_basis`, :func:`augment`):
  ``U~ = [U | orth((I - U U^T) G_U)]`` with ``a = min(r, n - r, m - r)`` new columns
  written at ``r .. r + a - 1`` (``U~[:, :r] = U`` exactly), the same for ``V``;
  ``S~ = [[S, 0], [0, 0]]`` so ``U~ S~ V~^T = U S V^T``;
* Galerkin coefficients (:func:`galerkin`): ``S~ = (U~^T U) S (V^T V~)``;
* truncation (:func:`truncation_rank`, :func:`truncate`): SVD ``S = P Sigma Q^T`` of
  the coefficients, ``r_1`` the smallest ``j`` with ``||(sigma_{j+1}, ...)||_2 < theta``
  clamped to ``[r_min, r_max]``, ``U <- U P[:, :r_1]``, ``V <- V Q[:, :r_1]``,
  ``S <- diag(sigma_1 .. sigma_{r_1})``.

Flax: :class:`LowRankDense` is a factorized dense layer; :class:`LowRank` wraps any
model so that every ``nn.Dense`` whose ``kernel`` parameter is a factor dict runs
factorized (turn chosen layers low-rank with :func:`factorize`, back with
:func:`densify`).

Example:
  >>> model = jd.models.MLP(hidden=(256, 256))
  >>> params = model.init(key, x[:1])["params"]
  >>> lr_params = factorize(params, r"body/.*/kernel", rank=16, capacity=64)
  >>> logits = LowRank(model).apply({"params": lr_params}, x)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdec import tree as jtree
from jaxdec.types import PyTree

__all__ = [
    "FACTOR_KEYS",
    "is_factors",
    "lowrank_matmul",
    "reconstruct",
    "active_mask",
    "truncated_svd",
    "random_factors",
    "factorize",
    "densify",
    "densified",
    "factorized_dense",
    "LowRankDense",
    "LowRank",
    "num_new_directions",
    "augment_basis",
    "augment",
    "galerkin",
    "tail_norms",
    "truncation_rank",
    "truncate",
]

FACTOR_KEYS = ("U", "S", "V")
"""Keys of a factor dict."""


def is_factors(x: Any) -> bool:
    """True for a factor dict ``{"U", "S", "V"}`` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, Mapping) and set(x.keys()) == set(FACTOR_KEYS)


def lowrank_matmul(x: jax.Array, f: Mapping[str, jax.Array], precision=None):
    """``x W = ((x U) S) V^T`` for inputs ``x [..., n]``; returns ``[..., m]``."""
    h = jnp.matmul(x, f["U"], precision=precision)
    h = jnp.matmul(h, f["S"], precision=precision)
    return jnp.matmul(h, f["V"].T, precision=precision)


def reconstruct(f: Mapping[str, jax.Array]) -> jax.Array:
    """Dense matrix ``W = U S V^T`` of a factor dict."""
    return (f["U"] @ f["S"]) @ f["V"].T


def active_mask(rank: jax.typing.ArrayLike, capacity: int) -> jax.Array:
    """Boolean ``[capacity]``: ``j < rank`` (the prefix rule's active columns)."""
    return jnp.arange(capacity) < rank


def _check_rank_capacity(where: str, n: int, m: int, rank: int, capacity: int) -> None:
    for name, v in (("rank", rank), ("capacity", capacity)):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {v!r}.")
    if rank > min(n, m, capacity):
        raise ValueError(
            f"{where}: rank {rank} exceeds min(n, m, capacity) = "
            f"{min(n, m, capacity)} for a {n} x {m} kernel with capacity {capacity}; "
            "lower the rank or raise the capacity."
        )


def _pad_cols(a: jax.Array, k: int) -> jax.Array:
    """Zero-pad or cut the columns of ``a`` to exactly ``k``."""
    c = a.shape[-1]
    if c >= k:
        return a[..., :k]
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, k - c)])


def truncated_svd(
    W: jax.typing.ArrayLike, rank: jax.typing.ArrayLike, capacity: int
) -> dict[str, jax.Array]:
    """Best rank-``r`` factors of ``W`` in the prefix layout with capacity ``K``.

    ``W = P diag(sigma) Q^T`` (SVD), ``U = [P[:, :r] | 0]``, ``V = [Q[:, :r] | 0]``,
    ``S = diag(sigma_1, .., sigma_r, 0, ..)``; ``U S V^T`` is the Eckart-Young best
    rank-``r`` approximation. ``rank`` may be traced (masks), ``capacity`` is static.

    Args:
      W: ``[n, m]`` matrix.
      rank: active rank ``r <= min(n, m, K)``.
      capacity: static column count ``K``.

    Returns:
      ``{"U": [n, K], "S": [K, K], "V": [m, K]}``.
    """
    W = jnp.asarray(W)
    P, s, Qt = jnp.linalg.svd(W, full_matrices=False)
    keep = active_mask(rank, capacity)
    U = jnp.where(keep[None, :], _pad_cols(P, capacity), 0)
    V = jnp.where(keep[None, :], _pad_cols(Qt.T, capacity), 0)
    S = jnp.diag(jnp.where(keep, _pad_cols(s[None, :], capacity)[0], 0))
    return {"U": U, "S": S, "V": V}


def random_factors(
    key: jax.Array, W: jax.typing.ArrayLike, rank: int, capacity: int
) -> dict[str, jax.Array]:
    """Random orthonormal bases with Galerkin coefficients for ``W``.

    ``U, V``: the ``Q`` factors of Gaussian ``[n, r]``, ``[m, r]`` matrices (padded to
    ``K`` columns); ``S = U^T W V`` (the Galerkin projection of ``W``).

    Args:
      key: PRNG key.
      W: ``[n, m]`` matrix to project.
      rank: active rank ``r``.
      capacity: static column count ``K``.

    Returns:
      A factor dict in the prefix layout.
    """
    W = jnp.asarray(W)
    n, m = W.shape
    _check_rank_capacity("random_factors", n, m, rank, capacity)
    ku, kv = jax.random.split(key)
    U = jnp.linalg.qr(jax.random.normal(ku, (n, rank), W.dtype))[0]
    V = jnp.linalg.qr(jax.random.normal(kv, (m, rank), W.dtype))[0]
    S = U.T @ W @ V
    K = capacity
    return {
        "U": _pad_cols(U, K),
        "S": jnp.pad(S, ((0, K - rank), (0, K - rank))),
        "V": _pad_cols(V, K),
    }


def _predicate(select) -> Callable[[str, Any], bool]:
    if isinstance(select, str):
        import re

        pattern = re.compile(select)
        return lambda p, _: pattern.search(p) is not None
    if callable(select):
        return lambda p, _: bool(select(p))
    raise ValueError(
        "select must be a regular expression on parameter paths (e.g. "
        "r'body/Dense_\\d+/kernel') or a callable path -> bool."
    )


def factorize(
    params: PyTree,
    select: str | Callable[[str], bool],
    rank: int,
    capacity: int | None = None,
) -> PyTree:
    """Replace the chosen 2-D kernels of one model's params by factor dicts.

    Every leaf whose path (``"body/Dense_0/kernel"``) matches ``select`` becomes
    :func:`truncated_svd` ``(W, rank, capacity)``; all other leaves are kept.
    Run the result with :class:`LowRank` ``(model)``.

    Args:
      params: parameters of ONE model (no worker axis).
      select: regex searched in the path string, or a callable ``path -> bool``.
      rank: active rank ``r``.
      capacity: static column count ``K`` (default ``2 r``).

    Returns:
      The params tree with factor dicts at the chosen positions.

    Raises:
      ValueError: nothing selected, a selected leaf is not 2-D, or ``r`` too large.
    """
    pred = _predicate(select)
    K = 2 * int(rank) if capacity is None else int(capacity)
    hits = []

    def one(path, x):
        p = jtree.path_str(path)
        if not pred(p, x):
            return x
        if jnp.ndim(x) != 2:
            raise ValueError(
                f"factorize: {p} has shape {jnp.shape(x)}; only 2-D dense kernels can "
                "be factorized (select kernels, e.g. r'Dense_\\d+/kernel')."
            )
        _check_rank_capacity(f"factorize ({p})", *jnp.shape(x), rank, K)
        hits.append(p)
        return truncated_svd(x, rank, K)

    out = jax.tree_util.tree_map_with_path(one, params)
    if not hits:
        seen = jax.tree_util.tree_leaves_with_path(params)
        raise ValueError(
            "factorize: the selection matched no parameter; paths look like "
            f"{[jtree.path_str(p) for p, _ in seen][:4]}."
        )
    return out


def densify(params: PyTree) -> PyTree:
    """Replace every factor dict by its dense kernel ``U S V^T`` (for plain models)."""
    return jax.tree.map(
        lambda x: reconstruct(x) if is_factors(x) else x, params, is_leaf=is_factors
    )


def densified(loss_fn: Callable) -> Callable:
    """Lift a loss on dense params to one on factorized params.

    ``densified(loss_fn)(params, batch, key) = loss_fn(densify(params), batch, key)``:
    the kernel is reconstructed as ``W = U S V^T`` (fine for small matrices, e.g.
    least squares; use :class:`LowRank` for networks).
    """

    def f(params, batch, key=None):
        return loss_fn(densify(params), batch, key)

    return f


def _interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.Dense) and context.method_name == "__call__":
        p = mod.variables.get("params", {})
        k = p.get("kernel", None)
        if is_factors(k):
            (x,) = args
            x = jnp.asarray(x)
            y = lowrank_matmul(x, k, precision=mod.precision)
            if mod.use_bias:
                y = y + jnp.reshape(p["bias"], (1,) * (y.ndim - 1) + (-1,))
            return y
    return next_fun(*args, **kwargs)


def factorized_dense():
    """Context manager: inside it, ``nn.Dense`` layers whose ``kernel`` parameter is
    a factor dict compute ``y = ((x U) S) V^T + b``; other layers are unchanged.

    Example:
      >>> with factorized_dense():
      ...     y = model.apply({"params": lr_params}, x)
    """
    return nn.intercept_methods(_interceptor)


class LowRank(nn.Module):
    """Run ``model`` with its factorized ``nn.Dense`` layers computed low-rank.

    Params are those of ``model`` itself (shared scope, no extra nesting); every
    ``nn.Dense`` whose ``kernel`` is a factor dict (from :func:`factorize` or
    :mod:`jaxdec.algorithms.fedlrt`) computes ``((x U) S) V^T + b``. Initializing
    ``LowRank(model)`` gives the dense params of ``model``.

    Attributes:
      model: any flax module built from ``nn.Dense`` (and other) layers.
    """

    model: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        """``model(*args, **kwargs)`` with factorized dense layers."""
        with factorized_dense():
            return self.model(*args, **kwargs)

    def features(self, *args, **kwargs):
        """``model.features(...)`` (the representation), factorized."""
        with factorized_dense():
            return self.model.features(*args, **kwargs)


class LowRankDense(nn.Module):
    """Dense layer ``y = ((x U) S) V^T + b`` with capacity ``K`` and rank ``r``.

    Params: ``kernel = {"U": [n, K], "S": [K, K], "V": [m, K]}`` (prefix layout,
    initialized as the truncated SVD of ``kernel_init``'s dense draw) and ``bias
    [m]``, the same layout :class:`LowRank` runs, so a model built from
    ``LowRankDense`` works with :func:`densify` and
    :mod:`jaxdec.algorithms.fedlrt`.

    Attributes:
      features: output width ``m``.
      rank: initial active rank ``r``.
      capacity: static column count ``K`` (default ``2 r``).
      use_bias: add a bias.
      kernel_init: initializer of the dense draw that is factorized.
      bias_init: bias initializer.
    """

    features: int
    rank: int
    capacity: int | None = None
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        n = x.shape[-1]
        K = 2 * self.rank if self.capacity is None else self.capacity
        _check_rank_capacity("LowRankDense", n, self.features, self.rank, K)

        def init(key, shape, dtype=jnp.float32):
            return truncated_svd(self.kernel_init(key, shape, dtype), self.rank, K)

        k = self.param("kernel", init, (n, self.features))
        y = lowrank_matmul(x, k)
        if self.use_bias:
            b = self.param("bias", self.bias_init, (self.features,))
            y = y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))
        return y


# ----------------------------------------------------------------- augmentation


def num_new_directions(rank, n: int, m: int):
    """``a = min(r, n - r, m - r)``: how many directions augmentation adds."""
    return jnp.minimum(jnp.minimum(rank, n - rank), m - rank)


def augment_basis(
    U: jax.Array, G: jax.Array, rank: jax.typing.ArrayLike, num_new
) -> jax.Array:
    r"""Augment the active basis ``U[:, :r]`` by ``a`` directions of ``G``.

    .. math::
        \tilde U = [\,U_r \mid \operatorname{orth}((I - U_r U_r^\top) G_r)_{:, :a}\,],

    computed as the Householder QR of ``M = [U_r | (I - U_r U_r^T) G_r | 0]``
    (columns of ``G`` beyond ``r`` are ignored): ``U~[:, :r] = U[:, :r]`` exactly
    and ``U~[:, r:r+a] = Q[:, r:r+a]``, orthonormal to ``U_r`` and to each other. If
    the projected gradient is rank-deficient, the QR completes the basis with some
    orthonormal directions (any choice is valid). Columns ``>= r + a`` are zero.

    Args:
      U: ``[n, K]`` basis in the prefix layout (orthonormal active columns).
      G: ``[n, K]`` aggregated gradient ``G_U`` (active columns ``< r``).
      rank: active rank ``r`` (int, may be traced).
      num_new: ``a`` with ``r + a <= min(n, K)`` (see :func:`num_new_directions`).

    Returns:
      ``U~ [n, K]`` with ``r + a`` orthonormal active columns.
    """
    n, K = U.shape
    col = jnp.arange(K)
    act = col < rank
    Ur = jnp.where(act[None, :], U, 0)
    Gr = jnp.where(act[None, :], G, 0)
    P = Gr - Ur @ (Ur.T @ Gr)
    P = P - Ur @ (Ur.T @ P)  # re-orthogonalize (classical Gram-Schmidt twice)
    shifted = jnp.take(P, jnp.clip(col - rank, 0, K - 1), axis=1)
    M = jnp.where(act[None, :], Ur, jnp.where((col < 2 * rank)[None, :], shifted, 0))
    Q = _pad_cols(jnp.linalg.qr(M)[0], K)
    new = (col >= rank) & (col < rank + num_new)
    return jnp.where(new[None, :], Q, Ur)


def augment(
    f: Mapping[str, jax.Array], G_U: jax.Array, G_V: jax.Array, rank
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Augment both bases of a factor dict; the model is unchanged.

    ``U~ = augment_basis(U, G_U, r, a)``, ``V~ = augment_basis(V, G_V, r, a)``,
    ``S~ = [[S, 0], [0, 0]]`` (``S`` itself: it is zero beyond ``r``), with
    ``a = min(r, n - r, m - r, K - r)``; ``U~ S~ V~^T = U S V^T``.

    Args:
      f: factor dict (prefix layout, active rank ``r``).
      G_U: ``[n, K]`` aggregated ``G V S^T``.
      G_V: ``[m, K]`` aggregated ``G^T U S``.
      rank: active rank ``r``.

    Returns:
      ``(augmented factor dict, q)`` with ``q = r + a`` active columns.
    """
    n, K = f["U"].shape
    m = f["V"].shape[0]
    a = jnp.minimum(num_new_directions(rank, n, m), K - rank)
    U = augment_basis(f["U"], G_U, rank, a)
    V = augment_basis(f["V"], G_V, rank, a)
    return {"U": U, "S": f["S"], "V": V}, rank + a


def galerkin(
    U_new: jax.Array, V_new: jax.Array, f: Mapping[str, jax.Array]
) -> jax.Array:
    """Galerkin coefficients of ``W = U S V^T`` in new bases: ``(U~^T U) S (V^T V~)``.

    For an augmented basis (``U~[:, :r] = U``, new columns orthogonal to ``U``) this is
    ``[[S, 0], [0, 0]]`` up to rounding, and ``U~ S~ V~^T = U S V^T``.
    """
    return (U_new.T @ f["U"]) @ f["S"] @ (f["V"].T @ V_new)


# ------------------------------------------------------------------ truncation


def tail_norms(sigma: jax.Array) -> jax.Array:
    """``t_j = ||(sigma_j, sigma_{j+1}, ...)||_2`` for ``j = 0..len``; ``t_len = 0``."""
    sq = jnp.square(sigma)
    tail = jnp.cumsum(sq[::-1])[::-1]
    return jnp.sqrt(jnp.concatenate([tail, jnp.zeros((1,), sq.dtype)]))


def truncation_rank(
    sigma: jax.Array,
    q: jax.typing.ArrayLike,
    theta: jax.typing.ArrayLike,
    r_min: int,
    r_max: int,
) -> jax.Array:
    """Smallest rank whose discarded singular values have norm below ``theta``.

    .. math::
        r_1 = \\operatorname{clip}\\big(\\min\\{j \\le q : \\lVert(\\sigma_{j+1},
        \\dots, \\sigma_q)\\rVert_2 < \\theta\\},\\; r_{\\min},\\; r_{\\max}\\big),

    with ``r_1 = q`` when no ``j < q`` qualifies (``theta = 0`` keeps everything).

    Args:
      sigma: ``[K]`` descending singular values (entries ``>= q`` ignored).
      q: number of active singular values.
      theta: absolute tolerance.
      r_min, r_max: rank bounds.

    Returns:
      int32 ``r_1``.
    """
    K = sigma.shape[0]
    s = jnp.where(jnp.arange(K) < q, sigma, 0)
    t = tail_norms(s)
    j = jnp.arange(K + 1)
    ok = (t < theta) & (j < q)
    r1 = jnp.min(jnp.where(ok, j, q))
    return jnp.clip(r1, r_min, r_max).astype(jnp.int32)


def truncate(
    f: Mapping[str, jax.Array],
    q: jax.typing.ArrayLike,
    theta: jax.typing.ArrayLike,
    r_min: int,
    r_max: int,
    *,
    relative: bool = True,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    r"""Truncate the coefficients by singular values and rotate the bases.

    SVD of the active block ``S = P Sigma Q^T`` (``sigma_1 >= ... >= sigma_q``),
    ``theta_abs = theta ||sigma||_2`` (``relative=True``) or ``theta``,
    ``r_1 = truncation_rank(sigma, q, theta_abs, r_min, r_max)`` and

    .. math::
        U \leftarrow U P_{:, :r_1},\quad V \leftarrow V Q_{:, :r_1},\quad
        S \leftarrow \operatorname{diag}(\sigma_1, \dots, \sigma_{r_1}).

    ``||U S V^T - U' S' V'^T||_F = ||(sigma_{r_1+1}, ...)||_2`` (orthonormal bases).
    The inactive diagonal is filled with a value above ``sigma_1`` before the SVD, so
    every active singular vector (zero singular values included) lies in the active
    coordinates and the new bases stay orthonormal.

    Args:
      f: factor dict with ``q`` active columns (prefix layout).
      q: active count.
      theta: tolerance (relative to ``||S||_F`` or absolute).
      r_min, r_max: rank bounds (``r_min <= q`` is assumed).
      relative: interpret ``theta`` relative to ``||sigma||_2``.

    Returns:
      ``(new factor dict, r_1, discarded tail norm)``.
    """
    S = f["S"]
    K = S.shape[0]
    col = jnp.arange(K)
    act = col < q
    S = jnp.where(act[:, None] & act[None, :], S, 0)
    big = 1.0 + 2.0 * jnp.sqrt(jnp.sum(jnp.square(S)))
    P, sig, Qt = jnp.linalg.svd(S + jnp.diag(jnp.where(act, 0, big).astype(S.dtype)))
    idx = jnp.clip(K - q + col, 0, K - 1)  # the q active triplets come last
    s = jnp.where(act, jnp.take(sig, idx), 0)
    norm = jnp.sqrt(jnp.sum(jnp.square(s)))
    theta_abs = theta * norm if relative else jnp.asarray(theta, s.dtype)
    r1 = truncation_rank(s, q, theta_abs, r_min, r_max)
    keep = col < r1
    Pk = jnp.where(keep[None, :], jnp.take(P, idx, axis=1), 0)
    Qk = jnp.where(keep[None, :], jnp.take(Qt.T, idx, axis=1), 0)
    out = {
        "U": f["U"] @ Pk,
        "S": jnp.diag(jnp.where(keep, s, 0)),
        "V": f["V"] @ Qk,
    }
    return out, r1, tail_norms(s)[r1]
