"""Padded per-worker device arrays and a jittable per-worker minibatch sampler.

Worker ``i`` owns ``counts[i]`` samples stored in rows ``0..counts[i]-1`` of
``x[i]`` / ``y[i]``; rows ``counts[i]..m_max-1`` are zero padding that is never
sampled. The sampler is a pure function of ``(key, step)`` that runs inside
``jax.jit`` / ``lax.scan`` (no host round trip), vmapped over workers.

Example:
  >>> import jax
  >>> data = stack(ds.x_train, ds.y_train, parts)          # WorkerData
  >>> sample = make_sampler(data, batch_size=32)
  >>> x, y = jax.jit(sample)(jax.random.key(0), 0)         # [n, 32, ...], [n, 32]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "WorkerData",
    "stack",
    "from_worker_arrays",
    "make_sampler",
    "full_batch",
    "worker_full_batches",
    "num_workers",
]


class WorkerData(NamedTuple):
    """Per-worker datasets padded to a common length ``m_max`` (a pytree).

    Attributes:
      x: ``[n, m_max, ...]`` features; padding rows are zero.
      y: ``[n, m_max]`` labels (int32 for class labels; float32 for regression
        targets); padding entries are zero.
      counts: int32 ``[n]``, number of real samples per worker (``>= 1``).
    """

    x: jax.Array
    y: jax.Array
    counts: jax.Array

    @property
    def num_workers(self) -> int:
        """Number of workers ``n``."""
        return int(self.counts.shape[0])

    @property
    def max_count(self) -> int:
        """Padded per-worker length ``m_max``."""
        return int(self.y.shape[1])


def num_workers(data: WorkerData) -> int:
    """Number of workers ``n`` in ``data`` (the leading axis)."""
    return data.num_workers


def _label_dtype(y: np.ndarray) -> np.dtype:
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def _feature_dtype(x: np.ndarray) -> np.dtype:
    if np.issubdtype(x.dtype, np.floating):
        return np.dtype(np.float32)
    return x.dtype


def stack(x: ArrayLike, y: ArrayLike, parts: Sequence[ArrayLike]) -> WorkerData:
    """Gather per-worker index sets into padded ``[n, m_max, ...]`` device arrays.

    ``x_out[i, r] = x[parts[i][r]]`` for ``r < counts[i] = |parts[i]|``, zero
    otherwise, with ``m_max = max_i counts[i]``.

    Args:
      x: host features ``[N, ...]`` (floats are stored as float32).
      y: host labels ``[N]`` (integers -> int32, floats -> float32).
      parts: one non-empty integer index array per worker (e.g. from
        :func:`jaxdec.data.dirichlet`).

    Returns:
      A :class:`WorkerData` on the default device.

    Raises:
      ValueError: mismatched ``x``/``y`` lengths, no parts, an empty part, a
        non-integer part, or indices outside ``[0, N)``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"stack: need x [N, ...] and y [N] with the same N, got {x.shape} and "
            f"{y.shape}."
        )
    if len(parts) == 0:
        raise ValueError("stack: parts is empty; pass one index array per worker.")
    idx = []
    for i, p in enumerate(parts):
        p = np.asarray(p)
        if p.ndim != 1 or p.size == 0:
            raise ValueError(
                f"stack: parts[{i}] has shape {p.shape}; every worker needs a "
                "non-empty 1-D index array (raise min_size or use fewer workers)."
            )
        if not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"stack: parts[{i}] has dtype {p.dtype}; need integers.")
        if p.min() < 0 or p.max() >= len(x):
            raise ValueError(
                f"stack: parts[{i}] has indices outside [0, {len(x)}); the partition "
                "was made for a different dataset."
            )
        idx.append(p)
    n = len(idx)
    counts = np.array([len(p) for p in idx], dtype=np.int32)
    m_max = int(counts.max())
    xs = np.zeros((n, m_max, *x.shape[1:]), dtype=_feature_dtype(x))
    ys = np.zeros((n, m_max), dtype=_label_dtype(y))
    for i, p in enumerate(idx):  # host-side, once
        xs[i, : len(p)] = x[p]
        ys[i, : len(p)] = y[p]
    return WorkerData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(counts))


def from_worker_arrays(
    x: ArrayLike, y: ArrayLike, counts: ArrayLike | None = None
) -> WorkerData:
    """Wrap already worker-stacked arrays ``x [n, m, ...]``, ``y [n, m]``.

    Args:
      x: per-worker features ``[n, m, ...]``.
      y: per-worker labels/targets ``[n, m]``.
      counts: valid rows per worker ``[n]`` (default: all ``m`` rows valid). Rows
        ``>= counts[i]`` are zeroed.

    Returns:
      A :class:`WorkerData`.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or y.ndim != 2 or x.shape[:2] != y.shape:
        raise ValueError(
            f"from_worker_arrays: need x [n, m, ...] and y [n, m], got {x.shape} and "
            f"{y.shape}."
        )
    n, m = y.shape
    c = np.full(n, m, np.int32) if counts is None else np.asarray(counts, np.int32)
    if c.shape != (n,) or c.min() < 1 or c.max() > m:
        raise ValueError(
            f"from_worker_arrays: counts must be [n]={n} ints in [1, {m}], got {c}."
        )
    valid = np.arange(m)[None, :] < c[:, None]
    xs = np.where(valid.reshape(n, m, *([1] * (x.ndim - 2))), x, 0)
    ys = np.where(valid, y, 0)
    return WorkerData(
        jnp.asarray(xs.astype(_feature_dtype(x))),
        jnp.asarray(ys.astype(_label_dtype(y))),
        jnp.asarray(c),
    )


def _check_data(data: WorkerData, fn: str) -> None:
    if not isinstance(data, WorkerData):
        raise ValueError(
            f"{fn}: expected a WorkerData, got {type(data).__name__}; build one with "
            "jaxdec.data.stack(x, y, parts)."
        )
    n = data.counts.shape[0]
    if data.x.shape[:1] != (n,) or data.y.shape[:1] != (n,) or data.y.ndim != 2:
        raise ValueError(
            f"{fn}: inconsistent WorkerData shapes x {data.x.shape}, y "
            f"{data.y.shape}, counts {data.counts.shape}; rebuild it with stack()."
        )


def _min_count(data: WorkerData) -> int:
    """Smallest per-worker count if concrete, else 1 (safe lower bound)."""
    try:
        c = np.asarray(data.counts)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return 1
    if c.min() < 1 or c.max() > data.y.shape[1]:
        raise ValueError(
            f"make_sampler: counts must lie in [1, m_max={data.y.shape[1]}], got "
            f"min {c.min()} max {c.max()}; every worker needs at least one sample."
        )
    return int(c.min())


def _mix32(x: jax.Array) -> jax.Array:
    """The ``lowbias32`` integer hash: a bijection of uint32 with strong avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _key_words(key: jax.Array) -> jax.Array:
    """The first two uint32 words of a (typed or raw) PRNG key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.reshape(-1)[:2].astype(jnp.uint32)


def make_sampler(
    data: WorkerData, batch_size: int, *, replace: bool = True
) -> Callable[[jax.Array, ArrayLike], tuple[jax.Array, jax.Array]]:
    """Build a jittable per-worker minibatch sampler ``sampler(key, step)``.

    With ``replace=True`` worker ``i`` draws ``b`` i.i.d. row indices
    ``r_{ij} = u_{ij} mod c_i`` from uint32 random bits ``u_{ij}`` of the ``i``-th
    key of ``split(fold_in(key, step), n)``, i.e. uniform on ``{0, ..., c_i - 1}``
    up to a modulo bias below ``c_i / 2^32``.

    With ``replace=False`` every worker walks through its data in epochs, each a
    fresh uniform permutation: slot ``j`` of step ``t`` is stream position
    ``p = t b + j``, epoch ``e = p // c_i``, offset ``r = p mod c_i``, and the row
    is ``pi_{i,e}(r)``, with ``pi_{i,e}`` the permutation of ``0..c_i-1`` that
    sorts the slots ``s`` by the sort keys ``h(h(s + k_0) xor k_1)``, where
    ``(k_0, k_1)`` are the words of ``fold_in(fold_in(key, i), e)`` and ``h`` the
    ``lowbias32`` bijective integer hash (distinct slots get distinct keys; padding
    slots get the largest key and a stable sort puts them last). A hash instead of
    ``jax.random.bits`` per epoch keeps the compiled program small and fast.
    Consecutive steps therefore visit every sample of worker ``i`` exactly once per
    epoch, for any ``b`` and any per-worker counts. Cost: ``O(E m_max log m_max)``
    per worker and step with ``E = 2 + (b - 1) // min_i c_i`` epochs touched by one
    batch.

    Both modes are pure functions of ``(key, step)`` (same inputs, same batch),
    vmapped over workers, and never return padding rows.

    The sampler is a ``jax.tree_util.Partial`` whose pytree leaves are the data
    arrays: passed as an argument to a jitted function (as :func:`jaxdec.run`
    does), the data stay device buffers instead of being baked into the compiled
    program as constants.

    Args:
      data: a :class:`WorkerData`.
      batch_size: per-worker batch size ``b >= 1``.
      replace: sample with replacement (default) or epoch-wise without.

    Returns:
      ``sampler(key, step) -> (x [n, b, ...], y [n, b])``; ``key`` is a JAX PRNG
      key, ``step`` an int (Python or traced int32).

    Example:
      >>> sample = make_sampler(data, 16, replace=False)
      >>> batch = jax.jit(sample)(key, state.count)
    """
    _check_data(data, "make_sampler")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(
            f"make_sampler: batch_size must be an int >= 1, got {batch_size}."
        )
    b = int(batch_size)
    n = data.num_workers
    m_max = data.max_count
    num_epochs = 2 + (b - 1) // _min_count(data)

    def gather(x_i, y_i, rows):
        return jnp.take(x_i, rows, axis=0), jnp.take(y_i, rows, axis=0)

    if replace:

        def sample_with(x_all, y_all, counts, key: jax.Array, step: ArrayLike):
            keys = jax.random.split(jax.random.fold_in(key, step), n)

            def one(k, x_i, y_i, c_i):
                u = jax.random.bits(k, (b,), dtype=jnp.uint32)
                rows = jnp.remainder(u, c_i.astype(jnp.uint32)).astype(jnp.int32)
                return gather(x_i, y_i, rows)

            return jax.vmap(one)(keys, x_all, y_all, counts)

        return jax.tree_util.Partial(sample_with, data.x, data.y, data.counts)

    slots = jnp.arange(m_max, dtype=jnp.int32)
    offsets = jnp.arange(b, dtype=jnp.int32)

    def sample_without(x_all, y_all, counts, key: jax.Array, step: ArrayLike):
        step = jnp.asarray(step, dtype=jnp.int32)

        def one(i, x_i, y_i, c_i):
            # p = step*b + j split as e*c + r without forming step*b (int32 safe).
            t = jnp.remainder(step, c_i) * b + offsets
            e = jnp.floor_divide(step, c_i) * b + jnp.floor_divide(t, c_i)
            r = jnp.remainder(t, c_i)
            e0 = e[0]
            key_i = jax.random.fold_in(key, i)

            def perm(de):
                words = _key_words(jax.random.fold_in(key_i, e0 + de))
                u = _mix32(_mix32(slots.astype(jnp.uint32) + words[0]) ^ words[1])
                u = jnp.where(slots < c_i, u, jnp.uint32(0xFFFFFFFF))
                return jnp.argsort(u, stable=True).astype(jnp.int32)

            perms = jax.vmap(perm)(jnp.arange(num_epochs, dtype=jnp.int32))
            rows = perms[e - e0, r]
            return gather(x_i, y_i, rows)

        return jax.vmap(one)(jnp.arange(n, dtype=jnp.int32), x_all, y_all, counts)

    return jax.tree_util.Partial(sample_without, data.x, data.y, data.counts)


def full_batch(data: WorkerData) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """All of every worker's data with a validity mask, for exact local gradients.

    The local objective of worker ``i`` is
    ``f_i = (1/c_i) sum_r mask[i, r] * loss(x[i, r], y[i, r])``.

    Args:
      data: a :class:`WorkerData`.

    Returns:
      ``((x, y), mask)`` with ``x [n, m_max, ...]``, ``y [n, m_max]`` and boolean
      ``mask [n, m_max]``, ``mask[i, r] = r < counts[i]``.
    """
    _check_data(data, "full_batch")
    rows = jnp.arange(data.y.shape[1], dtype=jnp.int32)
    mask = rows[None, :] < data.counts[:, None]
    return (data.x, data.y), mask


worker_full_batches = full_batch
"""Alias of :func:`full_batch`."""
