r"""Partial client participation: which ``k`` of ``n`` clients take part in a round.

Federated rounds on the worker axis run every client's math and mask the result: a
client outside the round's sample keeps its state, and server averages are taken over
the participants only,

.. math::
    \bar x = \frac{\sum_i m_i w_i x_i}{\sum_i m_i w_i}, \qquad m_i \in \{0, 1\},
    \quad \sum_i m_i = k,

with data-size weights ``w_i``. The mask of round ``r`` is a pure function of
``(seed_key, r)``, so a run is reproducible and every subset of size ``k`` is equally
likely (each client takes part with probability ``k / n``).

Example:
  >>> m = jd.participation.client_mask(jax.random.key(0), 20, 5)   # bool [20], 5 True
  >>> xbar = jd.participation.masked_mean(params, m, weights)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.types import PyTree

__all__ = ["check_participation", "client_mask", "round_mask", "masked_mean"]


def check_participation(n: int, k: int | None, where: str) -> int:
    """Validate ``k`` of ``n`` clients per round (``None``: all); return ``k``."""
    if k is None:
        return int(n)
    if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= int(n):
        raise ValueError(
            f"{where}: clients_per_round must be an int in [1, {n}] (the number of "
            f"clients), got {k!r}."
        )
    return int(k)


def client_mask(key: jax.Array, n: int, k: int) -> jax.Array:
    """Uniformly random subset of exactly ``k`` of ``n`` clients, as a bool mask.

    Draws i.i.d. uniforms ``u_i`` and keeps the ``k`` smallest (a uniformly random
    ``k``-subset). ``k == n`` returns all True without drawing.

    Args:
      key: PRNG key of this round.
      n: number of clients (static).
      k: clients per round (static), ``1 <= k <= n``.

    Returns:
      bool ``[n]`` with exactly ``k`` True entries.
    """
    k = check_participation(n, k, "client_mask")
    if k == n:
        return jnp.ones((n,), bool)
    u = jax.random.uniform(key, (n,))
    rank = jnp.argsort(jnp.argsort(u))
    return rank < k


def round_mask(
    seed_key: jax.Array, round_index: jax.Array, n: int, k: int
) -> jax.Array:
    """The mask of round ``r``: ``client_mask(fold_in(seed_key, r), n, k)``."""
    return client_mask(jax.random.fold_in(seed_key, round_index), n, k)


def masked_mean(
    tree: PyTree, mask: jax.Array, weights: jax.Array | None = None
) -> PyTree:
    """Weighted mean over the participating clients, leaves without the worker axis.

    ``sum_i m_i w_i x_i / sum_i m_i w_i`` as one matrix-vector product per leaf (fast
    on CPU, unlike a reduction over the leading axis).

    Args:
      tree: leaves ``[n, ...]``.
      mask: bool ``[n]`` participation mask (at least one True).
      weights: non-negative client weights ``[n]`` (``None``: equal).

    Returns:
      The weighted mean, leaves ``[...]``.
    """
    m = mask.astype(jnp.float32)
    if weights is not None:
        m = m * jnp.asarray(weights, jnp.float32)
    c = m / jnp.sum(m)

    def leaf(x):
        x2 = x.reshape(x.shape[0], -1)
        return jnp.matmul(c.astype(x.dtype), x2).reshape(x.shape[1:])

    return jax.tree.map(leaf, tree)
