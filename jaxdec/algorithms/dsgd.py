r"""Decentralized SGD (D-PSGD) with any optax optimizer and any mixing function.

Worker ``i`` holds ``x_i`` and an optax state ``s_i``. With
``g_i = grad f_i(x_i; xi_i)`` and ``(u_i, s_i) <- opt.update(g_i, s_i, x_i)``:

* adapt-then-combine (``order="atc"``, default)::

      x_i <- sum_j W_ij(t) (x_j + u_j)

* combine-then-adapt (``order="cta"``, Lian et al. 2017)::

      x_i <- sum_j W_ij(t) x_j + u_i

  (the gradient is taken at the pre-mixing iterate, so computation and
  communication can overlap).

Local SGD / periodic averaging is ``dsgd`` with ``jd.gossip.every(H, mix)``;
server-based parallel SGD is ``dsgd`` with ``jd.gossip.complete()``. The optimizer
state is never mixed.

Example:
  >>> algo = jd.algorithms.dsgd(loss_fn, optax.sgd(0.1), jd.gossip.dense(W))
  >>> state = algo.init(params)                   # params leaves [n, ...]
  >>> state, info = algo.step(state, batch, key)  # batch leaves [n, b, ...]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.types import Algorithm, LossFn, MixingFn, PyTree


class DSGDState(NamedTuple):
    """State of :func:`dsgd`.

    Attributes:
      params: worker parameters ``x``, leaves ``[n, ...]``.
      opt_state: per-worker optax state (``jax.vmap(opt.init)(params)``).
      count: int32 step counter ``t``.
    """

    params: PyTree
    opt_state: PyTree
    count: jax.Array


class DSGDInfo(NamedTuple):
    """Per-step diagnostics of :func:`dsgd` (returned, not carried).

    Attributes:
      loss: per-worker minibatch loss at the pre-step parameters, ``[n]``.
      consensus: consensus distance ``(1/n) sum_i ||x_i - x_bar||^2`` after the step.
      floats_sent: mean number of floats a worker sent this step.
      finite: per-worker flag ``[n]``, loss and new parameters finite.
      aux: per-worker auxiliary output of ``loss_fn`` (``has_aux=True``), else None.
    """

    loss: jax.Array
    consensus: jax.Array
    floats_sent: jax.Array
    finite: jax.Array
    aux: Any = None


def dsgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mix: MixingFn,
    *,
    order: str = "atc",
    has_aux: bool = False,
) -> Algorithm:
    """Build decentralized SGD (see the module docstring for the update rule).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE worker (or
        ``(scalar, aux)`` with ``has_aux=True``).
      optimizer: optax transformation applied independently on every worker.
      mix: a :data:`~jaxdec.types.MixingFn` (``jd.gossip.dense(W)``, ...).
      order: ``"atc"`` (adapt-then-combine) or ``"cta"`` (combine-then-adapt).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``Algorithm(init, step)`` with ``init(params) -> DSGDState`` and
      ``step(state, batch, key) -> (DSGDState, DSGDInfo)``.
    """
    _common.check_factory_args(loss_fn, optimizer, mix, "dsgd")
    _common.check_order(order, "dsgd")
    _common.check_has_aux(has_aux, "dsgd")
    value_and_grad = _common.worker_value_and_grad(loss_fn, has_aux)

    def init(params: PyTree) -> DSGDState:
        jtree.num_workers(params)
        return DSGDState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(params),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: DSGDState, batch, key) -> tuple[DSGDState, DSGDInfo]:
        x, t = state.params, state.count
        loss, aux, g = value_and_grad(x, batch, key)
        u, opt_state = jax.vmap(optimizer.update)(g, state.opt_state, x)
        if order == "atc":
            new_x = mix(optax.apply_updates(x, u), t)
        else:
            new_x = optax.apply_updates(mix(x, t), u)
        info = DSGDInfo(
            loss=loss,
            consensus=jtree.consensus_distance(new_x),
            floats_sent=_common.floats_sent(mix, t, x),
            finite=_common.all_finite(loss, new_x),
            aux=aux,
        )
        return DSGDState(new_x, opt_state, t + 1), info

    return Algorithm(init, step)
