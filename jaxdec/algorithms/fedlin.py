r"""FedLin-style variance-corrected FedAvg (and plain FedAvg with local steps).

One ``step`` is one communication round. The server holds ``x`` (no worker axis);
in round ``t`` the participating clients ``P_t`` (all, or ``k`` of ``C`` drawn
uniformly) with weights ``w_c`` (equal or data sizes), ``p_c = w_c / sum_{P_t} w``:

1. (``correction="full"``) every client computes ``g_c = grad f_c(x; B^g_c)`` on its
   gradient batch and uploads it; the server broadcasts ``g = sum_c p_c g_c``;
   the correction is ``v_c = g - g_c`` (``correction="none"``: ``v_c = 0``, plain
   FedAvg with local steps).
2. local loop, ``y_c <- x``, optax state reset, ``s = 0 .. s*-1``::

       d = grad f_c(y_c; B_{c,s}) + v_c,   (u, o_c) = opt.update(d, o_c, y_c),
       y_c <- y_c + u

   (with SGD ``y_c <- y_c - lambda (grad f_c(y_c) - grad f_c(x) + grad f(x))``).
3. the server averages ``x <- sum_c p_c y_c``.

Floats per participating client and round (``d`` parameters): down ``d`` (``x``)
plus ``d`` (``g``, full only); up ``d`` (``y_c``) plus ``d`` (``g_c``, full only).

The batch of a round is ``(grad_batch, local_batches)``: ``grad_batch`` leaves
``[C, b_g, ...]`` (may be ``None`` without correction), ``local_batches`` leaves
``[C, s*, b, ...]``; :func:`round_sampler` builds both from a ``WorkerData``.

Example:
  >>> algo = fedlin(loss_fn, optax.sgd(0.05), local_steps=10, correction="full")
  >>> state = algo.init(params)                     # one model, no worker axis
  >>> sampler = round_sampler(data, 64, 10, grad_batch_size=512)
  >>> state, info = algo.step(state, sampler(key, 0), key)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec import participation
from jaxdec import tree as jtree
from jaxdec.data.worker_data import WorkerData, make_sampler
from jaxdec.types import Algorithm, LossFn, PyTree

__all__ = [
    "FedLinState",
    "FedLinInfo",
    "fedlin",
    "round_sampler",
    "check_round_args",
    "check_round_batch",
    "select_clients",
    "client_mean",
    "local_loop",
]

CORRECTIONS_FEDLIN = ("full", "none")


class FedLinState(NamedTuple):
    """State of :func:`fedlin`.

    Attributes:
      params: the server model ``x`` (no worker axis).
      count: int32 round counter ``t``.
    """

    params: PyTree
    count: jax.Array


class FedLinInfo(NamedTuple):
    """Per-round diagnostics of :func:`fedlin` (returned, not carried).

    Attributes:
      loss: ``[k]`` participants' loss on their first local batch at the round-start
        model ``x``.
      global_loss: ``sum_c p_c loss_c``.
      floats_up: floats one participating client uploads this round.
      floats_down: floats one participating client downloads this round.
      clients: int32 ``[k]`` ids of the participants.
      finite: ``[C]`` loss and new model finite (True for non-participants).
    """

    loss: jax.Array
    global_loss: jax.Array
    floats_up: jax.Array
    floats_down: jax.Array
    clients: jax.Array
    finite: jax.Array


# ------------------------------------------------------------- shared round pieces


def check_round_args(
    name: str,
    loss_fn: LossFn,
    optimizer,
    local_steps: int,
    clients_per_round: int | None,
    weights,
) -> np.ndarray | None:
    """Validate the arguments every round-based federated factory shares.

    Returns:
      ``weights`` as a float64 NumPy array (``None``: equal weights).
    """
    if not callable(loss_fn):
        raise ValueError(
            f"{name}: loss_fn must be callable loss_fn(params, batch, key)."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"{name}: optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.sgd(0.05)), got {type(optimizer).__name__}."
        )
    if isinstance(local_steps, bool) or int(local_steps) != local_steps:
        raise ValueError(
            f"{name}: local_steps must be an int >= 1, got {local_steps!r}."
        )
    if local_steps < 1:
        raise ValueError(f"{name}: local_steps must be >= 1, got {local_steps}.")
    if clients_per_round is not None and (
        isinstance(clients_per_round, bool)
        or int(clients_per_round) != clients_per_round
        or clients_per_round < 1
    ):
        raise ValueError(
            f"{name}: clients_per_round must be None (all) or an int >= 1, got "
            f"{clients_per_round!r}."
        )
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"{name}: weights must be a 1-D array of non-negative client weights "
            f"(e.g. data sizes) with a positive sum, got {weights!r}."
        )
    return w


def check_round_batch(
    name: str, batch, local_steps: int, need_grad: bool
) -> tuple[PyTree, PyTree, int]:
    """Split ``batch = (grad_batch, local_batches)`` and check its shapes.

    Returns:
      ``(grad_batch, local_batches, C)``.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"{name}: batch must be a pair (grad_batch, local_batches) with leaves "
            "[C, b_g, ...] and [C, local_steps, b, ...]; build it with "
            "jaxdec.algorithms.fedlin.round_sampler."
        )
    gb, lb = batch
    leaves = jax.tree.leaves(lb)
    if not leaves or any(jnp.ndim(x) < 2 for x in leaves):
        raise ValueError(f"{name}: local_batches leaves must be [C, local_steps, ...].")
    C = int(jnp.shape(leaves[0])[0])
    bad = [jnp.shape(x) for x in leaves if tuple(jnp.shape(x)[:2]) != (C, local_steps)]
    if bad:
        raise ValueError(
            f"{name}: local_batches leaves must start with [C, local_steps] = "
            f"[{C}, {local_steps}], got {bad[0]}; sample local_steps batches per round."
        )
    if need_grad:
        g = jax.tree.leaves(gb)
        if not g or any(jnp.ndim(x) < 1 or jnp.shape(x)[0] != C for x in g):
            raise ValueError(
                f"{name}: grad_batch must have leaves [C={C}, b_g, ...] (the batch "
                "of the round-start gradients); pass grad_batch_size to round_sampler."
            )
    return gb, lb, C


def select_clients(
    key: jax.Array,
    round_index: jax.Array,
    C: int,
    k: int | None,
    weights: np.ndarray | None,
    dtype,
    name: str,
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """Participants of a round and their averaging weights.

    ``mask = participation.round_mask(key, t, C, k)``, ``idx`` its ``k`` True
    positions (ascending), ``p_c = w_c / sum_{idx} w`` in ``dtype``.

    Returns:
      ``(idx or None when all take part, mask [C], p [k])``.
    """
    k = participation.check_participation(C, k, name)
    if weights is not None and weights.shape != (C,):
        raise ValueError(
            f"{name}: weights has shape {weights.shape}, but the batch has C={C} "
            "clients; pass one weight per client."
        )
    if k == C:
        idx, mask = None, jnp.ones((C,), bool)
    else:
        mask = participation.round_mask(key, round_index, C, k)
        idx = jnp.nonzero(mask, size=k)[0].astype(jnp.int32)
    w = jnp.ones((C,), dtype) if weights is None else jnp.asarray(weights, dtype)
    w = w if idx is None else w[idx]
    return idx, mask, w / jnp.sum(w)


def take_clients(tree: PyTree, idx: jax.Array | None) -> PyTree:
    """Rows ``idx`` of every leaf's client axis (all rows when ``idx`` is None)."""
    if idx is None:
        return tree
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def client_mean(tree: PyTree, p: jax.Array) -> PyTree:
    """``sum_c p_c x_c`` over the leading axis, in each leaf's dtype (one GEMV)."""

    def leaf(x):
        return jnp.tensordot(
            p.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST
        )

    return jax.tree.map(leaf, tree)


def local_loop(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    x0: PyTree,
    batches: PyTree,
    keys: jax.Array,
    correction: PyTree | None,
    project: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, jax.Array]:
    """``s*`` corrected local optax steps on every client, from the shared ``x0``.

    For client ``c`` (vmapped): ``y <- x0``, ``o <- opt.init(x0)``, then for
    ``s = 0 .. s*-1``: ``d = proj(grad f(y; B_{c,s}, k_{c,s}) + v_c)``,
    ``(u, o) = opt.update(d, o, y)``, ``y <- y + proj(u)``, with
    ``k_{c,s} = fold_in(key_c, s)``.

    Args:
      loss_fn: ``f(y, batch, key) -> scalar`` for one client.
      optimizer: optax transformation.
      x0: start point (no client axis).
      batches: leaves ``[k, s*, ...]``.
      keys: ``[k]`` client keys.
      correction: ``v`` with leaves ``[k, ...]`` or None.
      project: optional map applied to gradients and updates (masks).

    Returns:
      ``(y [k, ...], loss of the first local step [k])``.
    """
    vg = jax.value_and_grad(loss_fn)
    proj = project if project is not None else (lambda t: t)

    def client(b_c, key_c, v_c):
        def body(carry, xs):
            y, o = carry
            b, s = xs
            loss, g = vg(y, b, jax.random.fold_in(key_c, s))
            if v_c is not None:
                g = jax.tree.map(jnp.add, g, v_c)
            u, o = optimizer.update(proj(g), o, y)
            y = optax.apply_updates(y, proj(u))
            return (y, o), loss

        steps = jnp.arange(jax.tree.leaves(b_c)[0].shape[0], dtype=jnp.int32)
        (y, _), losses = jax.lax.scan(body, (x0, optimizer.init(x0)), (b_c, steps))
        return y, losses[0]

    return jax.vmap(client)(batches, keys, correction)


def finite_flags(
    C: int, idx: jax.Array | None, loss: jax.Array, new_params: PyTree
) -> jax.Array:
    """``[C]`` flags: participants' losses and the new global model finite."""
    ok_model = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)])
    )
    ok = jnp.isfinite(loss) & ok_model
    if idx is None:
        return ok
    return jnp.ones((C,), bool).at[idx].set(ok)


# --------------------------------------------------------------------- algorithm


def fedlin(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    local_steps: int,
    correction: str = "full",
    clients_per_round: int | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> Algorithm:
    """Build FedLin-style corrected FedAvg (see the module docstring).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE client.
      optimizer: client optax transformation (its state is reset every round).
      local_steps: ``s*`` local steps per round.
      correction: ``"full"`` (FedLin: ``v_c = g - g_c``) or ``"none"`` (FedAvg).
      clients_per_round: ``k`` participants per round (``None``: all ``C``).
      weights: client weights ``[C]`` (e.g. data sizes; ``None``: equal).

    Returns:
      ``Algorithm(init, step)``: ``init(params) -> FedLinState`` for one model (no
      worker axis); ``step(state, (grad_batch, local_batches), key) ->
      (FedLinState, FedLinInfo)``.
    """
    w = check_round_args(
        "fedlin", loss_fn, optimizer, local_steps, clients_per_round, weights
    )
    if correction not in CORRECTIONS_FEDLIN:
        raise ValueError(
            f"fedlin: correction must be 'full' or 'none', got {correction!r}."
        )
    full = correction == "full"
    vg = jax.value_and_grad(loss_fn)

    def init(params: PyTree) -> FedLinState:
        if not jax.tree.leaves(params):
            raise ValueError("fedlin: params has no array leaves.")
        return FedLinState(
            params=jax.tree.map(jnp.asarray, params), count=jnp.zeros((), jnp.int32)
        )

    def step(state: FedLinState, batch, key) -> tuple[FedLinState, FedLinInfo]:
        gb, lb, C = check_round_batch("fedlin", batch, local_steps, full)
        x, t = state.params, state.count
        dtype = jax.tree.leaves(x)[0].dtype
        k_part, k_grad, k_local = jax.random.split(key, 3)
        idx, _, p = select_clients(k_part, t, C, clients_per_round, w, dtype, "fedlin")
        lb = take_clients(lb, idx)
        lkeys = take_clients(jax.random.split(k_local, C), idx)
        v = None
        if full:
            gkeys = take_clients(jax.random.split(k_grad, C), idx)
            _, g_c = jax.vmap(vg, in_axes=(None, 0, 0))(x, take_clients(gb, idx), gkeys)
            g = client_mean(g_c, p)
            v = jax.tree.map(lambda a, b: a[None] - b, g, g_c)
        y, loss = local_loop(loss_fn, optimizer, x, lb, lkeys, v)
        new_x = client_mean(y, p)
        d = float(jtree.num_params(x, per_worker=False))
        floats = jnp.asarray(d * (2.0 if full else 1.0), jnp.float32)
        info = FedLinInfo(
            loss=loss,
            global_loss=jnp.dot(p.astype(loss.dtype), loss),
            floats_up=floats,
            floats_down=floats,
            clients=jnp.arange(C, dtype=jnp.int32) if idx is None else idx,
            finite=finite_flags(C, idx, loss, new_x),
        )
        return FedLinState(new_x, t + 1), info

    return Algorithm(init, step)


def round_sampler(
    data: WorkerData,
    batch_size: int,
    local_steps: int,
    grad_batch_size: int | None = None,
    *,
    replace: bool = True,
) -> Callable[[jax.Array, jax.typing.ArrayLike], tuple]:
    """Sampler of one federated round: ``(grad_batch, local_batches)``.

    ``local_batches``: ``s* b`` samples per client from
    ``make_sampler(data, s* b, replace=replace)(k_1, t)`` reshaped to
    ``[C, s*, b, ...]``; ``grad_batch``: ``make_sampler(data, b_g)(k_2, t)``
    (``[C, b_g, ...]``, ``None`` when ``grad_batch_size`` is None), with
    ``(k_1, k_2) = split(key)``. A ``jax.tree_util.Partial`` whose leaves are the
    data arrays (passed to jit as arguments by :func:`jaxdec.run`).

    Args:
      data: per-client data (``jaxdec.data.stack``).
      batch_size: local batch size ``b``.
      local_steps: ``s*``.
      grad_batch_size: ``b_g`` or None.
      replace: sample with replacement (default) or epoch-wise.

    Returns:
      ``sampler(key, t) -> (grad_batch, (x [C, s*, b, ...], y [C, s*, b]))``.
    """
    for nm, v in (("batch_size", batch_size), ("local_steps", local_steps)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"round_sampler: {nm} must be an int >= 1, got {v!r}.")
    local = make_sampler(data, int(batch_size) * int(local_steps), replace=replace)
    grad = None
    if grad_batch_size is not None:
        grad = make_sampler(data, int(grad_batch_size), replace=replace)
    s, b = int(local_steps), int(batch_size)

    def sample(local, grad, key, t):
        k1, k2 = jax.random.split(key)
        xs, ys = local(k1, t)
        lb = (xs.reshape(xs.shape[0], s, b, *xs.shape[2:]), ys.reshape(-1, s, b))
        return (None if grad is None else grad(k2, t)), lb

    return jax.tree_util.Partial(sample, local, grad)
