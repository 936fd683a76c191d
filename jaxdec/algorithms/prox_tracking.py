r"""ProxGT: stochastic proximal gradient tracking for ``min (1/n) sum_i f_i + h``.

Xin, Das, Khan, Kar, "A Stochastic Proximal Gradient Framework for Decentralized
Non-Convex Composite Optimization" (arXiv:2110.01594). Every worker ``i`` keeps an
iterate ``x_i``, a local gradient estimator ``v_i`` and a tracker ``y_i`` of the
network-average estimator; ``M`` is a (typically Chebyshev-accelerated, K-round)
mixing operator, ``M = jd.gossip.chebyshev(W, K)``.

The first step call (``count == 0``) is the *priming step*: ``v^0 = refresh(x^0)``,
``y^0 = v^0``, ``x`` unchanged. Step call ``t + 1`` is paper iteration ``t``::

    (u_i, s_i)  = optimizer.update(y_i^t, s_i, x_i^t)        # sgd(a): u = -a y
    x^{t+1}     = M prox(x^t + u, a)           (order="prox_then_mix", default)
                = prox(M (x^t + u), a)         (order="mix_then_prox")
    v_i^{t+1}   = grad g_i(x_i^{t+1}; S)                                 ("sa")
                = refresh_i(x_i^{t+1})              if (t + 1) mod q == 0 ("sr_*")
                  v_i^t + grad g_i(x_i^{t+1}; S) - grad g_i(x_i^t; S)    otherwise
    y^{t+1}     = M (y^t + v^{t+1} - v^t)

with ``|S| = b`` (the same ``S`` at both points), and ``refresh`` a minibatch of
``B`` samples (``"sr_online"``) or the exact local full gradient over the
worker's finite sample (``"sr_finite"``). For doubly-stochastic ``M`` the tracker
satisfies ``mean_i y_i^t = mean_i v_i^t`` at every ``t``.

Data: ``batch`` is a :class:`ProxGTBatch` ``(batch, refresh)``; each part is either
a per-worker batch pytree (leaves ``[n, k, ...]``, passed to ``loss_fn`` as is) or
an :class:`IndexedBatch` (device-resident data plus row indices, gathered inside
the step; the refresh part only under ``lax.cond`` on refresh steps).
:func:`make_sampler` builds both from a :class:`jaxdec.data.WorkerData`.

Baseline :func:`prox_dsgd` (no tracking): ``x^{t+1} = M prox(x^t - a v^t, a)`` with
``v^t`` a fresh minibatch gradient at ``x^t``.

Example:
  >>> import jaxdec as jd
  >>> from jaxdec import prox
  >>> from jaxdec.algorithms.prox_tracking import proxgt, make_sampler, chebyshev_auto
  >>> mix = chebyshev_auto(W)                          # rounds from the spectral gap
  >>> algo = proxgt(loss_fn, prox.l1(1e-3), mix, lr=0.05, estimator="sr_finite", q=16)
  >>> sampler = make_sampler(data, 16, estimator="sr_finite")
  >>> state, hist = jd.run(algo, algo.init(params), sampler, key, 1500)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec import gossip, topology
from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.data.worker_data import WorkerData
from jaxdec.types import Algorithm, LossFn, MixingFn, PyTree

__all__ = [
    "IndexedBatch",
    "ProxGTBatch",
    "ProxGTState",
    "ProxGTInfo",
    "ProxDSGDState",
    "ProxDSGDInfo",
    "proxgt",
    "prox_dsgd",
    "make_sampler",
    "auto_rounds",
    "chebyshev_auto",
    "multi_round",
    "mixing_rounds",
    "output_params",
    "prox_grad_mapping",
]

ESTIMATORS = ("sa", "sr_online", "sr_finite")
ORDERS = ("prox_then_mix", "mix_then_prox")


# ----------------------------------------------------------------------------- mixing


def auto_rounds(W, lambda_target: float = 0.5) -> int:
    """Chebyshev rounds ``K = ceil(log(2 / lambda_target) / log(1 / c))``.

    ``c = (1 - sqrt(1 - lambda^2)) / lambda`` with ``lambda = ||W - J||_2``; then
    ``||M_K - J||_2 <= 2 c^K <= lambda_target``. ``K = 1`` when ``lambda`` is already
    ``<= lambda_target``. Ring of 16 (weights 1/3): ``K = 5``.
    """
    lam = topology.second_largest_eigenvalue(np.asarray(W, np.float64))
    if lam <= lambda_target:
        return 1
    c = (1.0 - math.sqrt(1.0 - lam**2)) / lam
    return max(1, math.ceil(math.log(2.0 / lambda_target) / math.log(1.0 / c)))


def chebyshev_auto(W, rounds: int | str = "auto", *, lambda_target: float = 0.5, **kw):
    """``jd.gossip.chebyshev(W, K)`` with ``rounds="auto"`` -> :func:`auto_rounds`."""
    if rounds == "auto":
        rounds = auto_rounds(W, lambda_target)
    return gossip.chebyshev(W, rounds, **kw)


def multi_round(W, rounds: int) -> gossip.Mixer:
    """Plain (non-accelerated) multi-round gossip ``X <- W^K X`` (K base mixes)."""
    if isinstance(rounds, bool) or int(rounds) != rounds or int(rounds) < 1:
        raise ValueError(
            f"multi_round: rounds must be an integer >= 1, got {rounds!r}."
        )
    K = int(rounds)
    base = gossip.sparse(W)

    def fn(tree, step):
        for _ in range(K):
            tree = base.fn(tree, step)
        return tree

    return gossip.Mixer(
        fn, lambda step, n: K * base.sends(step, n), base.n, f"multi_round(K={K})"
    )


def mixing_rounds(mix: MixingFn) -> int:
    """Gossip rounds (base-mix calls) of one application of ``mix``.

    Read from the name of a jaxdec ``chebyshev`` / ``fastmix`` / ``multi_round``
    mixer (``K=...``); any other mixer counts as one round.
    """
    name = getattr(mix, "name", "")
    m = re.match(r"^(chebyshev|fastmix|multi_round)\(K=(\d+)", name)
    return int(m.group(2)) if m else 1


# ------------------------------------------------------------------------------- data


class IndexedBatch(NamedTuple):
    """Rows of device-resident per-worker data, gathered inside the step.

    Attributes:
      x: ``[n, m_max, ...]`` features (e.g. ``WorkerData.x``).
      y: ``[n, m_max]`` labels.
      idx: ``[n, k]`` int32 row indices, or ``None`` for all rows.
      mask: ``[n, k]`` bool validity mask (rows with ``False`` are ignored; the
        gradient is the mean over valid rows), or ``None`` (all valid).
    """

    x: jax.Array
    y: jax.Array
    idx: jax.Array | None = None
    mask: jax.Array | None = None


class ProxGTBatch(NamedTuple):
    """What one step consumes: the minibatch ``S`` and the refresh set.

    Attributes:
      batch: minibatch of ``b`` samples per worker (evaluated at ``x^{t+1}`` and,
        for SARAH, at ``x^t``).
      refresh: ``B`` samples (``sr_online``) or the full local set (``sr_finite``)
        per worker; ``None`` for ``sa`` (which refreshes from ``batch``).
    """

    batch: Any
    refresh: Any = None


def make_sampler(
    data: WorkerData,
    batch_size: int,
    *,
    estimator: str = "sa",
    refresh_size: int | None = None,
):
    """Jittable ``sampler(key, step) -> ProxGTBatch`` of row indices into ``data``.

    Worker ``i`` draws ``b`` indices uniformly on ``{0..c_i - 1}`` (with
    replacement) from ``split(fold_in(key, step), n)[i]``; ``sr_online`` also draws
    ``B = refresh_size`` refresh indices; ``sr_finite`` refreshes over all local
    rows (with a padding mask when local sizes differ). The sampler is a
    ``jax.tree_util.Partial`` over the data arrays, so :func:`jaxdec.run` passes
    them as arguments rather than compiling them in.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"make_sampler: estimator must be one of {ESTIMATORS}.")
    b = int(batch_size)
    if b < 1:
        raise ValueError(f"make_sampler: batch_size must be >= 1, got {batch_size}.")
    if estimator == "sr_online" and (refresh_size is None or int(refresh_size) < 1):
        raise ValueError("make_sampler: sr_online needs refresh_size B >= 1.")
    B = int(refresh_size) if refresh_size is not None else 0
    counts = np.asarray(data.counts)
    padded = bool((counts != data.y.shape[1]).any())
    n = int(counts.shape[0])

    def sample(x_all, y_all, cnt, key, step):
        keys = jax.random.split(jax.random.fold_in(key, step), n)

        def draw(k, c, size):
            return jax.random.randint(k, (size,), 0, c, dtype=jnp.int32)

        idx = jax.vmap(lambda k, c: draw(k, c, b))(keys, cnt)
        mini = IndexedBatch(x_all, y_all, idx)
        if estimator == "sa":
            return ProxGTBatch(mini, None)
        if estimator == "sr_online":
            keys2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            ridx = jax.vmap(lambda k, c: draw(k, c, B))(keys2, cnt)
            return ProxGTBatch(mini, IndexedBatch(x_all, y_all, ridx))
        mask = None
        if padded:
            mask = jnp.arange(y_all.shape[1])[None, :] < cnt[:, None]
        return ProxGTBatch(mini, IndexedBatch(x_all, y_all, None, mask))

    return jax.tree_util.Partial(sample, data.x, data.y, data.counts)


def _batch_size(bt) -> jax.Array:
    """Samples per worker ``[n]`` in a per-worker batch."""
    if isinstance(bt, IndexedBatch):
        if bt.mask is not None:
            return jnp.sum(bt.mask, axis=1).astype(jnp.int32)
        k = bt.idx.shape[1] if bt.idx is not None else bt.x.shape[1]
        return jnp.full((bt.x.shape[0],), k, jnp.int32)
    leaf = jax.tree.leaves(bt)[0]
    k = leaf.shape[1] if leaf.ndim > 1 else 1
    return jnp.full((leaf.shape[0],), k, jnp.int32)


def _local_value_and_grad(loss_fn: LossFn, has_aux: bool):
    """``f(params_i, batch_i, key_i) -> (loss, grad)`` for one worker's batch."""
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def plain(p, bt, k):
        out, g = vg(p, bt, k)
        return (out[0] if has_aux else out), g

    def f(p, bt, k):
        if not isinstance(bt, IndexedBatch):
            return plain(p, bt, k)
        x, y = bt.x, bt.y
        if bt.idx is not None:
            x, y = jnp.take(x, bt.idx, axis=0), jnp.take(y, bt.idx, axis=0)
        if bt.mask is None:
            return plain(p, (x, y), k)
        # masked mean of per-example gradients (padded local sets)
        losses, grads = jax.vmap(lambda xr, yr: plain(p, (xr[None], yr[None]), k))(x, y)
        w = bt.mask.astype(jnp.float32)
        w = w / jnp.maximum(jnp.sum(w), 1.0)
        loss = jnp.sum(w * losses)
        grad = jax.tree.map(
            lambda g: jnp.tensordot(w, g, axes=1).astype(g.dtype), grads
        )
        return loss, grad

    def lifted(params, batch, keys):
        return jax.vmap(f)(params, batch, keys)

    return lifted


# ------------------------------------------------------------------------------ state


class ProxGTState(NamedTuple):
    """State of :func:`proxgt` (leaves ``[n, ...]`` unless noted).

    Attributes:
      x: iterates ``x^t``.
      y: trackers ``y^t`` (zero before the priming step).
      v: local estimators ``v^t`` (zero before the priming step).
      opt_state: per-worker optax state.
      count: int32 number of step calls (0 = priming step next).
      samples: int32 ``[n]`` cumulative samples (gradient evaluations) per worker.
      comm_rounds: int32 ``[n]`` cumulative gossip rounds per worker.
      x_out: worker-mean iterate at a uniformly random iteration (reservoir
        sample, no worker axis) when ``output="random"``, else ``None``.
    """

    x: PyTree
    y: PyTree
    v: PyTree
    opt_state: PyTree
    count: jax.Array
    samples: jax.Array
    comm_rounds: jax.Array
    x_out: PyTree = None

    @property
    def params(self) -> PyTree:
        """The iterates (alias of ``x``, for evaluators that read ``state.params``)."""
        return self.x


class ProxGTInfo(NamedTuple):
    """Per-step diagnostics of :func:`proxgt`.

    Attributes:
      loss: per-worker minibatch loss at the new iterate (refresh loss on refresh
        and priming steps), ``[n]``.
      stationarity: ``||G_a(x_bar)||^2`` at the new average iterate when a
        full-gradient oracle was given (``nan`` on steps it was skipped), else
        ``None``.
      consensus: ``(1/n) sum_i ||x_i - x_bar||^2`` of the new iterates.
      tracker_consensus: same for the new trackers ``y``.
      samples: cumulative samples per worker ``[n]``.
      comm_rounds: cumulative gossip rounds per worker ``[n]``.
      floats_sent: mean floats a worker sent this step.
      finite: per-worker flag ``[n]``.
    """

    loss: jax.Array
    stationarity: jax.Array | None
    consensus: jax.Array
    tracker_consensus: jax.Array
    samples: jax.Array
    comm_rounds: jax.Array
    floats_sent: jax.Array
    finite: jax.Array


def prox_grad_mapping(
    full_grad: Callable[[PyTree], PyTree], prox, step_size: float
) -> Callable[[PyTree], jax.Array]:
    """``||G_a(x)||^2`` with ``G_a(x) = (x - prox(x - a grad F(x), a)) / a``.

    Args:
      full_grad: ``full_grad(params) -> grad F(params)`` for ONE parameter tree.
      prox: a ``prox(tree, step_size)``.
      step_size: ``a > 0``.
    """
    a = float(step_size)

    def norm2(x):
        g = full_grad(x)
        z = prox(jax.tree.map(lambda p, d: p - a * d, x, g), a)
        return jtree.sq_norm(jax.tree.map(lambda p, q: (p - q) / a, x, z))

    return norm2


def output_params(state) -> PyTree:
    """The output ``x_bar``: the last average iterate, or the reservoir sample."""
    if getattr(state, "x_out", None) is not None:
        return state.x_out
    return jtree.worker_mean(state.x)


def _stationarity(full_grad, prox, stationarity_step, prox_step):
    """``||G_a(x_bar)||^2`` oracle (``None`` without ``full_grad``); ``a`` defaults
    to the prox step at ``t = 0``."""
    if full_grad is None:
        return None
    a = stationarity_step
    if a is None:
        a = float(_step_at(prox_step, 0))
    return prox_grad_mapping(full_grad, prox, a)


def _check_common(loss_fn, prox, mix, order, name):
    if not callable(loss_fn):
        raise ValueError(
            f"{name}: loss_fn must be callable loss_fn(params, batch, key)."
        )
    if not callable(prox):
        raise ValueError(f"{name}: prox must be callable prox(tree, step_size).")
    if not callable(mix):
        raise ValueError(f"{name}: mix must be a MixingFn, e.g. jd.gossip.chebyshev.")
    if order not in ORDERS:
        raise ValueError(f"{name}: order must be one of {ORDERS}, got {order!r}.")


def _optimizer_and_step(lr, optimizer, prox_step, name):
    if optimizer is None:
        if lr is None:
            raise ValueError(f"{name}: give lr (float or optax schedule) or optimizer.")
        optimizer = optax.sgd(lr)
        if prox_step is None:
            prox_step = lr
    elif prox_step is None:
        raise ValueError(
            f"{name}: with a custom optimizer pass prox_step explicitly (the theory "
            "covers optax.sgd(a) with prox_step=a)."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"{name}: optimizer must be an optax.GradientTransformation.")
    if not callable(prox_step) and not float(prox_step) > 0:
        raise ValueError(f"{name}: prox_step must be > 0, got {prox_step}.")
    return optimizer, prox_step


def _step_at(prox_step, t) -> jax.Array:
    if callable(prox_step):
        return jnp.asarray(prox_step(t), jnp.float32)
    return jnp.asarray(prox_step, jnp.float32)


def _check_consensual(params: PyTree, name: str) -> None:
    try:
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    for x in leaves:
        if not np.array_equal(x, np.broadcast_to(x[:1], x.shape)):
            raise ValueError(
                f"{name}: all workers must start from the same x^0 (consensual "
                "initialization); use jd.models.init_workers(..., same_init=True) or "
                "jd.tree.replicate."
            )


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


# ----------------------------------------------------------------------------- proxgt


def proxgt(
    loss_fn: LossFn,
    prox,
    mix: MixingFn,
    *,
    estimator: str = "sa",
    lr=None,
    optimizer: optax.GradientTransformation | None = None,
    prox_step=None,
    order: str = "prox_then_mix",
    q: int = 16,
    full_grad: Callable[[PyTree], PyTree] | None = None,
    stationarity_step: float | None = None,
    stationarity_every: int = 1,
    output: str = "last",
    rounds: int | None = None,
    has_aux: bool = False,
) -> Algorithm:
    """Build ProxGT (see the module docstring for the update rule).

    Args:
      loss_fn: ``loss_fn(params, batch, key)`` for ONE worker (mean over its batch).
      prox: ``prox(tree, step_size)`` of ``h`` for one worker's tree
        (:mod:`jaxdec.prox`).
      mix: mixing operator ``M``, e.g. ``jd.gossip.chebyshev(W, K)``; doubly
        stochastic for exact tracking.
      estimator: ``"sa"``, ``"sr_online"`` or ``"sr_finite"``.
      lr: step size ``a`` (float or optax schedule); builds ``optax.sgd(lr)``.
      optimizer: custom optax transformation fed with ``y`` (needs ``prox_step``).
      prox_step: step of the prox (float or schedule of the iteration ``t``);
        default ``lr``.
      order: ``"prox_then_mix"`` (default) or ``"mix_then_prox"``.
      q: refresh period of the SARAH estimators.
      full_grad: optional oracle ``grad F(params)`` for ONE tree; enables
        ``Info.stationarity``.
      stationarity_step: ``a`` in ``G_a`` (default ``prox_step``, or its value at 0).
      stationarity_every: evaluate the oracle every this many step calls (``nan``
        otherwise).
      output: ``"last"`` or ``"random"`` (see :func:`output_params`).
      rounds: gossip rounds per ``mix`` call for accounting (default
        :func:`mixing_rounds`).
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (aux is discarded).

    Returns:
      ``Algorithm(init, step)``; ``step`` consumes a :class:`ProxGTBatch` (a plain
      batch is accepted for ``"sa"``).
    """
    name = "proxgt"
    _check_common(loss_fn, prox, mix, order, name)
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"{name}: estimator must be one of {ESTIMATORS}, got {estimator!r}."
        )
    optimizer, prox_step = _optimizer_and_step(lr, optimizer, prox_step, name)
    if isinstance(q, bool) or int(q) != q or int(q) < 1:
        raise ValueError(f"{name}: q must be an integer >= 1, got {q!r}.")
    if output not in ("last", "random"):
        raise ValueError(f"{name}: output must be 'last' or 'random', got {output!r}.")
    q = int(q)
    every = int(stationarity_every)
    K = mixing_rounds(mix) if rounds is None else int(rounds)
    vg = _local_value_and_grad(loss_fn, has_aux)
    stat = _stationarity(full_grad, prox, stationarity_step, prox_step)
    vprox = jax.vmap(prox, in_axes=(0, None))

    def init(params: PyTree) -> ProxGTState:
        n = jtree.num_workers(params)
        _check_consensual(params, name)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ProxGTState(
            x=params,
            y=zeros,
            v=zeros,
            opt_state=jax.vmap(optimizer.init)(params),
            count=jnp.zeros((), jnp.int32),
            samples=jnp.zeros((n,), jnp.int32),
            comm_rounds=jnp.zeros((n,), jnp.int32),
            x_out=jtree.worker_mean(params) if output == "random" else None,
        )

    def refresh_part(batch):
        if isinstance(batch, ProxGTBatch):
            if estimator == "sa" or batch.refresh is None:
                if estimator != "sa":
                    raise ValueError(f"{name}: {estimator} needs ProxGTBatch.refresh.")
                return batch.batch
            return batch.refresh
        if estimator != "sa":
            raise ValueError(
                f"{name}: {estimator} needs a ProxGTBatch(batch, refresh); build it "
                "with jaxdec.algorithms.prox_tracking.make_sampler."
            )
        return batch

    def mini_part(batch):
        return batch.batch if isinstance(batch, ProxGTBatch) else batch

    def stationarity(x, count):
        if stat is None:
            return None
        xb = jtree.worker_mean(x)
        if every == 1:
            return stat(xb)
        return jax.lax.cond(
            count % every == 0, stat, lambda _: jnp.full((), jnp.nan), xb
        )

    def make_info(loss, x, y, samples, comm, floats, count):
        return ProxGTInfo(
            loss=loss,
            stationarity=stationarity(x, count),
            consensus=jtree.consensus_distance(x),
            tracker_consensus=jtree.consensus_distance(y),
            samples=samples,
            comm_rounds=comm,
            floats_sent=floats,
            finite=_common.all_finite(loss, x),
        )

    def prime(state, batch, key):
        n = jtree.num_workers(state.x)
        keys = jax.random.split(key, n)
        rb = refresh_part(batch)
        loss, v0 = vg(state.x, rb, keys)
        samples = state.samples + _batch_size(rb)
        new = state._replace(y=v0, v=v0, count=state.count + 1, samples=samples)
        info = make_info(
            loss, state.x, v0, samples, state.comm_rounds, jnp.zeros(()), state.count
        )
        return new, info

    def iterate(state, batch, key):
        x, y, v, c = state.x, state.y, state.v, state.count
        n = jtree.num_workers(x)
        t = c - 1  # paper iteration
        keys = jax.random.split(key, n)
        a_t = _step_at(prox_step, t)
        u, opt_state = jax.vmap(optimizer.update)(y, state.opt_state, x)
        if order == "prox_then_mix":
            new_x = mix(vprox(optax.apply_updates(x, u), a_t), t)
        else:
            new_x = vprox(mix(optax.apply_updates(x, u), t), a_t)
        mini = mini_part(batch)
        if estimator == "sa":
            loss, new_v = vg(new_x, mini, keys)
            used = _batch_size(mini)
        else:
            rb = refresh_part(batch)

            def do_refresh(_):
                lo, g = vg(new_x, rb, keys)
                return lo, g, _batch_size(rb)

            def do_recursion(_):
                lo, g_new = vg(new_x, mini, keys)
                _, g_old = vg(x, mini, keys)
                return lo, _add(v, _sub(g_new, g_old)), 2 * _batch_size(mini)

            loss, new_v, used = jax.lax.cond(c % q == 0, do_refresh, do_recursion, None)
        new_y = mix(_add(y, _sub(new_v, v)), t)
        samples = state.samples + used
        comm = state.comm_rounds + 2 * K
        floats = 2.0 * _common.floats_sent(mix, t, x)
        x_out = state.x_out
        if output == "random":  # reservoir sample over x^0 .. x^{t+1}
            k_res = jax.random.fold_in(key, 7)
            take = jax.random.uniform(k_res) * (c + 1).astype(jnp.float32) < 1.0
            xb = jtree.worker_mean(new_x)
            x_out = jax.tree.map(lambda a, b: jnp.where(take, a, b), xb, x_out)
        new = ProxGTState(new_x, new_y, new_v, opt_state, c + 1, samples, comm, x_out)
        return new, make_info(loss, new_x, new_y, samples, comm, floats, c)

    def step(state: ProxGTState, batch, key):
        return jax.lax.cond(state.count == 0, prime, iterate, state, batch, key)

    return Algorithm(init, step)


# -------------------------------------------------------------------------- prox_dsgd


class ProxDSGDState(NamedTuple):
    """State of :func:`prox_dsgd` (see :class:`ProxGTState` for the fields)."""

    x: PyTree
    opt_state: PyTree
    count: jax.Array
    samples: jax.Array
    comm_rounds: jax.Array

    @property
    def params(self) -> PyTree:
        return self.x


class ProxDSGDInfo(NamedTuple):
    """Per-step diagnostics of :func:`prox_dsgd` (fields as in :class:`ProxGTInfo`)."""

    loss: jax.Array
    stationarity: jax.Array | None
    consensus: jax.Array
    samples: jax.Array
    comm_rounds: jax.Array
    floats_sent: jax.Array
    finite: jax.Array


def prox_dsgd(
    loss_fn: LossFn,
    prox,
    mix: MixingFn,
    *,
    lr=None,
    optimizer: optax.GradientTransformation | None = None,
    prox_step=None,
    order: str = "prox_then_mix",
    full_grad: Callable[[PyTree], PyTree] | None = None,
    stationarity_step: float | None = None,
    stationarity_every: int = 1,
    rounds: int | None = None,
    has_aux: bool = False,
) -> Algorithm:
    """Decentralized proximal SGD without tracking (baseline).

    ``(u_i, s_i) = optimizer.update(v_i^t, s_i, x_i^t)`` with ``v_i^t`` a fresh
    minibatch gradient at ``x_i^t`` (``u = -a v`` for ``optax.sgd(a)``), then
    ``x^{t+1} = M prox(x^t + u, a)`` (or ``prox(M (x^t + u), a)`` with
    ``order="mix_then_prox"``). Arguments as in :func:`proxgt`; ``batch`` is a
    minibatch or a :class:`ProxGTBatch` (its ``batch`` part is used).
    """
    name = "prox_dsgd"
    _check_common(loss_fn, prox, mix, order, name)
    optimizer, prox_step = _optimizer_and_step(lr, optimizer, prox_step, name)
    K = mixing_rounds(mix) if rounds is None else int(rounds)
    every = int(stationarity_every)
    vg = _local_value_and_grad(loss_fn, has_aux)
    stat = _stationarity(full_grad, prox, stationarity_step, prox_step)
    vprox = jax.vmap(prox, in_axes=(0, None))

    def init(params):
        n = jtree.num_workers(params)
        return ProxDSGDState(
            params,
            jax.vmap(optimizer.init)(params),
            jnp.zeros((), jnp.int32),
            jnp.zeros((n,), jnp.int32),
            jnp.zeros((n,), jnp.int32),
        )

    def step(state, batch, key):
        x, t = state.x, state.count
        n = jtree.num_workers(x)
        mini = batch.batch if isinstance(batch, ProxGTBatch) else batch
        loss, g = vg(x, mini, jax.random.split(key, n))
        u, opt_state = jax.vmap(optimizer.update)(g, state.opt_state, x)
        a_t = _step_at(prox_step, t)
        if order == "prox_then_mix":
            new_x = mix(vprox(optax.apply_updates(x, u), a_t), t)
        else:
            new_x = vprox(mix(optax.apply_updates(x, u), t), a_t)
        samples = state.samples + _batch_size(mini)
        comm = state.comm_rounds + K
        s = None
        if stat is not None:
            xb = jtree.worker_mean(new_x)
            s = (
                stat(xb)
                if every == 1
                else jax.lax.cond(
                    t % every == 0, stat, lambda _: jnp.full((), jnp.nan), xb
                )
            )
        info = ProxDSGDInfo(
            loss=loss,
            stationarity=s,
            consensus=jtree.consensus_distance(new_x),
            samples=samples,
            comm_rounds=comm,
            floats_sent=_common.floats_sent(mix, t, x),
            finite=_common.all_finite(loss, new_x),
        )
        return ProxDSGDState(new_x, opt_state, t + 1, samples, comm), info

    return Algorithm(init, step)
