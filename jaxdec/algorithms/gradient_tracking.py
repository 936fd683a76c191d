r"""Gradient tracking (DIGing, Nedic-Olshevsky-Shi 2017) with any optax optimizer.

Every worker keeps its iterate ``x_i``, a tracker ``y_i`` of the network-average
gradient and its previous stochastic gradient ``g_i^{t-1}``. At step ``t``, with
``g_i^t = grad f_i(x_i^t; xi_i^t)``:

* combine-then-adapt (``order="cta"``, DIGing, default)::

      y^t     = W y^{t-1} + g^t - g^{t-1}
      x^{t+1} = W x^t + u^t,      (u^t, s^t) = opt.update(y^t, s^{t-1}, x^t)

* adapt-then-combine (``order="atc"``)::

      y^t     = W (y^{t-1} + g^t - g^{t-1})
      x^{t+1} = W (x^t + u^t)

with ``y^{-1} = g^{-1} = 0`` so that ``y^0 = g^0`` (the standard initialization
``y^0 = grad f(x^0)``) and the tracking invariant
``mean_i y_i^t = mean_i g_i^t`` holds at every step for doubly-stochastic ``W``.
With ``optax.sgd(alpha)``, ``u^t = -alpha y^t``. On heterogeneous data and a
constant step, the iterates reach the exact minimizer of ``(1/n) sum_i f_i`` (no
heterogeneity bias, unlike D-SGD).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.types import Algorithm, LossFn, MixingFn, PyTree


class GradientTrackingState(NamedTuple):
    """State of :func:`gradient_tracking`.

    Attributes:
      params: iterates ``x^t``, leaves ``[n, ...]``.
      tracker: ``y^{t-1}`` (zeros before the first step).
      prev_grad: ``g^{t-1}`` (zeros before the first step).
      opt_state: per-worker optax state.
      count: int32 step counter ``t``.
    """

    params: PyTree
    tracker: PyTree
    prev_grad: PyTree
    opt_state: PyTree
    count: jax.Array


class GradientTrackingInfo(NamedTuple):
    """Per-step diagnostics of :func:`gradient_tracking`.

    Attributes:
      loss: per-worker minibatch loss at ``x^t``, ``[n]``.
      consensus: consensus distance of ``x^{t+1}``.
      tracker_consensus: consensus distance of ``y^t``.
      floats_sent: mean floats a worker sent this step (iterate and tracker).
      finite: per-worker flag ``[n]``.
      aux: per-worker auxiliary output of ``loss_fn`` or None.
    """

    loss: jax.Array
    consensus: jax.Array
    tracker_consensus: jax.Array
    floats_sent: jax.Array
    finite: jax.Array
    aux: Any = None


def gradient_tracking(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mix: MixingFn,
    *,
    order: str = "cta",
    has_aux: bool = False,
) -> Algorithm:
    """Build gradient tracking (see the module docstring for the update rule).

    Args:
      loss_fn: ``loss_fn(params, batch, key)`` for ONE worker.
      optimizer: optax transformation fed with the tracker ``y`` as its gradient.
      mix: mixing function; should be doubly stochastic for exact tracking.
      order: ``"cta"`` (DIGing) or ``"atc"``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``Algorithm(init, step)``.
    """
    _common.check_factory_args(loss_fn, optimizer, mix, "gradient_tracking")
    _common.check_order(order, "gradient_tracking")
    _common.check_has_aux(has_aux, "gradient_tracking")
    value_and_grad = _common.worker_value_and_grad(loss_fn, has_aux)

    def init(params: PyTree) -> GradientTrackingState:
        jtree.num_workers(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return GradientTrackingState(
            params=params,
            tracker=zeros,
            prev_grad=zeros,
            opt_state=jax.vmap(optimizer.init)(params),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state, batch, key):
        x, t = state.params, state.count
        loss, aux, g = value_and_grad(x, batch, key)
        innovation = jax.tree.map(lambda a, b: a - b, g, state.prev_grad)
        if order == "cta":
            y = jax.tree.map(jnp.add, mix(state.tracker, t), innovation)
        else:
            y = mix(jax.tree.map(jnp.add, state.tracker, innovation), t)
        u, opt_state = jax.vmap(optimizer.update)(y, state.opt_state, x)
        if order == "cta":
            new_x = optax.apply_updates(mix(x, t), u)
        else:
            new_x = mix(optax.apply_updates(x, u), t)
        info = GradientTrackingInfo(
            loss=loss,
            consensus=jtree.consensus_distance(new_x),
            tracker_consensus=jtree.consensus_distance(y),
            floats_sent=2.0 * _common.floats_sent(mix, t, x),
            finite=_common.all_finite(loss, new_x),
            aux=aux,
        )
        return GradientTrackingState(new_x, y, g, opt_state, t + 1), info

    return Algorithm(init, step)
