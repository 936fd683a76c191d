r"""Federated learning on the worker axis: FedAvg (+ server optimizers), FedProx,
SCAFFOLD, FedPer, IFCA.

Clients are the worker axis (leaves ``[n, ...]``); the server's state is leaves
without it. One ``step`` is one communication round:

1. **Participation.** ``S_r``: ``k`` of the ``n`` clients, the mask
   ``jd.participation.round_mask(key(seed), r, n, k)`` of round ``r = state.count``
   (reproducible from ``seed``, the same client sets for every algorithm built with
   the same ``seed``; ``clients_per_round=None``: all).
2. **Local training.** Every participant starts from the server model ``x``
   (personal leaves: from its own copy) and runs ``E`` optax steps on its round's
   minibatches ``xi_{i,1..E}`` (a ``lax.scan``),

   .. math::
       y_i^{e+1} = y_i^e + \mathrm{opt}(g_i^e), \qquad
       g_i^e = \nabla f_i(y_i^e; \xi_{i,e}) + \text{correction}.

3. **Aggregation.** Server averaging is the rank-one mixing matrix
   ``A = 1 c^T`` with ``c_j = [j in S_r] n_j / sum_{i in S_r} n_i`` (data-size
   weights ``n_j``), ``x_bar = sum_j c_j y_j``; with a server optimizer (optax)
   the pseudo-gradient ``x - x_bar`` is fed to it (FedAvgM:
   ``optax.sgd(1, momentum=0.9)``, FedAdam: ``optax.adam(lr)``; Reddi et al. 2021):

   .. math::
       x \leftarrow x + \mathrm{server\_opt}(x - \bar x) \quad
       (\text{no server optimizer: } x \leftarrow \bar x).

   Every client's shared leaves then hold the new server model (a client that
   skipped the round downloads it when it next takes part; holding it now is the
   same), personal leaves stay on their client.

Batch convention (all federated algorithms, FedTSDP included): the batch of a round
carries the local steps' minibatches, leaves ``[n, E, b, ...]``; build it with
:func:`round_sampler` (``E`` = local steps is read from the batch shape). Client
optimizer states are carried across rounds and never aggregated.

Variants (corrections in step 2, extra state):

* :func:`fedavg` (McMahan et al. 2017), optional ``server_optimizer``;
* :func:`fedprox` (Li et al. 2020): ``g += mu (y - x)``;
* :func:`fedper` (Arivazhagan et al. 2019): ``personal`` leaves (the head) never
  leave the client; local-only training is ``fedper`` with every leaf personal;
* :func:`scaffold` (Karimireddy et al. 2020): ``g += c - c_i``; after the round
  ``c_i^+ = c_i - c + (x - y_i) / (E eta_l)`` (option II) or
  ``c_i^+ = (1/E) sum_e grad f_i(x; xi_{i,e})`` (option I),
  ``c <- c + (1/n) sum_{i in S} (c_i^+ - c_i)``, so ``c = (1/n) sum_i c_i`` always;
* :func:`ifca` (Ghosh et al. 2020): ``G`` server models; each participant picks
  ``g_i = argmin_g f_i(x_g; xi_{i,1})``, trains ``x_{g_i}``, and each model is the
  weighted mean of the participants that picked it (block-diagonal averaging).

Communication accounting (``Info``): ``floats_sent`` / ``floats_received`` are the
mean floats per client per round (uplink / downlink; non-participants count 0).

Example:
  >>> algo = fedavg(loss_fn, optax.sgd(0.05), clients_per_round=5)
  >>> sample = round_sampler(jd.data.make_sampler(data, 32), 20)   # [n, 20, 32, ...]
  >>> state = algo.init(params, data.counts)                    # params [n, ...]
  >>> state, hist = jd.run(algo, state, sample, jax.random.key(0), 100)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec import participation
from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.algorithms.personalized import round_sampler
from jaxdec.types import Algorithm, LossFn, PyTree

__all__ = [
    "round_sampler",
    "FedAvgState",
    "ScaffoldState",
    "IFCAState",
    "FederatedInfo",
    "fedavg",
    "fedprox",
    "fedper",
    "local_only",
    "scaffold",
    "ifca",
    "resolve_personal",
    "local_train",
    "participants",
]

PersonalSpec = PyTree | str | Callable[[str], bool] | None


# ------------------------------------------------------------------------ states


class FedAvgState(NamedTuple):
    """State of :func:`fedavg` / :func:`fedprox` / :func:`fedper`.

    Attributes:
      params: client models ``[n, ...]``; shared leaves equal ``server`` after every
        round, personal leaves are the clients' own.
      opt_state: per-client optax states (leaves ``[n, ...]``), never aggregated.
      server: server model (leaves without the worker axis; its personal leaves are
        unused).
      server_opt_state: server optax state (``()`` without a server optimizer).
      weights: float32 ``[n]`` aggregation weights (client data sizes ``n_i``).
      count: int32 round counter ``r``.
    """

    params: PyTree
    opt_state: PyTree
    server: PyTree
    server_opt_state: PyTree
    weights: jax.Array
    count: jax.Array


class ScaffoldState(NamedTuple):
    """State of :func:`scaffold`.

    Attributes:
      params: client models ``[n, ...]`` (all equal to ``server`` after a round).
      opt_state: per-client optax states ``[n, ...]``.
      server: server model ``x``.
      server_opt_state: server optax state (``()`` without a server optimizer).
      control: client control variates ``c_i``, leaves ``[n, ...]``.
      server_control: server control variate ``c``, leaves without the worker axis.
      weights: float32 ``[n]`` model-averaging weights.
      count: int32 round counter.
    """

    params: PyTree
    opt_state: PyTree
    server: PyTree
    server_opt_state: PyTree
    control: PyTree
    server_control: PyTree
    weights: jax.Array
    count: jax.Array


class IFCAState(NamedTuple):
    """State of :func:`ifca`.

    Attributes:
      params: client models ``[n, ...]``: the model of each client's cluster.
      opt_state: per-client optax states ``[n, ...]``.
      models: the server's cluster models, leaves ``[G, ...]``.
      cluster: int32 ``[n]``, each client's last chosen cluster (0 before it first
        takes part).
      weights: float32 ``[n]`` aggregation weights.
      count: int32 round counter.
    """

    params: PyTree
    opt_state: PyTree
    models: PyTree
    cluster: jax.Array
    weights: jax.Array
    count: jax.Array


class FederatedInfo(NamedTuple):
    """Per-round diagnostics of the federated algorithms (returned, not carried).

    Attributes:
      loss: mean minibatch loss over participants and local steps (scalar).
      participation: float32 ``[n]``, 1 for this round's participants.
      floats_sent: mean floats a client uploaded this round.
      floats_received: mean floats a client downloaded this round.
      finite: ``[n]`` flag, every client's loss and parameters finite.
      num_clusters: number of non-empty clusters (clustered algorithms), else None.
      aux: participants' ``loss_fn`` aux averaged over local steps, leaves ``[k]``
        (``has_aux=True``), else None.
    """

    loss: jax.Array
    participation: jax.Array
    floats_sent: jax.Array
    floats_received: jax.Array
    finite: jax.Array
    num_clusters: jax.Array | None = None
    aux: Any = None


# --------------------------------------------------------------------- checks


def _check_args(loss_fn, optimizer, name: str, has_aux) -> None:
    if not callable(loss_fn):
        raise ValueError(
            f"{name}: loss_fn must be callable loss_fn(params, batch, key)."
        )
    for what, opt in (("optimizer", optimizer),):
        if not isinstance(opt, optax.GradientTransformation):
            raise ValueError(
                f"{name}: {what} must be an optax.GradientTransformation (e.g. "
                f"optax.sgd(0.05)), got {type(opt).__name__}."
            )
    _common.check_has_aux(has_aux, name)


def _check_server_opt(server_optimizer, name: str) -> None:
    if server_optimizer is not None and not isinstance(
        server_optimizer, optax.GradientTransformation
    ):
        raise ValueError(
            f"{name}: server_optimizer must be None (plain averaging) or an optax "
            "GradientTransformation such as optax.sgd(1.0, momentum=0.9) (FedAvgM) "
            f"or optax.adam(1e-2) (FedAdam), got {type(server_optimizer).__name__}."
        )


def _check_k(k, name: str) -> None:
    if k is not None and (isinstance(k, bool) or int(k) != k or int(k) < 1):
        raise ValueError(
            f"{name}: clients_per_round must be None (all clients) or an int >= 1, "
            f"got {k!r}."
        )


def _check_seed(seed, name: str) -> int:
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"{name}: seed must be an int, got {seed!r}.")
    return int(seed)


def check_weights(weights, n: int, name: str) -> jax.Array:
    """Validate client weights ``[n]`` (``None``: equal) and return float32."""
    if weights is None:
        return jnp.ones((n,), jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or w.min() <= 0:
        raise ValueError(
            f"{name}: weights must be [n] = [{n}] finite positive numbers (the "
            f"clients' data sizes, e.g. data.counts), got shape {w.shape} with "
            f"min {w.min() if w.size else None}."
        )
    return jnp.asarray(w, jnp.float32)


def local_steps_of(batch: PyTree, n: int, name: str) -> int:
    """``E`` from a round batch with leaves ``[n, E, b, ...]`` (raises otherwise)."""
    leaves = jax.tree.leaves(batch)
    shapes = {tuple(jnp.shape(x)[:2]) for x in leaves if jnp.ndim(x) >= 2}
    if not leaves or len(shapes) != 1 or any(jnp.ndim(x) < 2 for x in leaves):
        raise ValueError(
            f"{name}: batch leaves must be [n, E, b, ...] (one minibatch per local "
            "step), with the same n and E; build the sampler with "
            "jaxdec.algorithms.federated.round_sampler(sampler, local_steps)."
        )
    ((nn, E),) = shapes
    if nn != n:
        raise ValueError(
            f"{name}: the batch has {nn} clients on its leading axis but params have "
            f"{n}; sample one round batch [n, E, b, ...] for all n clients."
        )
    return int(E)


def resolve_personal(personal: PersonalSpec, params: PyTree, name: str) -> PyTree:
    """Mask pytree of personal leaves (True = stays on the client).

    ``personal`` is ``None`` (nothing personal), a mask pytree of bools, a path
    predicate, a regular expression searched in ``"a/b/c"`` paths, or a tuple of
    path components (``("head",)``: everything under ``head``). An all-True mask
    (local-only training) is allowed.
    """
    if personal is None:
        return jax.tree.map(lambda _: False, params)
    if isinstance(personal, tuple) and all(isinstance(s, str) for s in personal):
        mask = jtree.mask_under(params, *personal)
    elif isinstance(personal, str) or callable(personal):
        mask = jtree.mask_by_path(params, personal)
    else:
        mask = personal
    jtree.validate_mask(mask, params, name=f"{name}: personal")
    return mask


# ----------------------------------------------------------------- round pieces


def participants(
    seed_key: jax.Array, count: jax.Array, n: int, k: int
) -> tuple[jax.Array, jax.Array | None]:
    """This round's mask ``[n]`` and sorted participant indices ``[k]``.

    ``k == n`` returns ``(all True, None)``: no gather needed.
    """
    if k == n:
        return jnp.ones((n,), bool), None
    mask = participation.round_mask(seed_key, count, n, k)
    return mask, jnp.nonzero(mask, size=k)[0]


def _take(tree: PyTree, idx: jax.Array | None) -> PyTree:
    return tree if idx is None else jax.tree.map(lambda x: x[idx], tree)


def _put(tree: PyTree, idx: jax.Array | None, new: PyTree) -> PyTree:
    if idx is None:
        return new
    return jax.tree.map(lambda x, y: x.at[idx].set(y), tree, new)


def _bcast(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n, *x.shape)), tree)


def local_train(
    value_and_grad: Callable,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    batch: PyTree,
    key: jax.Array,
    correction: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> tuple[PyTree, PyTree, jax.Array, Any]:
    r"""``E`` local optax steps on every client of the given slice (``lax.scan``).

    .. math::
        g^e = \nabla f(y^e; \xi_e) + \mathrm{corr}(g, y^e), \quad
        (u, s) = \mathrm{opt.update}(g^e, s, y^e), \quad y^{e+1} = y^e + u.

    Step ``e`` uses key ``fold_in(key, e)`` (split over clients inside
    ``value_and_grad``).

    Args:
      value_and_grad: from ``_common.worker_value_and_grad`` (worker-axis lifted).
      optimizer: the client optimizer.
      params: leaves ``[k, ...]``.
      opt_state: client optax states ``[k, ...]``.
      batch: leaves ``[k, E, b, ...]``.
      key: PRNG key of the round.
      correction: ``corr(g, y) -> g'`` applied to the gradient (FedProx, SCAFFOLD).

    Returns:
      ``(params, opt_state, loss [k] (mean over local steps), aux (mean over steps))``.
    """
    xs = jax.tree.map(lambda b: jnp.swapaxes(b, 0, 1), batch)  # [E, k, b, ...]
    E = jax.tree.leaves(xs)[0].shape[0]
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(E))

    def body(carry, inp):
        y, s = carry
        b, kk = inp
        loss, aux, g = value_and_grad(y, b, kk)
        if correction is not None:
            g = correction(g, y)
        u, s = jax.vmap(optimizer.update)(g, s, y)
        return (optax.apply_updates(y, u), s), (loss, aux)

    (y, s), (loss, aux) = jax.lax.scan(body, (params, opt_state), (xs, keys))
    mean_e = lambda v: jnp.mean(v.astype(jnp.float32), axis=0)  # noqa: E731
    aux = None if aux is None else jax.tree.map(mean_e, aux)
    return y, s, mean_e(loss), aux


def _weighted_mean(tree: PyTree, w: jax.Array) -> PyTree:
    """``sum_j w_j x_j / sum_j w_j`` over the leading axis (one GEMV per leaf)."""
    return participation.masked_mean(tree, jnp.ones(w.shape, bool), w)


def _server_update(server, sos, avg, server_optimizer, personal):
    """``x <- x_bar`` or ``x <- x + server_opt(x - x_bar)``; personal leaves kept."""
    if server_optimizer is None:
        new = avg
    else:
        g = jax.tree.map(lambda s, a: (s - a).astype(s.dtype), server, avg)
        u, sos = server_optimizer.update(g, sos, server)
        new = optax.apply_updates(server, u)
    return jtree.select(personal, server, new), sos


def _shared_size(mask: PyTree, tree: PyTree, shared: bool) -> int:
    """Floats per client in the shared (``shared=True``) or personal leaves."""
    leaves = [
        int(np.prod(jnp.shape(x)[1:], dtype=np.int64))
        for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tree), strict=True)
        if bool(m) != shared
    ]
    return int(sum(leaves))


def _finite(loss_k, idx, n, params) -> jax.Array:
    loss_all = jnp.zeros((n,), jnp.float32) if idx is not None else loss_k
    if idx is not None:
        loss_all = loss_all.at[idx].set(loss_k)
    return _common.all_finite(loss_all, params)


# ------------------------------------------------------------------- FedAvg family


def fedavg(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    clients_per_round: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    personal: PersonalSpec = None,
    prox_mu: float = 0.0,
    seed: int = 0,
    has_aux: bool = False,
) -> Algorithm:
    r"""Federated averaging (see the module docstring for the round).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE client.
      optimizer: client optax optimizer (``E`` steps per round, state carried).
      clients_per_round: ``k`` clients sampled per round (``None``: all ``n``).
      server_optimizer: optional optax optimizer on the pseudo-gradient
        ``x - x_bar`` (FedAvgM, FedAdam, ...); ``None``: ``x <- x_bar``.
      personal: leaves that never leave the client (FedPer's head; see
        :func:`resolve_personal`).
      prox_mu: FedProx coefficient ``mu >= 0``: local gradients get
        ``mu (y - x)`` (the gradient of ``mu/2 ||y - x||^2``).
      seed: participation seed (masks ``round_mask(key(seed), r, n, k)``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``Algorithm(init, step)``: ``init(params, weights=None) -> FedAvgState`` with
      ``weights`` the client data sizes ``[n]`` (``None``: equal), and
      ``step(state, batch, key) -> (FedAvgState, FederatedInfo)`` with batch leaves
      ``[n, E, b, ...]``.

    Example:
      >>> fedadam = fedavg(loss_fn, optax.sgd(0.05), server_optimizer=optax.adam(0.01))
    """
    name = "fedavg"
    _check_args(loss_fn, optimizer, name, has_aux)
    _check_server_opt(server_optimizer, name)
    _check_k(clients_per_round, name)
    seed = _check_seed(seed, name)
    mu = float(prox_mu)
    if not mu >= 0.0:
        raise ValueError(f"{name}: prox_mu must be >= 0, got {prox_mu!r}.")
    vg = _common.worker_value_and_grad(loss_fn, has_aux)

    def init(params: PyTree, weights=None) -> FedAvgState:
        n = jtree.num_workers(params)
        participation.check_participation(n, clients_per_round, name)
        resolve_personal(personal, params, name)
        server = jax.tree.map(lambda x: x[0], params)
        sos = () if server_optimizer is None else server_optimizer.init(server)
        return FedAvgState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(params),
            server=server,
            server_opt_state=sos,
            weights=check_weights(weights, n, name),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: FedAvgState, batch, key) -> tuple[FedAvgState, FederatedInfo]:
        n = jtree.num_workers(state.params)
        local_steps_of(batch, n, name)
        k = participation.check_participation(n, clients_per_round, name)
        pmask = resolve_personal(personal, state.params, name)
        mask, idx = participants(jax.random.key(seed), state.count, n, k)
        own = _take(state.params, idx)
        x0 = jtree.select(pmask, own, _bcast(state.server, k))
        correction = None
        if mu > 0.0:

            def correction(g, y):
                return jax.tree.map(lambda gg, yy, xx: gg + mu * (yy - xx), g, y, x0)

        y, s, loss, aux = local_train(
            vg,
            optimizer,
            x0,
            _take(state.opt_state, idx),
            _take(batch, idx),
            key,
            correction,
        )
        w = state.weights if idx is None else state.weights[idx]
        server, sos = _server_update(
            state.server,
            state.server_opt_state,
            _weighted_mean(y, w),
            server_optimizer,
            pmask,
        )
        params = jtree.select(pmask, _put(state.params, idx, y), _bcast(server, n))
        d = _shared_size(pmask, state.params, shared=True)
        frac = k / n
        info = FederatedInfo(
            loss=jnp.mean(loss),
            participation=mask.astype(jnp.float32),
            floats_sent=jnp.asarray(frac * d, jnp.float32),
            floats_received=jnp.asarray(frac * d, jnp.float32),
            finite=_finite(loss, idx, n, params),
            aux=aux,
        )
        new = FedAvgState(
            params,
            _put(state.opt_state, idx, s),
            server,
            sos,
            state.weights,
            state.count + 1,
        )
        return new, info

    return Algorithm(init, step)


def fedprox(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mu: float,
    **kwargs,
) -> Algorithm:
    r"""FedProx: FedAvg whose local objective adds ``mu/2 ||y - x||^2``.

    Local gradients are ``g = grad f_i(y) + mu (y - x)`` with ``x`` the model the
    client started the round from. ``mu = 0`` is FedAvg. Keywords as
    :func:`fedavg`.
    """
    if not float(mu) >= 0.0:
        raise ValueError(f"fedprox: mu must be >= 0, got {mu!r}.")
    return fedavg(loss_fn, optimizer, prox_mu=float(mu), **kwargs)


def fedper(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    personal: PersonalSpec = ("head",),
    **kwargs,
) -> Algorithm:
    r"""FedPer: FedAvg of the base layers, personal layers never leave the client.

    ``x_shared <- weighted mean of the participants' shared leaves``; personal
    leaves (default: everything under ``head``) are trained locally only. Keywords
    as :func:`fedavg`.
    """
    return fedavg(loss_fn, optimizer, personal=personal, **kwargs)


def local_only(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, **kwargs
) -> Algorithm:
    """Local training without communication (every leaf personal), same rounds."""
    return fedavg(loss_fn, optimizer, personal=lambda p: True, **kwargs)


# ------------------------------------------------------------------------ SCAFFOLD


def scaffold(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    local_lr: float | None = None,
    control: str = "ii",
    clients_per_round: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    has_aux: bool = False,
) -> Algorithm:
    r"""SCAFFOLD (Karimireddy et al. 2020) with control variates.

    Local steps use the corrected gradient ``g = grad f_i(y; xi) - c_i + c``.
    After ``E`` steps the client updates its control variate,

    .. math::
        c_i^+ = c_i - c + \frac{x - y_i}{E \eta_l} \ \text{(II)}, \qquad
        c_i^+ = \frac1E \sum_e \nabla f_i(x; \xi_{i,e}) \ \text{(I)},

    and the server aggregates ``x`` as in :func:`fedavg` (data-size weights; the
    paper's ``eta_g`` is ``server_optimizer=optax.sgd(eta_g)``) and sets
    ``c <- c + (1/n) sum_{i in S} (c_i^+ - c_i)``, which keeps
    ``c = (1/n) sum_i c_i`` for all rounds (``c_i = c = 0`` initially).

    Args:
      loss_fn: ONE-client loss.
      optimizer: client optimizer (the paper: ``optax.sgd(local_lr)``).
      local_lr: ``eta_l`` of option II (required for ``control="ii"``).
      control: ``"ii"`` (default, free) or ``"i"`` (``E`` extra gradients at ``x``).
      clients_per_round: ``k`` (``None``: all).
      server_optimizer: optional optax optimizer on ``x - x_bar``.
      seed: participation seed.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``Algorithm(init, step)``, ``init(params, weights=None) -> ScaffoldState``.
      Uplink and downlink are ``2 d`` floats per participant (model and control).
    """
    name = "scaffold"
    _check_args(loss_fn, optimizer, name, has_aux)
    _check_server_opt(server_optimizer, name)
    _check_k(clients_per_round, name)
    seed = _check_seed(seed, name)
    if control not in ("i", "ii"):
        raise ValueError(f"{name}: control must be 'i' or 'ii', got {control!r}.")
    if control == "ii" and (local_lr is None or not float(local_lr) > 0):
        raise ValueError(
            f"{name}: option II needs local_lr=<the client learning rate eta_l > 0> "
            "(c_i+ = c_i - c + (x - y_i) / (E eta_l)); pass it or use control='i'."
        )
    vg = _common.worker_value_and_grad(loss_fn, has_aux)

    def init(params: PyTree, weights=None) -> ScaffoldState:
        n = jtree.num_workers(params)
        participation.check_participation(n, clients_per_round, name)
        server = jax.tree.map(lambda x: x[0], params)
        sos = () if server_optimizer is None else server_optimizer.init(server)
        return ScaffoldState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(params),
            server=server,
            server_opt_state=sos,
            control=jax.tree.map(jnp.zeros_like, params),
            server_control=jax.tree.map(jnp.zeros_like, server),
            weights=check_weights(weights, n, name),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: ScaffoldState, batch, key) -> tuple[ScaffoldState, FederatedInfo]:
        n = jtree.num_workers(state.params)
        E = local_steps_of(batch, n, name)
        k = participation.check_participation(n, clients_per_round, name)
        mask, idx = participants(jax.random.key(seed), state.count, n, k)
        x0 = _bcast(state.server, k)
        ci = _take(state.control, idx)
        c = state.server_control

        def correction(g, y):
            return jax.tree.map(lambda gg, a, b: gg - a + b[None], g, ci, c)

        b_k = _take(batch, idx)
        y, s, loss, aux = local_train(
            vg, optimizer, x0, _take(state.opt_state, idx), b_k, key, correction
        )
        if control == "ii":
            scale = 1.0 / (E * float(local_lr))
            ci_new = jax.tree.map(
                lambda a, b, xx, yy: a - b[None] + scale * (xx - yy), ci, c, x0, y
            )
        else:
            xs = jax.tree.map(lambda v: jnp.swapaxes(v, 0, 1), b_k)
            keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(E))
            grads = jax.vmap(lambda bb, kk: vg(x0, bb, kk)[2])(xs, keys)
            ci_new = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        dc = jax.tree.map(lambda a, b: a - b, ci_new, ci)
        ones = jnp.ones((k,), jnp.float32)
        dc_sum = jax.tree.map(
            lambda v: jnp.matmul(ones.astype(v.dtype), v.reshape(k, -1)).reshape(
                v.shape[1:]
            ),
            dc,
        )
        server_control = jax.tree.map(lambda a, b: a + b / n, c, dc_sum)
        w = state.weights if idx is None else state.weights[idx]
        nothing = jax.tree.map(lambda _: False, state.server)
        server, sos = _server_update(
            state.server,
            state.server_opt_state,
            _weighted_mean(y, w),
            server_optimizer,
            nothing,
        )
        params = _bcast(server, n)
        d = jtree.num_params(state.params)
        frac = k / n
        info = FederatedInfo(
            loss=jnp.mean(loss),
            participation=mask.astype(jnp.float32),
            floats_sent=jnp.asarray(2 * frac * d, jnp.float32),
            floats_received=jnp.asarray(2 * frac * d, jnp.float32),
            finite=_finite(loss, idx, n, params),
            aux=aux,
        )
        new = ScaffoldState(
            params=params,
            opt_state=_put(state.opt_state, idx, s),
            server=server,
            server_opt_state=sos,
            control=_put(state.control, idx, ci_new),
            server_control=server_control,
            weights=state.weights,
            count=state.count + 1,
        )
        return new, info

    return Algorithm(init, step)


# --------------------------------------------------------------------------- IFCA


def ifca(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    num_clusters: int,
    *,
    clients_per_round: int | None = None,
    seed: int = 0,
    has_aux: bool = False,
) -> Algorithm:
    r"""IFCA, the iterative federated clustering algorithm (Ghosh et al. 2020).

    The server holds ``G`` models ``x_1..x_G``. In a round every participant
    estimates ``g_i = argmin_g f_i(x_g; xi_{i,1})`` on its first minibatch of the
    round, runs ``E`` optax steps from ``x_{g_i}``, and the server sets

    .. math::
        x_g \leftarrow \frac{\sum_{i \in S, g_i = g} n_i y_i}
                             {\sum_{i \in S, g_i = g} n_i}

    (unchanged if no participant picked ``g``): a block-diagonal averaging matrix
    built from the labels. Every client's ``params`` is then the model of its last
    chosen cluster. Downlink ``G d`` floats per participant, uplink ``d``.

    Args:
      loss_fn: ONE-client loss.
      optimizer: client optimizer.
      num_clusters: ``G >= 1``.
      clients_per_round: ``k`` (``None``: all).
      seed: participation seed.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``Algorithm(init, step)``; ``init(params, weights=None, models=None)``:
      ``models`` (leaves ``[G, ...]``) default to the first ``G`` clients' params,
      which must differ (``init_workers(..., same_init=False)``), else IFCA could
      never separate the clusters.
    """
    name = "ifca"
    _check_args(loss_fn, optimizer, name, has_aux)
    _check_k(clients_per_round, name)
    seed = _check_seed(seed, name)
    if (
        isinstance(num_clusters, bool)
        or int(num_clusters) != num_clusters
        or (int(num_clusters) < 1)
    ):
        raise ValueError(
            f"{name}: num_clusters must be an int >= 1, got {num_clusters!r}."
        )
    G = int(num_clusters)
    vg = _common.worker_value_and_grad(loss_fn, has_aux)
    loss_only = (lambda p, b, kk: loss_fn(p, b, kk)[0]) if has_aux else loss_fn

    def init(params: PyTree, weights=None, models=None) -> IFCAState:
        n = jtree.num_workers(params)
        participation.check_participation(n, clients_per_round, name)
        if models is None:
            if n < G:
                raise ValueError(
                    f"{name}: num_clusters={G} > n={n} clients; pass models=<[G, ...] "
                    "initial cluster models>."
                )
            models = jax.tree.map(lambda x: x[:G], params)
        if jtree.num_workers(models) != G:
            raise ValueError(f"{name}: models must have G={G} on their leading axis.")
        if G > 1:
            flat = np.concatenate(
                [np.asarray(x).reshape(G, -1) for x in jax.tree.leaves(models)], axis=1
            )
            if len({f.tobytes() for f in flat}) < G:
                raise ValueError(
                    f"{name}: some of the {G} initial cluster models are identical, so "
                    "every client would pick the same one; build params with "
                    "jd.models.init_workers(..., same_init=False) or pass distinct "
                    "models=."
                )
        cluster = jnp.zeros((n,), jnp.int32)
        return IFCAState(
            params=jax.tree.map(lambda m: m[cluster], models),
            opt_state=jax.vmap(optimizer.init)(params),
            models=models,
            cluster=cluster,
            weights=check_weights(weights, n, name),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: IFCAState, batch, key) -> tuple[IFCAState, FederatedInfo]:
        n = jtree.num_workers(state.params)
        local_steps_of(batch, n, name)
        k = participation.check_participation(n, clients_per_round, name)
        mask, idx = participants(jax.random.key(seed), state.count, n, k)
        b_k = _take(batch, idx)
        first = jax.tree.map(lambda v: v[:, 0], b_k)
        k_sel, k_train = jax.random.split(key)
        sel_keys = jax.random.split(k_sel, k)
        losses = jax.vmap(  # [G, k]
            lambda m: jax.vmap(loss_only, in_axes=(None, 0, 0))(m, first, sel_keys)
        )(state.models)
        g = jnp.argmin(losses, axis=0).astype(jnp.int32)  # [k]
        x0 = jax.tree.map(lambda m: m[g], state.models)
        y, s, loss, aux = local_train(
            vg, optimizer, x0, _take(state.opt_state, idx), b_k, k_train
        )
        w = state.weights if idx is None else state.weights[idx]
        onehot = jax.nn.one_hot(g, G, dtype=jnp.float32) * w[:, None]  # [k, G]
        den = jnp.sum(onehot, axis=0)  # [G]
        coef = onehot.T / jnp.where(den > 0, den, 1.0)[:, None]  # [G, k]

        def agg(old, new):
            avg = jnp.matmul(
                coef.astype(new.dtype),
                new.reshape(k, -1),
                precision=jax.lax.Precision.HIGHEST,
            ).reshape(old.shape)
            keep = (den > 0).reshape((G,) + (1,) * (old.ndim - 1))
            return jnp.where(keep, avg, old)

        models = jax.tree.map(agg, state.models, y)
        cluster = state.cluster if idx is None else state.cluster.at[idx].set(g)
        if idx is None:
            cluster = g
        params = jax.tree.map(lambda m: m[cluster], models)
        d = jtree.num_params(state.params)
        frac = k / n
        info = FederatedInfo(
            loss=jnp.mean(loss),
            participation=mask.astype(jnp.float32),
            floats_sent=jnp.asarray(frac * d, jnp.float32),
            floats_received=jnp.asarray(frac * G * d, jnp.float32),
            finite=_finite(loss, idx, n, params),
            num_clusters=jnp.sum(jnp.bincount(cluster, length=G) > 0).astype(jnp.int32),
            aux=aux,
        )
        new = IFCAState(
            params,
            _put(state.opt_state, idx, s),
            models,
            cluster,
            state.weights,
            state.count + 1,
        )
        return new, info

    return Algorithm(init, step)
