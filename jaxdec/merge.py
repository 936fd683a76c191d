"""Global merging of decentralized models (the "single final merge").

``global_merge(state)`` writes the exact mean of every learnable floating-point leaf
of ``state.params`` into every worker, ``theta_k <- theta_bar = (1/m) sum_j theta_j``
(the same as one gossip round with ``W = J``); optimizer states, counters and keys
are not merged. ``evaluate_merged`` evaluates that merged model without touching the
training state (a pure function: copy, merge, evaluate, discard).

Example:
  >>> final = jd.merge.global_merge(state)
  >>> metrics = jd.merge.evaluate_merged(eval_fn, state)   # state unchanged
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdec import tree as jtree
from jaxdec.types import PyTree

__all__ = ["global_merge", "merged_params", "evaluate_merged"]


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


def evaluate_merged(
    eval_fn: Callable[[Any], dict[str, jax.Array]], state: Any, *, field: str = "params"
) -> dict[str, jax.Array]:
    """Counterfactual evaluation of the merged model: ``eval_fn(global_merge(state))``.

    Pure: the training ``state`` is not modified (JAX arrays are immutable), so a
    run that evaluates merged models at checkpoints follows the same trajectory.
    """
    return eval_fn(global_merge(state, field=field))
