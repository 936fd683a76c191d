r"""Differentiable decentralized training: hypergradients, learned mixing, sweeps.

Every jaxdec step is a pure function, so a whole training run is a differentiable,
vmappable function of its hyperparameters. This module packages that:

* :func:`unroll` runs ``make_algo(hparams)`` for ``T`` steps as one traced
  ``lax.scan`` (built on :func:`jaxdec.run_traced`), with ``jax.checkpoint`` per chunk
  so reverse-mode memory is ``O(T/c + c)`` states instead of ``O(T)`` residuals::

      val_loss = lambda hp: val(unroll(make_algo, hp, params0, sampler, key, T)[0])
      jax.grad(val_loss)(hp)        # d val / d (lr, momentum, theta, ...)

* :func:`inject`, :func:`set_hyperparams`, :func:`get_hyperparams` and
  :func:`piecewise_constant` make optax hyperparameters traced values (scalars,
  per-worker vectors ``[n]`` such as data weights, or learning-rate schedules).
* :func:`parametrized_mixing` maps *any* real vector ``theta`` (one entry per edge)
  to a symmetric, doubly-stochastic, non-negative ``W`` supported on a fixed graph;
  :func:`tune_mixing` optimizes ``theta`` with optax on consensus speed
  (:func:`consensus_rate`) or on any differentiable objective of ``W`` (e.g. the
  validation loss after training with ``W``); :func:`traced_dense` gossips with a
  traced ``W``.
* :func:`grid` and :func:`sweep` run a hyperparameter grid as ONE vmapped program;
  :func:`plot_sweep` draws the result; :func:`minimize` is the generic optax loop
  for hypergradient descent; :func:`compiled_memory` reports XLA's memory estimate.

Example:
  >>> def make_algo(hp):
  ...     W = jd.hyper.parametrized_mixing(G, hp["theta"])
  ...     opt = optax.sgd(hp["lr"], momentum=hp["momentum"])
  ...     return jd.algorithms.dsgd(loss_fn, opt, jd.hyper.traced_dense(W))
  >>> def val_loss(hp, sampler, ev):
  ...     state, _ = jd.hyper.unroll(make_algo, hp, params0, sampler, key, 500)
  ...     return ev(state)["avg_model_loss"]
  >>> hypergrad = jax.jit(jax.grad(val_loss))(hp, sampler, ev)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax

from jaxdec import gossip, topology
from jaxdec.loop import run_traced, summarize_info
from jaxdec.types import Algorithm, PyTree, Sampler

__all__ = [
    "unroll",
    "auto_checkpoint",
    "inject",
    "set_hyperparams",
    "get_hyperparams",
    "piecewise_constant",
    "edge_list",
    "metropolis_theta",
    "parametrized_mixing",
    "traced_dense",
    "consensus_rate",
    "MinimizeResult",
    "minimize",
    "tune_mixing",
    "grid",
    "sweep",
    "plot_sweep",
    "compiled_memory",
]

_HI = jax.lax.Precision.HIGHEST


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
    return int(v)


# --------------------------------------------------------------------------- unroll


def auto_checkpoint(num_steps: int) -> int:
    """Chunk length for :func:`unroll`: the divisor of ``num_steps`` nearest
    ``sqrt(num_steps)``.

    Rematerializing chunks of ``c`` steps stores ``T / c`` chunk-boundary states and
    the ``c`` per-step residuals of the chunk being differentiated, so memory is
    ``O(T/c + c)``, minimal near ``c = sqrt(T)`` (at the cost of one extra forward
    pass).

    Args:
      num_steps: unroll length ``T >= 1``.

    Returns:
      ``c``, a divisor of ``T``.
    """
    T = _positive_int(num_steps, "num_steps")
    divs = [d for d in range(1, T + 1) if T % d == 0]
    return min(divs, key=lambda d: (abs(math.log(d) - 0.5 * math.log(T)), d))


def _is_algo_state(x: Any) -> bool:
    return hasattr(x, "_fields") and "count" in x._fields


def unroll(
    make_algo: Callable[[PyTree], Algorithm],
    hparams: PyTree,
    state: PyTree,
    sampler: Sampler,
    key: jax.Array,
    num_steps: int,
    *,
    checkpoint_every: int | str | None = "auto",
    start_step: int = 0,
    reduce_info: Callable[[Any], dict[str, jax.Array]] = summarize_info,
) -> tuple[PyTree, dict[str, jax.Array]]:
    r"""Train ``make_algo(hparams)`` for ``num_steps`` steps, fully traced.

    With ``algo = make_algo(hparams)`` and ``s_0 = algo.init(state)`` (or ``state``
    itself when it already is an algorithm state, i.e. a NamedTuple with a
    ``count`` field), the unroll is

    .. math::
        s_{t+1} = \mathrm{step}_{h}(s_t,\ \mathrm{sampler}(k^{data}_t, t),\
            k^{algo}_t), \qquad t = t_0, \dots, t_0 + T - 1,

    with the keys of :func:`jaxdec.run.step_keys`, i.e. exactly the trajectory of
    :func:`jaxdec.run` with the same arguments. The result is a differentiable,
    vmappable function of ``hparams`` (and of ``state``). Everything ``make_algo``
    derives from ``hparams`` (optimizers, mixing matrices, schedules, and the
    optimizer state built by ``algo.init``) is traced, so ``jax.grad`` gives the
    hypergradient :math:`\partial L(s_T) / \partial h`. Pass an initialized state
    only if its contents do not depend on ``hparams`` (or re-inject them with
    :func:`set_hyperparams`).

    Args:
      make_algo: ``make_algo(hparams) -> Algorithm``; called once, while tracing.
      hparams: any pytree of (traced) hyperparameters.
      state: initial worker parameters (leaves ``[n, ...]``, passed to
        ``algo.init``) or an initialized algorithm state.
      sampler: ``sampler(key, step) -> batch`` (pass it as an argument of your
        jitted function, not closed over, so data are not compiled in).
      key: PRNG key of the run.
      num_steps: ``T >= 1``.
      checkpoint_every: chunk length ``c`` of ``jax.checkpoint`` (must divide
        ``T``); ``"auto"`` (default) picks :func:`auto_checkpoint`; ``None``
        stores every step's residuals (fastest, memory ``O(T)``).
      start_step: index ``t_0`` of the first step.
      reduce_info: per-step ``Info -> {name: scalar}`` (default
        :func:`jaxdec.run.summarize_info`).

    Returns:
      ``(final_state, summaries)`` with each summary ``[T]``.

    Raises:
      ValueError: bad ``num_steps`` / ``checkpoint_every`` or ``make_algo`` not
        returning an ``Algorithm``.
    """
    T = _positive_int(num_steps, "num_steps")
    if checkpoint_every == "auto":
        c: int | None = auto_checkpoint(T)
    elif checkpoint_every is None:
        c = None
    else:
        c = _positive_int(checkpoint_every, "checkpoint_every")
        if T % c:
            raise ValueError(
                f"checkpoint_every={c} must divide num_steps={T}; pick a divisor or "
                "'auto'."
            )
    if c == T:
        c = None  # one chunk: rematerializing it would only repeat the forward pass
    algo = make_algo(hparams)
    if not isinstance(algo, Algorithm):
        raise ValueError(
            "make_algo(hparams) must return a jd.Algorithm (e.g. "
            f"jd.algorithms.dsgd(...)), got {type(algo).__name__}."
        )
    s0 = state if _is_algo_state(state) else algo.init(state)
    return run_traced(
        algo,
        s0,
        sampler,
        key,
        T,
        start_step=start_step,
        reduce_info=reduce_info,
        checkpoint_every=c,
    )


# ------------------------------------------------------------------ optax helpers

_INJECT_STATES = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def _is_inject_state(x: Any) -> bool:
    return isinstance(x, _INJECT_STATES)


def inject(factory: Callable[..., optax.GradientTransformation], **hparams: Any):
    """``optax.inject_hyperparams(factory)(**hparams)``: hyperparameters in the state.

    Numeric hyperparameters (``learning_rate``, ``momentum``, ``weight_decay``, ...)
    are stored in the optimizer state (``opt_state.hyperparams``), where they can be
    traced values, per-worker vectors (after ``jax.vmap(opt.init)`` every
    hyperparameter has the worker axis ``[n]``) and can be read and replaced with
    :func:`get_hyperparams` / :func:`set_hyperparams`; callables are schedules
    evaluated at the optimizer's step count.

    Args:
      factory: an optax optimizer factory, e.g. ``optax.sgd``.
      **hparams: its keyword arguments.

    Returns:
      The wrapped ``GradientTransformation``.

    Example:
      >>> opt = jd.hyper.inject(optax.sgd, learning_rate=0.1, momentum=0.9)
    """
    if not callable(factory):
        raise ValueError(
            f"inject: factory must be an optax optimizer factory such as optax.sgd, "
            f"got {type(factory).__name__}."
        )
    return optax.inject_hyperparams(factory)(**hparams)


def _inject_nodes(state: PyTree) -> list[Any]:
    nodes: list[Any] = []
    jax.tree.map(
        lambda x: nodes.append(x) if _is_inject_state(x) else None,
        state,
        is_leaf=_is_inject_state,
    )
    return nodes


def _no_inject_error(fn: str) -> ValueError:
    return ValueError(
        f"{fn}: the state holds no optax.inject_hyperparams state; build the "
        "optimizer with jd.hyper.inject(optax.sgd, learning_rate=...)."
    )


def get_hyperparams(state: PyTree) -> dict[str, jax.Array]:
    """The hyperparameters of the (first) ``inject_hyperparams`` state in ``state``.

    Args:
      state: an algorithm state (or an optax state) built with :func:`inject`.

    Returns:
      ``{name: value}``; per-worker states give values with the worker axis ``[n]``.
    """
    nodes = _inject_nodes(state)
    if not nodes:
        raise _no_inject_error("get_hyperparams")
    return dict(nodes[0].hyperparams)


def set_hyperparams(state: PyTree, **values: jax.typing.ArrayLike) -> PyTree:
    r"""Replace injected hyperparameter values everywhere in ``state``.

    For every ``inject_hyperparams`` state found in ``state`` and every
    ``name=value``: ``hyperparams[name] <- broadcast(value)`` to the stored shape, so
    a scalar sets all workers and a vector ``[n]`` sets one value per worker. With
    SGD, a per-worker learning rate :math:`\eta a_i` is the same as weighting worker
    ``i``'s data by :math:`a_i` (per-worker data weights):
    :math:`x_i \leftarrow x_i - \eta\, a_i \nabla f_i(x_i)`.

    Values may be traced (differentiable). Use this to inject hyperparameters into
    a state initialized outside the differentiated function.

    Args:
      state: a pytree containing states of optimizers built with :func:`inject`.
      **values: hyperparameter values (scalar or broadcastable to the stored shape).

    Returns:
      The state with the values replaced (dtype of the stored values).

    Raises:
      ValueError: no injected state, unknown name, a schedule-valued
        hyperparameter, or a shape that does not broadcast.
    """
    if not _inject_nodes(state):
        raise _no_inject_error("set_hyperparams")

    def replace(node):
        if not _is_inject_state(node):
            return node
        hp = dict(node.hyperparams)
        scheduled = getattr(node, "hyperparams_states", {}) or {}
        for name, v in values.items():
            if name not in hp:
                raise ValueError(
                    f"set_hyperparams: unknown hyperparameter {name!r}; the "
                    f"optimizer has {sorted(hp)}."
                )
            if name in scheduled:
                raise ValueError(
                    f"set_hyperparams: {name!r} is a schedule (recomputed every "
                    "step); build the optimizer with a numeric value instead."
                )
            old = hp[name]
            v = jnp.asarray(v).astype(old.dtype)
            if v.ndim != 0 and v.shape != old.shape:
                raise ValueError(
                    f"set_hyperparams: {name!r} has shape {old.shape}; got a value "
                    f"of shape {v.shape}. Pass a scalar or one value per worker."
                )
            hp[name] = jnp.broadcast_to(v, old.shape)
        return node._replace(hyperparams=hp)

    return jax.tree.map(replace, state, is_leaf=_is_inject_state)


def piecewise_constant(
    values: jax.typing.ArrayLike, num_steps: int
) -> Callable[[jax.Array], jax.Array]:
    r"""A traced piecewise-constant schedule: ``K`` equal phases over ``T`` steps.

    .. math::
        \eta(t) = v_{k(t)}, \qquad k(t) = \min(\lfloor t K / T \rfloor, K - 1).

    ``values`` may be traced, so ``jax.grad`` gives the derivative of a training
    objective with respect to every phase's learning rate. Use as
    ``optax.sgd(piecewise_constant(v, T))``.

    Args:
      values: ``[K]`` per-phase values.
      num_steps: horizon ``T``.

    Returns:
      ``schedule(count) -> value``.
    """
    T = _positive_int(num_steps, "num_steps")
    v = jnp.asarray(values)
    if v.ndim != 1 or v.shape[0] < 1:
        raise ValueError(
            f"piecewise_constant: values must be a non-empty vector [K], got shape "
            f"{v.shape}."
        )
    K = v.shape[0]

    def schedule(count: jax.Array) -> jax.Array:
        k = jnp.clip(jnp.asarray(count, jnp.int32) * K // T, 0, K - 1)
        return v[k]

    return schedule


# ------------------------------------------------------------------ learned mixing


def edge_list(G: nx.Graph) -> np.ndarray:
    """The edges of ``G`` in the order used by :func:`parametrized_mixing`.

    Each edge is written ``(i, j)`` with ``i < j`` and the list is sorted
    lexicographically; self-loops are ignored.

    Args:
      G: connected undirected graph on ``0..n-1``.

    Returns:
      int ``[m, 2]`` array.
    """
    topology.check_graph(G)
    edges = sorted({(min(i, j), max(i, j)) for i, j in G.edges if i != j})
    return np.asarray(edges, dtype=np.int32).reshape(len(edges), 2)


def _edge_caps(G: nx.Graph) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(n, edges [m, 2], caps [m], slack [n])``: ``cap_e = 1 / max(d_i, d_j)``,
    ``slack_i = 1 - sum_{j ~ i} cap_ij >= 0``."""
    n = topology.check_graph(G)
    E = edge_list(G)
    deg = np.zeros(n)
    np.add.at(deg, E.reshape(-1), 1.0)
    caps = 1.0 / np.maximum(deg[E[:, 0]], deg[E[:, 1]]) if len(E) else np.zeros(0)
    row = np.zeros(n)
    np.add.at(row, E[:, 0], caps)
    np.add.at(row, E[:, 1], caps)
    slack = np.maximum(1.0 - row, 0.0)  # >= 0 exactly; max only removes rounding
    return n, E, caps, slack


def metropolis_theta(G: nx.Graph) -> np.ndarray:
    r"""The ``theta`` for which :func:`parametrized_mixing` is Metropolis-Hastings.

    :math:`\theta_e = \log \max(d_i, d_j)` gives
    :math:`\sigma(\theta_e) / \max(d_i, d_j) = 1 / (1 + \max(d_i, d_j))`.

    Returns:
      float64 ``[m]`` in :func:`edge_list` order.
    """
    E = edge_list(G)
    n = G.number_of_nodes()
    deg = np.zeros(n)
    np.add.at(deg, E.reshape(-1), 1.0)
    return np.log(np.maximum(deg[E[:, 0]], deg[E[:, 1]]))


def parametrized_mixing(G: nx.Graph, theta: jax.typing.ArrayLike) -> jax.Array:
    r"""Symmetric doubly-stochastic non-negative ``W`` on the edges of ``G``, any
    real ``theta``.

    With edges ``e = (i, j)`` in :func:`edge_list` order, degrees ``d``,
    :math:`c_e = 1 / \max(d_i, d_j)` and the logistic :math:`\sigma`:

    .. math::
        W_{ij} = W_{ji} = \sigma(\theta_e)\, c_e \ \ (e = (i, j) \in E), \qquad
        W_{ii} = \Big(1 - \sum_{j \sim i} c_{ij}\Big)
                 + \sum_{j \sim i} c_{ij}\, \sigma(-\theta_{ij}),

    and ``W_ij = 0`` off the graph. Since :math:`\sum_{j \sim i} c_{ij} \le
    \sum_{j \sim i} 1/d_i = 1`, every term of ``W_ii`` is non-negative and
    :math:`W_{ii} = 1 - \sum_{j \ne i} W_{ij}`: ``W`` is symmetric, non-negative,
    has unit row and column sums and the sparsity of ``G`` plus the diagonal *by
    construction*, for every real ``theta`` (no projection). It is smooth in
    ``theta``; :func:`metropolis_theta` reproduces Metropolis-Hastings weights
    (:math:`c_e \sigma(\theta_e) = 1/(1 + \max(d_i, d_j))`), and edge weights range
    over :math:`(0, 1/\max(d_i, d_j))`, which includes heavier-than-Metropolis
    weights (e.g. the fastest-mixing ring weight :math:`1/(3 - \cos(2\pi/n))`).

    Args:
      G: connected undirected graph on ``0..n-1``.
      theta: ``[m]`` real edge parameters (``m = G.number_of_edges()``), may be
        traced.

    Returns:
      ``W`` ``(n, n)`` with the dtype of ``theta`` (floating).

    Raises:
      ValueError: invalid / disconnected graph or ``theta`` of the wrong shape.
    """
    n, E, caps, slack = _edge_caps(G)
    theta = jnp.asarray(theta)
    if not jnp.issubdtype(theta.dtype, jnp.floating):
        theta = theta.astype(jnp.float32)
    m = E.shape[0]
    if theta.shape != (m,):
        raise ValueError(
            f"parametrized_mixing: theta must have shape ({m},), one entry per edge "
            f"of the graph in jd.hyper.edge_list(G) order; got {theta.shape}."
        )
    dt = theta.dtype
    c = jnp.asarray(caps, dt)
    w = jax.nn.sigmoid(theta) * c
    rest = jax.nn.sigmoid(-theta) * c  # = c - w, computed without cancellation
    i, j = jnp.asarray(E[:, 0]), jnp.asarray(E[:, 1])
    diag = jnp.asarray(slack, dt).at[i].add(rest).at[j].add(rest)
    W = jnp.zeros((n, n), dt).at[i, j].add(w).at[j, i].add(w)
    return W + jnp.diag(diag)


def traced_dense(W: jax.typing.ArrayLike) -> gossip.Mixer:
    r"""Dense gossip ``X <- W X`` with a *traced* ``W`` (no host-side validation).

    Like :func:`jaxdec.gossip.dense` (same matrix product per leaf), but ``W`` may
    be a tracer, e.g. ``parametrized_mixing(G, theta)`` inside ``jax.grad``, or a
    stack of matrices vmapped over by :func:`sweep`. Validity is the caller's
    contract (guaranteed for :func:`parametrized_mixing`).

    Args:
      W: ``(n, n)`` mixing matrix.

    Returns:
      A :class:`jaxdec.gossip.Mixer`; message counts are the non-zero off-diagonal
      entries of each column.
    """
    W = jnp.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(
            f"traced_dense: W must be a square (n, n) matrix, got shape {W.shape}."
        )
    n = W.shape[0]
    off_diag = ~jnp.eye(n, dtype=bool)

    def leaf(x: jax.Array) -> jax.Array:
        x2 = x.reshape(x.shape[0], -1)
        dt = jnp.promote_types(x.dtype, jnp.float32)
        y = jnp.matmul(W.astype(dt), x2.astype(dt), precision=_HI)
        return y.reshape(x.shape).astype(x.dtype)

    def fn(tree, step):
        return jax.tree.map(leaf, tree)

    def sends(step, n_):
        return jnp.sum((W != 0) & off_diag, axis=0).astype(jnp.float32)

    return gossip.Mixer(fn, sends, n, f"traced_dense(n={n})")


def consensus_rate(W: jax.typing.ArrayLike, rounds: int = 64) -> jax.Array:
    r"""Smooth, differentiable consensus contraction rate of ``W``.

    With :math:`M = W - 11^T/n` (singular values :math:`\sigma_2 \ge \dots`; for
    symmetric ``W`` the eigenvalue magnitudes :math:`|\lambda_i|`, ``i >= 2``) and
    ``K = 2^ceil(log2 rounds)``:

    .. math::
        r_K(W) = \Big(\frac{1}{n-1}\operatorname{tr}\big((M^T M)^K\big)\Big)^{1/2K}
               = \Big(\frac{1}{n-1}\sum_{i\ge2} \sigma_i^{2K}\Big)^{1/2K},

    the root-mean-square per-round contraction of the disagreement over ``K``
    gossip rounds. :math:`(n-1)^{-1/2K}\,\lambda \le r_K \le \lambda` with
    :math:`\lambda = \|M\|_2` (:func:`jaxdec.topology.second_largest_eigenvalue`),
    and :math:`r_K \to \lambda` as ``K`` grows; unlike :math:`\lambda` it is
    smooth at repeated eigenvalues, so it is a good objective for
    :func:`tune_mixing`. Computed by repeated squaring with trace normalization
    (no under/overflow).

    Args:
      W: ``(n, n)`` mixing matrix (may be traced), ``n >= 2``.
      rounds: horizon ``K`` (rounded up to a power of two).

    Returns:
      Scalar :math:`r_K(W)`.
    """
    W = jnp.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] < 2:
        raise ValueError(
            f"consensus_rate: W must be square (n, n) with n >= 2, got {W.shape}."
        )
    s = max(0, math.ceil(math.log2(_positive_int(rounds, "rounds"))))
    n = W.shape[0]
    M = W - jnp.full((n, n), 1.0 / n, W.dtype)
    A = jnp.matmul(M.T, M, precision=_HI)
    t = jnp.trace(A)
    log_c, B = jnp.log(t), A / t
    for _ in range(s):
        B = jnp.matmul(B, B, precision=_HI)
        t = jnp.trace(B)
        log_c, B = 2.0 * log_c + jnp.log(t), B / t
    return jnp.exp((log_c - math.log(n - 1)) / (2.0 * 2**s))


# ---------------------------------------------------------------- optimizer loops


class MinimizeResult(NamedTuple):
    """What :func:`minimize` returns.

    Attributes:
      x: the final iterate ``x_S``.
      best_x: the iterate with the lowest recorded objective.
      values: objective ``f(x_s)`` at ``x_0 .. x_S`` (NumPy ``[S + 1]``).
      grad_norms: global norm of ``grad f(x_s)``, ``s = 0..S-1`` (NumPy ``[S]``).
    """

    x: PyTree
    best_x: PyTree
    values: np.ndarray
    grad_norms: np.ndarray


def minimize(
    fn: Callable[..., jax.Array],
    x0: PyTree,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *args: Any,
    key: jax.Array | None = None,
    callback: Callable[[int, PyTree, float], None] | None = None,
) -> MinimizeResult:
    r"""Hypergradient descent: ``num_steps`` optax steps on ``fn``.

    .. math::
        g_s = \nabla_x f(x_s), \quad (u_s, o_{s+1}) = \mathrm{opt.update}(g_s, o_s,
        x_s), \quad x_{s+1} = x_s + u_s,

    where ``f(x) = fn(x, *args)``, or ``fn(x, fold_in(key, s), *args)`` when a
    ``key`` is given (a fresh training-noise realization per outer step, so the
    hyperparameters do not overfit one sample path). Like :func:`jaxdec.run`, this
    is a driver: one step is jitted once and ``args`` (samplers, evaluators) are
    passed as jit arguments.

    Args:
      fn: differentiable scalar objective.
      x0: initial pytree of variables.
      optimizer: optax transformation (e.g. ``optax.adam(0.05)``).
      num_steps: number of updates ``S >= 1``.
      *args: extra arguments of ``fn`` (not differentiated).
      key: optional PRNG key, see above.
      callback: ``callback(s, x_s, f(x_s))`` after every step (host side).

    Returns:
      A :class:`MinimizeResult`.
    """
    S = _positive_int(num_steps, "num_steps")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            "minimize: optimizer must be an optax.GradientTransformation, e.g. "
            "optax.adam(0.05)."
        )

    def objective(x, s, *a):
        if key is None:
            return fn(x, *a)
        return fn(x, jax.random.fold_in(key, s), *a)

    @jax.jit
    def step(x, opt_state, s, *a):
        val, g = jax.value_and_grad(objective)(x, s, *a)
        u, opt_state = optimizer.update(g, opt_state, x)
        return optax.apply_updates(x, u), opt_state, val, optax.tree.norm(g)

    x, opt_state = x0, optimizer.init(x0)
    values, norms = [], []
    best_x, best = x0, math.inf
    for s in range(S):
        x_new, opt_state, val, gn = step(x, opt_state, jnp.int32(s), *args)
        val = float(val)
        values.append(val)
        norms.append(float(gn))
        if val < best:
            best_x, best = x, val
        if callback is not None:
            callback(s, x, val)
        x = x_new
    last = float(jax.jit(objective)(x, jnp.int32(S), *args))
    values.append(last)
    if last < best:
        best_x = x
    return MinimizeResult(x, best_x, np.asarray(values), np.asarray(norms))


def tune_mixing(
    G: nx.Graph,
    objective: str | Callable[..., jax.Array] = "consensus",
    *args: Any,
    theta0: jax.typing.ArrayLike | None = None,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 200,
    rounds: int = 64,
    key: jax.Array | None = None,
    callback: Callable[[int, PyTree, float], None] | None = None,
) -> MinimizeResult:
    r"""Learn mixing weights on a fixed graph with optax.

    Minimizes :math:`L(W(\theta))` over the edge parameters of
    :func:`parametrized_mixing`, starting from Metropolis-Hastings
    (:func:`metropolis_theta`) by default:

    * ``objective="consensus"``: :math:`L = r_K(W)` (:func:`consensus_rate`), i.e.
      faster gossip / a larger spectral gap;
    * a callable ``objective(W, *args)`` (``objective(W, key_s, *args)`` with a
      ``key``), e.g. the validation loss after an :func:`unroll` that gossips with
      ``traced_dense(W)``.

    Args:
      G: connected graph.
      objective: ``"consensus"`` or a differentiable function of ``W``.
      *args: extra arguments of the objective (samplers, evaluators, ...).
      theta0: initial ``[m]`` parameters (default Metropolis).
      optimizer: optax transformation (default ``optax.adam(0.05)``).
      num_steps: optimizer steps.
      rounds: ``K`` of :func:`consensus_rate` for ``"consensus"``.
      key: optional key for stochastic objectives (see :func:`minimize`).
      callback: see :func:`minimize`.

    Returns:
      A :class:`MinimizeResult` over ``theta``; the learned matrix is
      ``parametrized_mixing(G, result.best_x)``.
    """
    if theta0 is None:
        theta0 = metropolis_theta(G)
    theta0 = jnp.asarray(theta0, jnp.result_type(float))
    parametrized_mixing(G, theta0)  # validates graph and shape before compiling
    if optimizer is None:
        optimizer = optax.adam(0.05)
    if objective == "consensus":
        _positive_int(rounds, "rounds")

        def fn(theta, *a):
            return consensus_rate(parametrized_mixing(G, theta), rounds)

    elif callable(objective):

        def fn(theta, *a):
            return objective(parametrized_mixing(G, theta), *a)

    else:
        raise ValueError(
            f"tune_mixing: objective must be 'consensus' or a callable "
            f"objective(W, *args), got {objective!r}."
        )
    return minimize(fn, theta0, optimizer, num_steps, *args, key=key, callback=callback)


# ------------------------------------------------------------------------ sweeps


def grid(**axes: jax.typing.ArrayLike) -> tuple[dict[str, jax.Array], tuple[int, ...]]:
    """Cartesian product of hyperparameter axes, flattened for :func:`sweep`.

    Entry ``g`` of the flat grid is ``{name: axes[name][k_name(g)]}`` with the
    multi-index ``k(g) = unravel_index(g, shape)`` (row-major: the last axis varies
    fastest). An axis may hold arrays (its leading axis indexes the values), e.g. a
    stack of mixing matrices ``[T, n, n]``.

    Args:
      **axes: ``name=values`` with ``values`` of shape ``[len, ...]``.

    Returns:
      ``(flat, shape)``: ``flat[name]`` has leading axis ``prod(shape)``.
    """
    if not axes:
        raise ValueError("grid: pass at least one axis, e.g. grid(lr=[0.1, 0.2]).")
    arrays = {k: jnp.asarray(v) for k, v in axes.items()}
    for k, v in arrays.items():
        if v.ndim == 0 or v.shape[0] == 0:
            raise ValueError(
                f"grid: axis {k!r} must be a non-empty sequence, got shape {v.shape}."
            )
    shape = tuple(int(v.shape[0]) for v in arrays.values())
    idx = np.indices(shape).reshape(len(shape), -1)
    flat = {k: v[idx[a]] for a, (k, v) in enumerate(arrays.items())}
    return flat, shape


def sweep(
    fn: Callable[..., PyTree],
    hparams: PyTree,
    *args: Any,
    batch_size: int | None = None,
    shape: Sequence[int] | None = None,
) -> PyTree:
    r"""Evaluate ``fn(h, *args)`` for every row of ``hparams`` as one program.

    .. math:: \mathrm{out}[g] = \mathrm{fn}(h_g, \mathrm{args}), \quad g = 1..G,

    computed with ``jax.vmap`` over the leading axis of every ``hparams`` leaf
    (``args`` are shared, not batched), or with
    ``jax.lax.map(..., batch_size=b)`` (``b`` runs vectorized at a time, bounding
    memory). Not jitted: wrap the call in ``jax.jit`` (pass data-carrying
    ``args`` as jit arguments).

    Args:
      fn: ``fn(h, *args) -> pytree``, e.g. an :func:`unroll` plus evaluation.
      hparams: pytree whose leaves share the leading grid axis ``G`` (see
        :func:`grid`).
      *args: shared arguments.
      batch_size: if given, vectorize this many grid points at a time.
      shape: if given, reshape the leading ``G`` of every output leaf to ``shape``
        (e.g. the ``shape`` returned by :func:`grid`).

    Returns:
      Outputs with leading axis ``G`` (or ``shape``).
    """
    leaves = jax.tree.leaves(hparams)
    if not leaves:
        raise ValueError("sweep: hparams has no array leaves to sweep over.")
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"sweep: every hparams leaf needs the same leading grid axis, got "
            f"leading sizes {sorted(sizes)}; build the grid with jd.hyper.grid(...)."
        )
    G = sizes.pop()
    if shape is not None and math.prod(shape) != G:
        raise ValueError(f"sweep: shape {tuple(shape)} does not have {G} entries.")
    if batch_size is None:
        out = jax.vmap(lambda h: fn(h, *args))(hparams)
    else:
        b = _positive_int(batch_size, "batch_size")
        out = jax.lax.map(lambda h: fn(h, *args), hparams, batch_size=b)
    if shape is not None:
        out = jax.tree.map(lambda v: v.reshape(*shape, *v.shape[1:]), out)
    return out


def plot_sweep(
    values: jax.typing.ArrayLike,
    path: str | Path,
    *,
    x: Sequence[Any],
    y: Sequence[Any] | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    fmt: str = "{:.3f}",
    cmap: str = "viridis",
    log_x: bool = False,
    best: str | None = "max",
) -> Path:
    """Plot sweep results and save a PNG (matplotlib, headless-safe).

    A 2-D ``values[len(y), len(x)]`` is drawn as an annotated heat map (rows ``y``,
    columns ``x``); a 1-D ``values[len(x)]`` (or 2-D with ``y`` labels and
    ``best=None``) as one line per row. The best cell (``best="max"`` or ``"min"``)
    is outlined.

    Args:
      values: sweep outputs, e.g. from :func:`sweep` with ``shape``.
      path: output ``.png``.
      x: column labels / x values.
      y: row labels (required for 2-D values).
      xlabel: x-axis label.
      ylabel: y-axis label.
      title: figure title.
      fmt: cell annotation format.
      cmap: colormap of the heat map.
      log_x: log-scale x for line plots.
      best: ``"max"``, ``"min"`` or ``None``.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.asarray(values, dtype=float)
    if v.ndim not in (1, 2):
        raise ValueError(f"plot_sweep: values must be 1-D or 2-D, got {v.shape}.")
    if v.shape[-1] != len(x):
        raise ValueError(
            f"plot_sweep: {len(x)} x labels for {v.shape[-1]} columns of values."
        )
    if v.ndim == 2 and (y is None or len(y) != v.shape[0]):
        raise ValueError(f"plot_sweep: 2-D values need y with {v.shape[0]} row labels.")
    if best not in ("max", "min", None):
        raise ValueError(
            f"plot_sweep: best must be 'max', 'min' or None, got {best!r}."
        )
    path = Path(path)
    if v.ndim == 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot(np.asarray(x, dtype=float), v, marker="o")
        if log_x:
            ax.set_xscale("log")
        if best is not None and np.isfinite(v).any():
            k = int(np.nanargmax(v) if best == "max" else np.nanargmin(v))
            ax.plot([float(x[k])], [v[k]], "r*", ms=12)
    else:
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(x), 1.0 + 0.6 * len(y)))
        im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, aspect="auto")
        fig.colorbar(im, ax=ax)
        ax.set_xticks(range(len(x)), [str(t) for t in x], rotation=45, ha="right")
        ax.set_yticks(range(len(y)), [str(t) for t in y])
        for r in range(v.shape[0]):
            for c in range(v.shape[1]):
                ax.text(
                    c,
                    r,
                    fmt.format(v[r, c]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w",
                )
        if best is not None and np.isfinite(v).any():
            flat = np.nanargmax(v) if best == "max" else np.nanargmin(v)
            r, c = np.unravel_index(int(flat), v.shape)
            ax.add_patch(
                plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2)
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compiled_memory(fn: Callable[..., Any], *args: Any) -> dict[str, int] | None:
    """XLA's memory estimate for ``jax.jit(fn)(*args)``, without running it.

    Uses ``jax.jit(fn).lower(*args).compile().memory_analysis()``.

    Returns:
      ``{"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes",
      "generated_code_bytes"}`` or ``None`` when the backend reports nothing.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if ma is None:
        return None
    fields = {
        "temp_bytes": "temp_size_in_bytes",
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    return {k: int(getattr(ma, a, 0) or 0) for k, a in fields.items()}
