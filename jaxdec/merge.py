"""Global merging of decentralized models (the "single final merge").

``global_merge(state)`` writes the exact mean of every learnable floating-point leaf
of ``state.params`` into every worker, ``theta_k <- theta_bar = (1/m) sum_j theta_j``
(the same as one gossip round with ``W = J``); optimizer states, counters and keys
are not merged. ``evaluate_merged`` evaluates that merged model without touching the
training state (a pure function: copy, merge, evaluate, discard).

Normalization statistics (BatchNorm) are never averaged: ``batch_statistics``
re-estimates them for the merged model on pooled training batches (reset, then a
cumulative average over up to ``num_batches = 32`` batches in training mode), and
``evaluate_merged(..., model=, calibration=)`` evaluates the merged model with them.

Example:
  >>> final = jd.merge.global_merge(state)
  >>> metrics = jd.merge.evaluate_merged(eval_fn, state)   # state unchanged
  >>> xb = x_pooled[: 32 * 64].reshape(32, 64, -1)      # 32 pooled batches
  >>> metrics = jd.merge.evaluate_merged(eval_fn, state, model=model, calibration=xb)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdec import tree as jtree
from jaxdec.models import as_variables
from jaxdec.types import PyTree

__all__ = ["global_merge", "merged_params", "batch_statistics", "evaluate_merged"]


def _merge_leaf(x: jax.Array) -> jax.Array:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return jnp.broadcast_to(jtree.mean0(x)[None], x.shape)


def merged_params(params: PyTree) -> PyTree:
    """``theta_bar = (1/m) sum_k theta_k`` for floating leaves (axis 0 removed)."""
    return jax.tree.map(jtree.mean0, params)


def global_merge(state: Any, *, field: str = "params") -> Any:
    """Replace every worker's ``state.<field>`` by the worker mean.

    ``theta_k <- (1/m) sum_j theta_j`` for every floating leaf; integer leaves and
    every other field of ``state`` (optimizer state, trackers, counters) are kept.

    Args:
      state: an algorithm state NamedTuple with a worker-axis ``field``.
      field: name of the parameter field (default ``"params"``).

    Raises:
      ValueError: if ``state`` has no such field.
    """
    if not hasattr(state, field) or not hasattr(state, "_replace"):
        raise ValueError(
            f"global_merge: expected an algorithm state NamedTuple with a '{field}' "
            f"field, got {type(state).__name__}; pass field= to name the parameters."
        )
    return state._replace(**{field: jax.tree.map(_merge_leaf, getattr(state, field))})


def batch_statistics(
    model: Any,
    params: PyTree,
    calibration: jax.typing.ArrayLike,
    *,
    num_batches: int = 32,
    collection: str = "batch_stats",
) -> PyTree:
    """Re-estimate the normalization statistics of ONE model (no worker axis).

    Statistics are reset and replaced by the cumulative average over the first
    ``K = min(num_batches, len(calibration))`` batches, the model run in training
    mode (each normalization layer sees the minibatch statistics of its input):

    .. math::
        \\hat\\mu = \\frac{1}{K} \\sum_{k=1}^{K} \\mu_k(\\theta), \\qquad
        \\hat\\sigma^2 = \\frac{1}{K} \\sum_{k=1}^{K} \\sigma^2_k(\\theta).

    Works for any flax ``nn.BatchNorm`` whatever its momentum ``m < 1``: each batch is
    run twice, from running statistics 0 and 1, and ``mu_k = s_0 / (1 - m)`` with
    ``m = s_1 - s_0`` recovers the batch's own statistics from the momentum update
    ``s <- m s + (1 - m) mu_k``.

    Args:
      model: a flax module with ``__call__(x, train)`` and BatchNorm layers (e.g.
        ``jd.models.MLP(norm="batch")``).
      params: the model's ``params`` (one model, e.g. ``merged_params(params)``).
      calibration: batches ``[K, b, ...]`` of (pooled) training inputs.
      num_batches: at most this many batches are used (the sheet's 32).
      collection: the statistics collection name.

    Returns:
      The statistics tree ``{collection: ...}`` to use as
      ``{"params": params, **stats}``.

    Raises:
      ValueError: ``calibration`` without a batch axis, ``num_batches < 1``, or a
        model that has no such collection.
    """
    xs = jnp.asarray(calibration)
    if (
        isinstance(num_batches, bool)
        or int(num_batches) != num_batches
        or num_batches < 1
    ):
        raise ValueError(
            f"batch_statistics: num_batches must be an int >= 1, got {num_batches!r}."
        )
    if xs.ndim < 3:
        raise ValueError(
            f"batch_statistics: calibration must be batches [K, b, ...], got shape "
            f"{xs.shape}; reshape pooled inputs, e.g. x[: K * b].reshape(K, b, -1)."
        )
    xs = xs[: int(num_batches)]
    shapes = jax.eval_shape(model.init, jax.random.key(0), xs[0])
    if collection not in shapes:
        raise ValueError(
            f"batch_statistics: the model has no '{collection}' collection (it has "
            f"{sorted(shapes)}); there are no statistics to re-estimate."
        )
    template = shapes[collection]
    p = as_variables(params)["params"]

    def stats_at(fill: float, x: jax.Array) -> PyTree:
        start = jax.tree.map(lambda a: jnp.full(a.shape, fill, a.dtype), template)
        _, upd = model.apply(
            {"params": p, collection: start}, x, train=True, mutable=[collection]
        )
        return upd[collection]

    def one(x: jax.Array) -> PyTree:
        s0, s1 = stats_at(0.0, x), stats_at(1.0, x)
        return jax.tree.map(lambda a, b: a / (1.0 - (b - a)), s0, s1)

    per_batch = jax.lax.map(one, xs)
    return {collection: jax.tree.map(lambda a: jnp.mean(a, axis=0), per_batch)}


def evaluate_merged(
    eval_fn: Callable[[Any], dict[str, jax.Array]],
    state: Any,
    *,
    field: str = "params",
    model: Any = None,
    calibration: jax.typing.ArrayLike | None = None,
    num_batches: int = 32,
) -> dict[str, jax.Array]:
    """Counterfactual evaluation of the merged model: ``eval_fn(global_merge(state))``.

    Pure: the training ``state`` is not modified (JAX arrays are immutable), so a
    run that evaluates merged models at checkpoints follows the same trajectory.

    With ``model`` and ``calibration`` (a BatchNorm model): copy, merge, recalibrate
    the statistics with :func:`batch_statistics` on ``calibration`` (pooled training
    batches ``[K, b, ...]``), evaluate, discard; ``eval_fn`` then receives the
    worker-axis variables ``{"params": ..., "batch_stats": ...}`` of the merged model
    (``jd.models.apply_fn`` accepts them).
    """
    if (model is None) != (calibration is None):
        raise ValueError(
            "evaluate_merged: pass both model= and calibration= (pooled training "
            "batches [K, b, ...]) to recalibrate normalization statistics, or neither."
        )
    merged = global_merge(state, field=field)
    if model is None:
        return eval_fn(merged)
    params = getattr(state, field)
    n = jtree.num_workers(params)
    theta = merged_params(params)
    stats = batch_statistics(model, theta, calibration, num_batches=num_batches)
    return eval_fn({"params": getattr(merged, field), **jtree.replicate(stats, n)})
