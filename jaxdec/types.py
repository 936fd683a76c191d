"""Type aliases and the two protocols every algorithm shares.

A *worker-axis pytree* is any pytree whose leaves all carry the number of workers
``n`` as their leading dimension (``[n, ...]``). Algorithms are pure state
transitions bundled in :class:`Algorithm`; communication is a :data:`MixingFn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
"""Any JAX pytree (nested dicts / tuples / NamedTuples of arrays)."""

Batch = Any
"""A per-worker minibatch; leaves carry the worker axis first (``[n, b, ...]``)."""

LossFn = Callable[..., Any]
"""``loss_fn(params, batch, key) -> scalar`` written for ONE worker (or
``(scalar, aux)`` when ``has_aux=True``)."""

MixingFn = Callable[[PyTree, jax.Array], PyTree]
"""``mix(tree, step) -> tree``: a linear map on the leading (worker) axis of every
leaf. Static mixers ignore ``step``; time-varying and random ones use it."""

Sampler = Callable[[jax.Array, jax.Array], Batch]
"""``sampler(key, step) -> batch``: jittable per-worker minibatch sampler."""


class Algorithm(NamedTuple):
    """A decentralized / federated algorithm as a pair of pure functions.

    Attributes:
      init: ``init(params, ...) -> State`` where ``params`` leaves are ``[n, ...]``.
      step: ``step(state, batch, key) -> (State, Info)``.
    """

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, Any]]
