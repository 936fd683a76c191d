r"""Personalization on the worker axis: split models into a shared body and personal
heads, and the decentralized baselines of personalized methods.

Every worker's parameters are split by a boolean *head mask* (``is_head``: a mask
pytree, a path predicate ``path -> bool``, or a regular expression searched in the
``"a/b/c"`` path string). Head leaves are personal (``theta_i``), the rest is the
shared body (``phi_i``). A split keeps the structure of the full parameter tree and
puts ``None`` where a leaf belongs to the other part, so ``body`` and ``head`` are
ordinary pytrees (optax, ``jax.vmap`` and mixers see only their own leaves) and
``merge_params(*split_params(p, mask)) == p``.

Baselines in the same ``Algorithm(init, step)`` API:

* :func:`dfedper` (decentralized FedPer): per round ``H`` joint local optax steps on
  the whole model, then gossip of the body only,

  .. math::
      (\phi_i, \theta_i) \leftarrow \text{H optax steps on } f_i(\theta, \phi),
      \qquad \phi_i \leftarrow \sum_j W_{ij} \phi_j,

  heads never leave their worker. ``is_head`` all-False would be local SGD with
  gossip every ``H`` steps (use :func:`jaxdec.algorithms.dsgd` with
  ``jd.gossip.every(H, mix)`` for that).
* :func:`finetune_head`: local head fine-tuning with the body frozen and no
  communication, ``theta_i <- theta_i + opt.update(grad_theta f_i(theta_i, phi_i))``
  (run after D-PSGD for the "decentralized fine-tuning" baseline).

Helpers: :func:`round_sampler` turns a per-step sampler into one that returns the
``S`` minibatches of a round (``[n, S, b, ...]``); :func:`personalized_stationarity`
is the DePRL sheet's stationarity measure.

Example:
  >>> is_head = lambda path: path.startswith("head")
  >>> algo = dfedper(loss_fn, optax.sgd(0.05), jd.gossip.dense(W), is_head=is_head,
  ...                local_steps=6)
  >>> state = algo.init(params)                       # params leaves [n, ...]
  >>> state, info = algo.step(state, batch, key)      # batch leaves [n, 6, b, ...]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.types import Algorithm, LossFn, MixingFn, PyTree, Sampler

__all__ = [
    "HeadMask",
    "resolve_head_mask",
    "split_params",
    "merge_params",
    "head_mask_of",
    "round_sampler",
    "check_round_batch",
    "personalized_stationarity",
    "DFedPerState",
    "DFedPerInfo",
    "dfedper",
    "FinetuneState",
    "FinetuneInfo",
    "finetune_head",
]

HeadMask = PyTree | Callable[[str], bool] | str
"""A mask pytree of Python bools (True = head), a predicate on ``"a/b/c"`` parameter
paths, or a regular expression searched in the path string."""


def _is_none(x: Any) -> bool:
    return x is None


# ------------------------------------------------------------------- body / head


def resolve_head_mask(is_head: HeadMask, params: PyTree, *, name: str) -> PyTree:
    """Turn ``is_head`` into a validated mask pytree of Python bools for ``params``.

    Args:
      is_head: a mask pytree, a path predicate, or a regular expression.
      params: the parameter tree (with or without the worker axis).
      name: the calling function, for error messages.

    Returns:
      A pytree of bools with the structure of ``params`` (True = head leaf).

    Raises:
      ValueError: a mask that does not match ``params``, or a split with an empty
        body or an empty head.
    """
    if isinstance(is_head, str) or callable(is_head):
        mask = jtree.mask_by_path(params, is_head)
    else:
        mask = is_head
    jtree.validate_mask(mask, params, name=f"{name}: is_head")
    flags = jax.tree.leaves(mask)
    if all(flags):
        raise ValueError(
            f"{name}: is_head marks every parameter as head, so there is no shared "
            "body to gossip; for purely local training use jd.algorithms.dsgd with "
            "jd.gossip.identity(). Check the predicate, e.g. "
            "is_head=lambda p: p.startswith('head')."
        )
    if not any(flags):
        raise ValueError(
            f"{name}: is_head marks no parameter as head (paths are like "
            f"{_first_paths(params)}); pass a predicate or regex that selects the "
            "personal layers, e.g. is_head=lambda p: p.startswith('head')."
        )
    return mask


def _first_paths(params: PyTree, k: int = 3) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(params)[0][:k]
    return [jtree.path_str(p) for p, _ in paths]


def split_params(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Split ``params`` into ``(body, head)`` by a head mask.

    ``body`` has the structure of ``params`` with ``None`` at head leaves, ``head``
    has ``None`` at body leaves.

    Args:
      params: any parameter pytree.
      mask: bool pytree with the structure of ``params`` (True = head).

    Returns:
      ``(body, head)``.
    """
    body = jax.tree.map(lambda m, x: None if m else x, mask, params)
    head = jax.tree.map(lambda m, x: x if m else None, mask, params)
    return body, head


def merge_params(body: PyTree, head: PyTree) -> PyTree:
    """Inverse of :func:`split_params`: fill ``body``'s ``None`` holes from ``head``."""
    return jax.tree.map(
        lambda b, h: h if b is None else b, body, head, is_leaf=_is_none
    )


def head_mask_of(body: PyTree) -> PyTree:
    """The head mask implied by a split body (True where ``body`` holds ``None``)."""
    return jax.tree.map(lambda b: b is None, body, is_leaf=_is_none)


# ----------------------------------------------------------------------- sampling


def round_sampler(sampler: Sampler, steps: int) -> Sampler:
    """Batches of a whole round: ``S`` consecutive minibatches per worker.

    ``round(key, r)`` stacks ``sampler(key, r S + s)`` for ``s = 0..S-1`` on a new
    axis after the worker axis, so leaves ``[n, b, ...]`` become ``[n, S, b, ...]``.
    An epoch-wise sampler (``make_sampler(..., replace=False)``) therefore keeps
    walking through every worker's data across rounds.

    Args:
      sampler: ``sampler(key, step) -> batch`` with leaves ``[n, b, ...]``.
      steps: local steps per round ``S >= 1``.

    Returns:
      ``round(key, r) -> batch`` with leaves ``[n, S, b, ...]``; a
      ``jax.tree_util.Partial`` (data arrays stay jit arguments in ``jd.run``).
    """
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(
            f"round_sampler: steps must be an int >= 1 (local steps per round), got "
            f"{steps!r}."
        )
    S = int(steps)

    def sample(inner, key, r):
        r = jnp.asarray(r, jnp.int32)
        ts = r * S + jnp.arange(S, dtype=jnp.int32)
        # a loop, not a vmap: compiles the sampler once (vmapped PRNG code is slow
        # to compile on CPU) and costs little next to S training steps
        out = jax.lax.map(lambda t: inner(key, t), ts)  # [S, n, b, ...]
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)

    return jax.tree_util.Partial(sample, sampler)


def check_round_batch(batch: PyTree, n: int, steps: int, name: str) -> None:
    """Raise ``ValueError`` unless every batch leaf is ``[n, steps, ...]``."""
    for x in jax.tree.leaves(batch):
        if jnp.ndim(x) < 2 or jnp.shape(x)[:2] != (n, steps):
            raise ValueError(
                f"{name}: batch leaves must be [n, steps, b, ...] = [{n}, {steps}, "
                f"...] (one minibatch per local step of the round), got a leaf of "
                f"shape {jnp.shape(x)}; build the sampler with "
                f"jaxdec.algorithms.personalized.round_sampler(sampler, {steps})."
            )


# ------------------------------------------------------------------- stationarity


def personalized_stationarity(
    full_loss_fn: Callable[[PyTree, Any], jax.Array], *, is_head: HeadMask
) -> Callable[[Any, Any], dict[str, jax.Array]]:
    r"""The DePRL sheet's stationarity measure, with full local gradients.

    .. math::
        M = \Big\lVert \frac1N \sum_i \nabla_\phi f_i(\theta_i, \bar\phi)
            \Big\rVert^2 + \frac1N \sum_i
            \lVert \nabla_\theta f_i(\theta_i, \bar\phi) \rVert^2,
        \qquad \bar\phi = \frac1N \sum_i \phi_i .

    (Reconstructed from the method family; the paper's exact form is not in the
    available description.)

    Args:
      full_loss_fn: ``full_loss_fn(params_i, data_i) -> f_i`` for ONE worker, its
        full local objective (e.g. a masked mean over its padded data).
      is_head: head mask, predicate or regex (see :data:`HeadMask`).

    Returns:
      ``measure(params_or_state, data) -> {"stationarity", "body_grad_sq",
      "head_grad_sq"}`` where ``data`` leaves carry the worker axis and
      ``params_or_state`` is worker-axis params or any state with ``.params``;
      jittable.
    """
    if not callable(full_loss_fn):
        raise ValueError(
            "personalized_stationarity: full_loss_fn must be callable "
            "full_loss_fn(params_i, data_i)."
        )

    def measure(target, data) -> dict[str, jax.Array]:
        params = getattr(target, "params", target)
        mask = resolve_head_mask(is_head, params, name="personalized_stationarity")
        body, head = split_params(params, mask)
        phi_bar = jtree.worker_mean(body)

        def grads(theta_i, data_i):
            f = lambda phi, th: full_loss_fn(merge_params(phi, th), data_i)
            return jax.grad(f, argnums=(0, 1))(phi_bar, theta_i)

        g_phi, g_theta = jax.vmap(grads)(head, data)
        body_sq = jtree.sq_norm(jtree.worker_mean(g_phi))
        head_sq = jtree.sq_norm(g_theta) / jtree.num_workers(head)
        return {
            "stationarity": body_sq + head_sq,
            "body_grad_sq": body_sq,
            "head_grad_sq": head_sq,
        }

    return measure


# ------------------------------------------------------------------------ dfedper


class DFedPerState(NamedTuple):
    """State of :func:`dfedper`.

    Attributes:
      params: worker parameters (body and head), leaves ``[n, ...]``.
      opt_state: per-worker optax state over the whole model.
      count: int32 round counter ``k``.
    """

    params: PyTree
    opt_state: PyTree
    count: jax.Array


class DFedPerInfo(NamedTuple):
    """Per-round diagnostics of :func:`dfedper` (returned, not carried).

    Attributes:
      loss: per-worker mean minibatch loss over the round's local steps, ``[n]``.
      consensus: body consensus distance ``(1/n) sum_i ||phi_i - phi_bar||^2``
        after mixing.
      floats_sent: mean floats a worker sent this round (body leaves only).
      finite: per-worker flag ``[n]``, losses and new parameters finite.
    """

    loss: jax.Array
    consensus: jax.Array
    floats_sent: jax.Array
    finite: jax.Array


def _check_steps(value: int, name: str, what: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name}: {what} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def dfedper(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mix: MixingFn,
    *,
    is_head: HeadMask,
    local_steps: int,
) -> Algorithm:
    r"""Decentralized FedPer: joint local steps, then gossip of the body only.

    One round on worker ``i`` (``x = (phi, theta)``, batches ``xi_{i,s}``)::

        for s = 0..H-1:  g = grad_x l(x_i; xi_{i,s})
                         (u, s_i) = opt.update(g, s_i, x_i);  x_i <- x_i + u
        phi_i <- sum_j W_ij(k) phi_j          (heads and optimizer states stay)

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE worker.
      optimizer: optax transformation on the whole model, per worker.
      mix: mixing function applied to the body leaves once per round.
      is_head: head mask, path predicate or regex (see :data:`HeadMask`).
      local_steps: ``H >= 1`` joint local steps per round.

    Returns:
      ``Algorithm(init, step)``: ``init(params) -> DFedPerState``,
      ``step(state, batch, key) -> (DFedPerState, DFedPerInfo)`` with batch leaves
      ``[n, H, b, ...]`` (see :func:`round_sampler`).
    """
    _common.check_factory_args(loss_fn, optimizer, mix, "dfedper")
    H = _check_steps(local_steps, "dfedper", "local_steps", 1)
    vg = jax.value_and_grad(loss_fn)

    def init(params: PyTree) -> DFedPerState:
        jtree.num_workers(params)
        resolve_head_mask(is_head, params, name="dfedper")
        return DFedPerState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(params),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: DFedPerState, batch, key) -> tuple[DFedPerState, DFedPerInfo]:
        x, t = state.params, state.count
        n = jtree.num_workers(x)
        check_round_batch(batch, n, H, "dfedper")
        mask = resolve_head_mask(is_head, x, name="dfedper")
        keys = jax.vmap(lambda k: jax.random.split(k, H))(jax.random.split(key, n))

        def local(x_i, s_i, batch_i, keys_i):
            def one(carry, inp):
                p, s = carry
                loss, g = vg(p, *inp)
                u, s = optimizer.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            (p, s), losses = jax.lax.scan(one, (x_i, s_i), (batch_i, keys_i))
            return p, s, jnp.mean(losses)

        x_half, opt_state, loss = jax.vmap(local)(x, state.opt_state, batch, keys)
        body, head = split_params(x_half, mask)
        new_body = mix(body, t)
        new_x = merge_params(new_body, head)
        info = DFedPerInfo(
            loss=loss,
            consensus=jtree.consensus_distance(new_body),
            floats_sent=_common.floats_sent(mix, t, body),
            finite=_common.all_finite(loss, new_x),
        )
        return DFedPerState(new_x, opt_state, t + 1), info

    return Algorithm(init, step)


# ------------------------------------------------------------------ fine-tuning


class FinetuneState(NamedTuple):
    """State of :func:`finetune_head`.

    Attributes:
      params: worker parameters, leaves ``[n, ...]`` (the body never changes).
      opt_state: per-worker optax state over the head leaves only.
      count: int32 step counter.
    """

    params: PyTree
    opt_state: PyTree
    count: jax.Array


class FinetuneInfo(NamedTuple):
    """Per-step diagnostics of :func:`finetune_head`.

    Attributes:
      loss: per-worker minibatch loss before the step, ``[n]``.
      floats_sent: always 0 (no communication).
      finite: per-worker flag ``[n]``.
    """

    loss: jax.Array
    floats_sent: jax.Array
    finite: jax.Array


def finetune_head(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    is_head: HeadMask,
) -> Algorithm:
    r"""Local head fine-tuning: the body is frozen and nothing is communicated.

    .. math::
        g_i = \nabla_\theta \ell(\theta_i, \phi_i; \xi_i), \quad
        (u_i, s_i) = \mathrm{opt.update}(g_i, s_i, \theta_i), \quad
        \theta_i \leftarrow \theta_i + u_i .

    Start it from another algorithm's final parameters (e.g. D-PSGD) to get the
    "decentralized training + local fine-tuning" baseline.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE worker.
      optimizer: optax transformation on the head leaves, per worker.
      is_head: head mask, path predicate or regex.

    Returns:
      ``Algorithm(init, step)`` with batch leaves ``[n, b, ...]`` (one step per
      call, like :func:`jaxdec.algorithms.dsgd`).
    """
    if not callable(loss_fn):
        raise ValueError(
            "finetune_head: loss_fn must be callable loss_fn(params, batch, key)."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            "finetune_head: optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.sgd(0.05)), got {type(optimizer).__name__}."
        )

    def init(params: PyTree) -> FinetuneState:
        jtree.num_workers(params)
        mask = resolve_head_mask(is_head, params, name="finetune_head")
        _, head = split_params(params, mask)
        return FinetuneState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(head),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: FinetuneState, batch, key) -> tuple[FinetuneState, FinetuneInfo]:
        x = state.params
        n = jtree.num_workers(x)
        mask = resolve_head_mask(is_head, x, name="finetune_head")
        body, head = split_params(x, mask)
        keys = jax.random.split(key, n)

        def one(phi, theta, s, batch_i, key_i):
            f = lambda th: loss_fn(merge_params(phi, th), batch_i, key_i)
            loss, g = jax.value_and_grad(f)(theta)
            u, s = optimizer.update(g, s, theta)
            return optax.apply_updates(theta, u), s, loss

        new_head, opt_state, loss = jax.vmap(one)(
            body, head, state.opt_state, batch, keys
        )
        new_x = merge_params(body, new_head)
        info = FinetuneInfo(
            loss=loss,
            floats_sent=jnp.zeros((), jnp.float32),
            finite=_common.all_finite(loss, new_x),
        )
        return FinetuneState(new_x, opt_state, state.count + 1), info

    return Algorithm(init, step)
