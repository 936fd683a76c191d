r"""DePRL: decentralized personalized learning with a shared representation.

Xiong, Yan, Wang, Li, "DePRL: Achieving Linear Convergence Speedup in Personalized
Decentralized Learning with Shared Representations", AAAI 2024 (arXiv:2312.10815).

Worker ``i``'s model is a shared **body** ``phi_i`` followed by a personal **head**
``theta_i`` (split by ``is_head``, see :mod:`jaxdec.algorithms.personalized`). With
batches ``xi_{i,s}`` (head phase) and ``zeta_{i,s}`` (body phase), one round
``k -> k+1`` (``order="paper"``) is:

1. head phase, body frozen (``tau`` optax steps, no body gradient is taken)::

       theta <- theta_i^k;  for s < tau:
           g = grad_theta l(theta, phi_i^k; xi_{i,s})
           (u, sh_i) = opt_head.update(g, sh_i, theta);  theta <- theta + u
       theta_i^{k+1} = theta

2. body phase at the new head (``s_b`` optax steps)::

       phi <- phi_i^k;  for s < s_b:
           g = grad_phi l(theta_i^{k+1}, phi; zeta_{i,s})
           (u, sb_i) = opt_body.update(g, sb_i, phi);  phi <- phi + u
       phi_i^{k+1/2} = phi

3.-4. communication and consensus of the body only::

       phi_i^{k+1} = sum_j W_ij(k) phi_j^{k+1/2}

   Heads and optimizer states never leave their worker; ``floats_sent`` counts
   the body leaves only.

``order="gossip_first"`` (the authors' code) mixes the body at the start of the
round and then runs steps 1-2. Code-mimic switches (all off by default):
``reset_opt_state_each_round``, ``single_optimizer`` (one optimizer state over the
whole model, frozen part overwritten after every step), ``lr_decay_per_round``
(updates scaled by ``gamma^k``, i.e. ``lr_k = lr gamma^k`` for optimizers ending in
a scale by the learning rate, such as ``optax.sgd``), and per-worker step counts for
epoch-based phases on unequal local datasets (extra steps are exact no-ops).
:func:`deprl_code_preset` bundles them.

Example:
  >>> is_head = lambda path: path.startswith("head")
  >>> algo = deprl(loss_fn, optax.sgd(0.05), optax.sgd(0.05), jd.gossip.dense(W),
  ...              is_head=is_head, head_steps=5)
  >>> state = algo.init(params)                    # params leaves [n, ...]
  >>> state, info = algo.step(state, batch, key)   # batch leaves [n, 5 + 1, b, ...]
  >>> state.params                                 # merged body + head
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

from jaxdec import gossip, topology
from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.algorithms.personalized import (
    HeadMask,
    check_round_batch,
    head_mask_of,
    merge_params,
    resolve_head_mask,
    split_params,
)
from jaxdec.types import Algorithm, LossFn, MixingFn, PyTree

__all__ = [
    "DePRLState",
    "DePRLInfo",
    "deprl",
    "deprl_code_preset",
    "epoch_steps",
    "theory_step_sizes",
    "ORDERS",
]

ORDERS = ("paper", "gossip_first")


class DePRLState(NamedTuple):
    """State of :func:`deprl`.

    Attributes:
      body: bodies ``phi_i`` (the params tree with ``None`` at head leaves), leaves
        ``[n, ...]``.
      head: heads ``theta_i`` (``None`` at body leaves), leaves ``[n, ...]``.
      head_opt_state: per-worker ``optimizer_head`` state over the head leaves
        (``()`` with ``single_optimizer=True``).
      body_opt_state: per-worker ``optimizer_body`` state over the body leaves (over
        the whole model with ``single_optimizer=True``).
      count: int32 round counter ``k``.
    """

    body: PyTree
    head: PyTree
    head_opt_state: PyTree
    body_opt_state: PyTree
    count: jax.Array

    @property
    def params(self) -> PyTree:
        """Merged worker parameters (body and head), leaves ``[n, ...]``."""
        return merge_params(self.body, self.head)


class DePRLInfo(NamedTuple):
    """Per-round diagnostics of :func:`deprl` (returned, not carried).

    Attributes:
      head_loss: per-worker mean minibatch loss over the head steps, ``[n]``
        (``nan`` when ``head_steps = 0``).
      body_loss: per-worker mean minibatch loss over the body steps, ``[n]``.
      consensus: body consensus distance ``(1/n) sum_i ||phi_i - phi_bar||^2`` at
        the end of the round.
      floats_sent: mean floats a worker sent this round (body leaves only).
      finite: per-worker flag ``[n]``, losses and new parameters finite.
    """

    head_loss: jax.Array
    body_loss: jax.Array
    consensus: jax.Array
    floats_sent: jax.Array
    finite: jax.Array


def _check_opt(opt, what: str) -> None:
    if not isinstance(opt, optax.GradientTransformation):
        raise ValueError(
            f"deprl: {what} must be an optax.GradientTransformation (e.g. "
            f"optax.sgd(0.05)), got {type(opt).__name__}."
        )


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"deprl: {what} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_per_worker(counts, total: int, what: str) -> jax.Array | None:
    if counts is None:
        return None
    c = np.asarray(counts)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(
            f"deprl: {what} must be a 1-D int array [n] (one step count per worker), "
            f"got {c.dtype} {c.shape}."
        )
    if c.min() < 0 or c.max() > total:
        raise ValueError(
            f"deprl: {what} must lie in [0, {total}] (the padded step count), got "
            f"range [{c.min()}, {c.max()}]; raise head_steps / body_steps to the "
            "largest per-worker count."
        )
    return jnp.asarray(c, jnp.int32)


def _scale(u: PyTree, factor: jax.Array | None) -> PyTree:
    if factor is None:
        return u
    return jax.tree.map(lambda x: (factor * x).astype(x.dtype), u)


def _keep(active, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``active`` else ``old`` (exact no-op for inactive steps)."""
    if active is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


def _check_identical_bodies(body: PyTree) -> None:
    for x in jax.tree.leaves(body):
        try:
            v = np.asarray(x)
        except (
            jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError,
        ):
            return
        if not np.array_equal(v, np.broadcast_to(v[:1], v.shape)):
            raise ValueError(
                "deprl: all workers must start from the same body phi^0 (heads may "
                "differ); initialize with jd.models.init_workers(..., same_init=True) "
                "or copy worker 0's body to all workers."
            )


def deprl(
    loss_fn: LossFn,
    optimizer_head: optax.GradientTransformation | None,
    optimizer_body: optax.GradientTransformation,
    mix: MixingFn,
    *,
    is_head: HeadMask,
    head_steps: int,
    body_steps: int = 1,
    order: str = "paper",
    reset_opt_state_each_round: bool = False,
    single_optimizer: bool = False,
    lr_decay_per_round: float = 1.0,
    head_steps_per_worker=None,
    body_steps_per_worker=None,
) -> Algorithm:
    """Build DePRL (see the module docstring for the update rules).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE worker, on the
        merged (body + head) parameters.
      optimizer_head: optax transformation for the head phase (per worker). With
        ``single_optimizer=True`` pass ``None`` or the same object as
        ``optimizer_body``.
      optimizer_body: optax transformation for the body phase (per worker); the
        whole-model optimizer with ``single_optimizer=True``.
      mix: mixing function applied to the body leaves once per round.
      is_head: head mask pytree, path predicate or regex
        (:data:`~jaxdec.algorithms.personalized.HeadMask`).
      head_steps: ``tau >= 0`` head steps per round.
      body_steps: ``s_b >= 1`` body steps per round (paper: 1).
      order: ``"paper"`` (local phases, then gossip) or ``"gossip_first"``.
      reset_opt_state_each_round: re-initialize both optimizer states at the start
        of every round (the authors' code re-creates its optimizer each round).
      single_optimizer: one optimizer state over the whole model; every local step
        updates all parameters and then restores the frozen part (code mimic:
        momentum carries stale gradients across phases, clipping sees the
        whole-model norm).
      lr_decay_per_round: ``gamma``; updates of round ``k`` are scaled by
        ``gamma^k`` (code: ``0.96``).
      head_steps_per_worker: optional int ``[n]``, worker ``i`` takes only the first
        ``c_i <= head_steps`` head steps (the others are exact no-ops on its head
        and optimizer state), for epoch-based phases on unequal local datasets.
      body_steps_per_worker: the same for the body phase.

    Returns:
      ``Algorithm(init, step)`` with ``init(params) -> DePRLState`` and
      ``step(state, batch, key) -> (DePRLState, DePRLInfo)``; batch leaves are
      ``[n, head_steps + body_steps, b, ...]`` (first ``tau`` minibatches for the
      head phase, then ``s_b`` for the body phase; see
      :func:`~jaxdec.algorithms.personalized.round_sampler`).
    """
    if not callable(loss_fn):
        raise ValueError("deprl: loss_fn must be callable loss_fn(params, batch, key).")
    if not callable(mix):
        raise ValueError(
            "deprl: mix must be a MixingFn mix(tree, step), e.g. jd.gossip.dense(W)."
        )
    if not isinstance(single_optimizer, bool):
        raise ValueError(
            f"deprl: single_optimizer must be a bool, got {single_optimizer!r}."
        )
    if not isinstance(reset_opt_state_each_round, bool):
        raise ValueError(
            "deprl: reset_opt_state_each_round must be a bool, got "
            f"{reset_opt_state_each_round!r}."
        )
    _check_opt(optimizer_body, "optimizer_body")
    if single_optimizer:
        if optimizer_head is not None and optimizer_head is not optimizer_body:
            raise ValueError(
                "deprl: single_optimizer=True uses optimizer_body for the whole model; "
                "pass optimizer_head=None (or the same object) instead of a second "
                "optimizer."
            )
    else:
        _check_opt(optimizer_head, "optimizer_head")
    if order not in ORDERS:
        raise ValueError(f"deprl: order must be one of {ORDERS}, got {order!r}.")
    tau = _check_int(head_steps, "head_steps", 0)
    s_b = _check_int(body_steps, "body_steps", 1)
    gamma = float(lr_decay_per_round)
    if not (math.isfinite(gamma) and gamma > 0.0):
        raise ValueError(f"deprl: lr_decay_per_round must be > 0, got {gamma}.")
    opt_h = optimizer_body if single_optimizer else optimizer_head
    opt_b = optimizer_body
    c_head = _check_per_worker(head_steps_per_worker, tau, "head_steps_per_worker")
    c_body = _check_per_worker(body_steps_per_worker, s_b, "body_steps_per_worker")

    def check_counts(n: int) -> None:
        for c, what in (
            (c_head, "head_steps_per_worker"),
            (c_body, "body_steps_per_worker"),
        ):
            if c is not None and c.shape != (n,):
                raise ValueError(
                    f"deprl: {what} has {c.shape[0]} entries but there are {n} "
                    "workers; give one step count per worker."
                )

    def init_opt_states(body: PyTree, head: PyTree):
        if single_optimizer:
            return (), jax.vmap(opt_b.init)(merge_params(body, head))
        return jax.vmap(opt_h.init)(head), jax.vmap(opt_b.init)(body)

    def init(params: PyTree) -> DePRLState:
        n = jtree.num_workers(params)
        check_counts(n)
        mask = resolve_head_mask(is_head, params, name="deprl")
        body, head = split_params(params, mask)
        _check_identical_bodies(body)
        h_state, b_state = init_opt_states(body, head)
        return DePRLState(body, head, h_state, b_state, jnp.zeros((), jnp.int32))

    def phase(
        train, frozen, train_is_head, opt, opt_state, batches, keys, count_i, factor
    ):
        """Optax steps on ``train`` (one per minibatch) with ``frozen`` constant.

        Returns ``(train, opt_state, mean loss over active steps (nan if none),
        any step active)``.
        """
        steps = keys.shape[0]
        mask = head_mask_of(frozen if train_is_head else train)

        def full(p_train):
            if train_is_head:
                return merge_params(frozen, p_train)
            return merge_params(p_train, frozen)

        def one(carry, inp):
            p, s = carry
            batch_s, key_s, idx = inp
            if single_optimizer:  # update everything, then restore the frozen part
                x = full(p)
                loss, g = jax.value_and_grad(loss_fn)(x, batch_s, key_s)
                u, s_new = opt.update(g, s, x)
                new_body, new_head = split_params(
                    optax.apply_updates(x, _scale(u, factor)), mask
                )
                p_new = new_head if train_is_head else new_body
            else:
                loss, g = jax.value_and_grad(
                    lambda q: loss_fn(full(q), batch_s, key_s)
                )(p)
                u, s_new = opt.update(g, s, p)
                p_new = optax.apply_updates(p, _scale(u, factor))
            if count_i is None:
                return (p_new, s_new), (loss, jnp.float32(1.0))
            active = idx < count_i
            p_new = _keep(active, p_new, p)
            s_new = _keep(active, s_new, s)
            w = active.astype(jnp.float32)
            return (p_new, s_new), (jnp.where(active, loss, 0.0), w)

        idx = jnp.arange(steps, dtype=jnp.int32)
        (p, s), (losses, ws) = jax.lax.scan(
            one, (train, opt_state), (batches, keys, idx), length=steps
        )
        taken = jnp.sum(ws)
        mean_loss = jnp.where(
            taken > 0, jnp.sum(losses) / jnp.maximum(taken, 1.0), jnp.nan
        )
        return p, s, mean_loss, taken > 0

    def step(state: DePRLState, batch, key) -> tuple[DePRLState, DePRLInfo]:
        body, head, t = state.body, state.head, state.count
        n = jtree.num_workers(body)
        check_counts(n)
        check_round_batch(batch, n, tau + s_b, "deprl")
        sent_tree = body
        if order == "gossip_first":
            body = mix(body, t)
        h_state, b_state = state.head_opt_state, state.body_opt_state
        if reset_opt_state_each_round:
            h_state, b_state = init_opt_states(body, head)
        factor = None if gamma == 1.0 else jnp.power(jnp.float32(gamma), t)
        keys = jax.vmap(lambda k: jax.random.split(k, tau + s_b))(
            jax.random.split(key, n)
        )
        b_head = jax.tree.map(lambda x: x[:, :tau], batch)
        b_body = jax.tree.map(lambda x: x[:, tau:], batch)

        def worker(phi, theta, sh, sb, bh, bb, k, ch, cb):
            if single_optimizer:  # one state threads through both phases
                theta_new, sb, h_loss, h_any = phase(
                    theta, phi, True, opt_b, sb, bh, k[:tau], ch, factor
                )
            else:
                theta_new, sh, h_loss, h_any = phase(
                    theta, phi, True, opt_h, sh, bh, k[:tau], ch, factor
                )
            phi_new, sb, b_loss, b_any = phase(
                phi, theta_new, False, opt_b, sb, bb, k[tau:], cb, factor
            )
            ok = (jnp.isfinite(h_loss) | ~h_any) & (jnp.isfinite(b_loss) | ~b_any)
            return phi_new, theta_new, sh, sb, h_loss, b_loss, ok

        in_c = (None if c_head is None else 0, None if c_body is None else 0)
        phi_half, theta_new, h_state, b_state, h_loss, b_loss, ok = jax.vmap(
            worker, in_axes=(0, 0, 0, 0, 0, 0, 0, *in_c)
        )(body, head, h_state, b_state, b_head, b_body, keys, c_head, c_body)
        if order == "paper":
            new_body = mix(phi_half, t)
            sent_tree = phi_half
        else:
            new_body = phi_half
        new_params = merge_params(new_body, theta_new)
        info = DePRLInfo(
            head_loss=h_loss,
            body_loss=b_loss,
            consensus=jtree.consensus_distance(new_body),
            floats_sent=_common.floats_sent(mix, t, sent_tree),
            finite=ok & _common.all_finite(jnp.zeros((n,), jnp.float32), new_params),
        )
        return DePRLState(new_body, theta_new, h_state, b_state, t + 1), info

    return Algorithm(init, step)


def epoch_steps(counts, batch_size: int, epochs: int = 1) -> tuple[int, np.ndarray]:
    """Steps of ``epochs`` local epochs: ``c_i = epochs * ceil(n_i / b)``.

    Args:
      counts: local dataset sizes ``n_i`` ``[n]``.
      batch_size: ``b``.
      epochs: local epochs per phase.

    Returns:
      ``(max_i c_i, c)``: the padded step count and the per-worker counts (pass them
      as ``head_steps`` / ``head_steps_per_worker`` etc.).
    """
    c = np.asarray(counts, np.int64)
    per = (int(epochs) * np.ceil(c / int(batch_size))).astype(np.int32)
    return int(per.max()), per


def deprl_code_preset(
    loss_fn: LossFn,
    graph: nx.Graph,
    *,
    is_head: HeadMask,
    counts,
    batch_size: int = 16,
    lr: float = 0.01,
    head_epochs: int = 3,
    body_epochs: int = 1,
) -> tuple:
    """The authors' code configuration (the sheet's ``deprl_code_preset``).

    ``order="gossip_first"``, ``single_optimizer=True``,
    ``reset_opt_state_each_round=True``, head ``head_epochs`` local epochs and body
    ``body_epochs`` epochs (per-worker step counts, extra steps masked), uniform
    mixing weights ``W_ij = 1/(d_i + 1)`` (row-stochastic only), optimizer
    ``chain(clip_by_global_norm(10), add_decayed_weights(1e-5), sgd(lr, momentum
    0.9))`` with ``lr_k = lr 0.96^k``. Because the optimizer is re-created every
    round, an optax schedule's internal count would restart each round; the decay is
    therefore applied with the round counter (``lr_decay_per_round=0.96``), which is
    exactly PyTorch's ``SGD(lr=0.01 * 0.96**k)`` re-created per round.

    Args:
      loss_fn: one-worker loss.
      graph: communication graph (networkx).
      is_head: head mask / predicate / regex (code: names with ``classifier`` or
        ``out``).
      counts: local dataset sizes ``[n]``.
      batch_size: ``b`` (code: 16).
      lr: initial learning rate (code: 0.01).
      head_epochs: local epochs of the head phase (code: 3).
      body_epochs: local epochs of the body phase (code: 1).

    Returns:
      ``(algo, steps_per_round)``: the algorithm and ``head_steps + body_steps``
      (the sampler must give that many minibatches per round).
    """
    tau, c_h = epoch_steps(counts, batch_size, head_epochs)
    s_b, c_b = epoch_steps(counts, batch_size, body_epochs)
    W = topology.mixing_matrix(graph, "uniform")
    mix = gossip.dense(W, doubly_stochastic=False)
    opt = optax.chain(
        optax.clip_by_global_norm(10.0),
        optax.add_decayed_weights(1e-5),
        optax.sgd(lr, momentum=0.9),
    )
    algo = deprl(
        loss_fn,
        None,
        opt,
        mix,
        is_head=is_head,
        head_steps=tau,
        body_steps=s_b,
        order="gossip_first",
        reset_opt_state_each_round=True,
        single_optimizer=True,
        lr_decay_per_round=0.96,
        head_steps_per_worker=c_h,
        body_steps_per_worker=c_b,
    )
    return algo, tau + s_b


def theory_step_sizes(
    n: int, rounds: int, head_steps: int, *, c_b: float = 0.1, c_h: float = 0.5
) -> tuple[float, float]:
    """Step sizes of the speedup analysis: ``eta_b = c_b sqrt(N / K)``,
    ``eta_h = c_h / tau`` (reconstructed from the method family).

    Returns:
      ``(eta_b, eta_h)``.
    """
    tau = max(int(head_steps), 1)
    return float(c_b * math.sqrt(n / rounds)), float(c_h / tau)
