"""Label-resampling data protocol (single-merging paper's ``sampling="resample"``).

Worker ``k`` draws label proportions ``q_k ~ Dir(alpha 1_C)`` once; every step it
draws ``b`` labels i.i.d. from ``q_k`` and, for each label ``c``, a uniformly random
training example of class ``c`` **with replacement** (workers may share examples).
The training set is stored once, sorted by class, not per worker.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dirichlet_proportions", "label_resample_sampler"]


def dirichlet_proportions(
    n: int, num_classes: int, alpha: float, seed: int
) -> np.ndarray:
    """``q [n, C]`` with rows ``q_k ~ Dir(alpha 1_C)`` (each row sums to one)."""
    if n < 1 or num_classes < 1:
        raise ValueError(f"need n >= 1 and num_classes >= 1, got {n}, {num_classes}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    return np.random.default_rng(seed).dirichlet(np.full(num_classes, alpha), size=n)


def label_resample_sampler(x, y, q, batch_size: int):
    """Jittable ``sampler(key, step) -> (x [n, b, ...], y [n, b])`` of the protocol.

    For worker ``k``: ``c_j ~ Categorical(q_k)``, then row ``r_j`` uniform among the
    training examples of class ``c_j``, for ``j = 1..b``; keys from
    ``split(fold_in(key, step), n)``.

    Args:
      x: training inputs ``[N, ...]``; y: integer labels ``[N]``.
      q: label proportions ``[n, C]`` (rows sum to one, ``C`` = number of classes).
      batch_size: ``b >= 1``.

    Returns:
      A ``jax.tree_util.Partial`` (data are pytree leaves, so passing it to jit as an
      argument keeps them out of the compiled program).
    """
    x, y, q = np.asarray(x), np.asarray(y), np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or not np.allclose(q.sum(1), 1.0, atol=1e-6) or (q < 0).any():
        raise ValueError("q must be [n, C] non-negative with rows summing to one.")
    C = q.shape[1]
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"labels must lie in 0..{C - 1} to match q's {C} columns.")
    counts = np.bincount(y, minlength=C)
    if (counts[q.max(0) > 0] == 0).any():
        raise ValueError("a class with positive proportion has no training example.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size}.")
    order = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n, b = q.shape[0], int(batch_size)

    def sample(xs, ys, log_q, start, count, key, step):
        keys = jax.random.split(jax.random.fold_in(key, step), n)

        def one(k, lq):
            k_c, k_r = jax.random.split(k)
            c = jax.random.categorical(k_c, lq, shape=(b,))
            u = jax.random.uniform(k_r, (b,))
            rows = start[c] + jnp.minimum(
                (u * count[c]).astype(jnp.int32), count[c] - 1
            )
            return xs[rows], ys[rows]

        return jax.vmap(one)(keys, log_q)

    with np.errstate(divide="ignore"):
        log_q = np.log(q).astype(np.float32)
    return jax.tree_util.Partial(
        sample,
        jnp.asarray(x[order]),
        jnp.asarray(y[order].astype(np.int32)),
        jnp.asarray(log_q),
        jnp.asarray(starts.astype(np.int32)),
        jnp.asarray(counts.astype(np.int32)),
    )
