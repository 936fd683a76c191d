r"""FedTSDP-style federated two-stage decoupling with adaptive personalization layers.

Zhu, Fan & Xie, "Federated Two Stage Decoupling With Adaptive Personalization Layers"
(arXiv:2308.15821). No public code is known: the requirements R1-R6 of the jaxdec
sheet (``shared/specs/fedtsdp.md``) are the paper's; every other rule below is
reconstructed from the method family and is an option with the sheet's default.
Results should call this implementation "FedTSDP-style".

Clients are the worker axis (``C`` clients, leaves ``[C, ...]``); the model is an
ordered list of ``L`` layer blocks (parameter path prefixes, bottom to top), of which
the top ``p_k <= L_top`` are personal to client ``k``: the shared mask is
``s[k, l] = (l < L - p_k)``. A round (``step``, jittable; batch leaves
``[C, E, b, ...]``, see :func:`jaxdec.algorithms.federated.round_sampler`):

1. participants ``S``: ``k`` of ``C`` (``round_mask(key(seed), r, C, k)``);
2. local phase: ``E`` optax steps on all blocks (base and personal) per participant;
3. aggregation, per block ``l`` a block-diagonal averaging matrix on the client axis,

   .. math::
       A_l[k, j] = \frac{m_j n_j [g_j = g_k] s[j, l]}
                        {\sum_i m_i n_i [g_i = g_k] s[i, l]}
       \quad\text{if } s[k, l], \qquad A_l[k, k] = 1 \text{ otherwise},

   ``x^{(l)} <- A_l x^{(l)}`` (``m``: participation, ``n_j``: data sizes,
   ``g``: cluster labels). With one cluster and ``p = 0`` this is FedAvg. Personal
   blocks are never mixed (R4). A client that skipped the round still receives its
   cluster's new base blocks (``sync_nonparticipants=True``: it would download them
   when it next takes part; ``False``: non-participants stay bit-for-bit unchanged).

Clustering events (host side, between the halves ``local_phase`` / ``aggregate`` of a
check round; :func:`run_fedtsdp` drives them, the jittable ``probe`` computes every
array they need):

5. Hopkins timing (R3a): a public batch of ``N_s`` samples drawn without replacement
   with probabilities ``w``; client outputs ``P_k(x_j)``; points ``z_k = mean_j
   P_k(x_j)`` (or outputs on ``public_x[:32]`` flattened, ``hopkins_points=
   "concat"``) of the round's ``k`` participants; ``H_t`` = mean of ``R`` Hopkins
   draws, ``q = max(2, floor(k/4))``, exponent ``e``. Trigger after ``patience``
   consecutive checks with ``H_t > h_star`` (``timing="hopkins"``), at round
   ``cluster_round`` (``"fixed_round"``, ``H_t`` still logged), or never
   (``"never"``). Clustering needs a fresh model from every client: with partial
   participation the clustering round (the round after a Hopkins trigger, the
   fixed round, re-clustering rounds) invites all ``C`` clients.
6. Amended sampling weights (R3b): ``d_j = mean_k JS(P_k(x_j) || P_bar(x_j))``; for
   sampled ``j``: ``w_j <- (1 - beta) w_j + beta (1 + d_j / ln 2) / N_pub``, then
   ``w <- w / sum(w)``.
7. Adaptive personalization layers (R5): ``s_k = JS(h_k / n_k || uniform) / ln 2``
   from the client's label counts (``layer_rule="label"``) or
   ``s_k = JS(z_k || mean_i z_i) / ln 2`` from outputs (``"output"``, server side,
   updated for the participants of every check);
   ``p_k = min(L_top, floor(s_k (L_top + 1)))``; an int ``layer_rule`` fixes ``p_k``
   for all clients.
8. Stage 1 (R1, R2): ``D(a, b) = sqrt(mean_j JS(P_a(x_j) || P_b(x_j)))``;
   average-linkage clustering; the number of coarse clusters maximizes the
   silhouette over ``{2..ceil(C/2)}`` (or ``n_clusters`` / ``coarse_threshold``).
9. Stage 2 (R2): inside each coarse cluster with ``>= stage2_min_size``
   participants, cosine distances ``1 - cos(delta_a, delta_b)`` of this round's
   updates of the blocks every member shares; average linkage into 2 groups, kept if
   the silhouette is ``>= stage2_min_silhouette``. ``cluster`` = the fine labels.
   Re-clustering (``recluster_every``) intersects the new partition with the old
   one, so clusters never merge.

Example:
  >>> algo = fedtsdp(loss_fn, optax.sgd(0.05), predict_fn, x_pub,
  ...                blocks=["body/Dense_0", "body/Dense_1", "head"], l_top=2)
  >>> state = algo.init(params, label_hist)            # label_hist [C, K] counts
  >>> state, hist, events = run_fedtsdp(algo, state, round_sample, key, 100,
  ...                                   eval_every=10, eval_fn=ev)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec import clustering, participation
from jaxdec import tree as jtree
from jaxdec.algorithms import _common
from jaxdec.algorithms import federated as fed
from jaxdec.loop import History, jit_with, scan_steps, step_keys, summarize_info
from jaxdec.types import LossFn, PyTree, Sampler

__all__ = [
    "FedTSDPState",
    "FedTSDPInfo",
    "FedTSDPLocal",
    "FedTSDPProbe",
    "FedTSDPAlgorithm",
    "fedtsdp",
    "personal_layers",
    "amend_weights",
    "block_index",
    "run_fedtsdp",
]

_PROBE_TAG = 0x7D5B


class FedTSDPState(NamedTuple):
    """State of :func:`fedtsdp`.

    Attributes:
      params: client models, leaves ``[C, ...]``.
      opt_state: per-client optax states ``[C, ...]`` (never aggregated).
      cluster: int32 ``[C]`` cluster labels ``g_k`` (server state).
      n_personal: int32 ``[C]`` personal top blocks ``p_k``.
      pub_weights: float32 ``[N_pub]`` public sampling weights ``w`` (sum 1).
      hopkins_streak: int32, consecutive checks with ``H_t > h_star``.
      clustered: bool, whether the clustering event has happened.
      clustered_at: int32, round of the (first) clustering event (-1 before).
      cluster_next: bool, the Hopkins trigger fired on a sampled round: the next
        round is a full clustering round.
      hopkins: float32, the last ``H_t`` (NaN before the first check).
      weights: float32 ``[C]`` data sizes ``n_k``.
      count: int32 round counter.
    """

    params: PyTree
    opt_state: PyTree
    cluster: jax.Array
    n_personal: jax.Array
    pub_weights: jax.Array
    hopkins_streak: jax.Array
    clustered: jax.Array
    clustered_at: jax.Array
    cluster_next: jax.Array
    hopkins: jax.Array
    weights: jax.Array
    count: jax.Array


class FedTSDPInfo(NamedTuple):
    """Per-round diagnostics of :func:`fedtsdp` (returned, not carried).

    Attributes:
      loss: mean local minibatch loss over participants and local steps.
      participation: float32 ``[C]`` participation mask.
      floats_sent: mean floats a client uploaded (its shared blocks if it took part).
      floats_received: mean floats a client downloaded (its cluster's shared blocks).
      finite: ``[C]`` flag, loss and parameters finite.
      num_clusters: number of clusters.
      hopkins: the last Hopkins value ``H_t``.
      aux: participants' ``loss_fn`` aux (``has_aux=True``), else None.
    """

    loss: jax.Array
    participation: jax.Array
    floats_sent: jax.Array
    floats_received: jax.Array
    finite: jax.Array
    num_clusters: jax.Array
    hopkins: jax.Array
    aux: Any = None


class FedTSDPLocal(NamedTuple):
    """What :func:`fedtsdp`'s ``local_phase`` hands to ``aggregate`` besides the state.

    Attributes:
      loss: ``[k]`` participants' mean local loss.
      aux: participants' aux or None.
    """

    loss: jax.Array
    aux: Any = None


class FedTSDPProbe(NamedTuple):
    """Arrays of one check round (jittable ``probe``; the host ``decide`` uses them).

    Attributes:
      hopkins: ``H_t``.
      points: ``[C, d]`` the Hopkins points (``z_k`` or concatenated outputs).
      z: ``[C, K]`` mean outputs ``z_k`` on the public batch.
      js_dist: ``[C, C]`` stage-1 distances ``D``.
      gram: ``[L, C, C]`` per-block Gram matrices of this round's updates.
      pub_weights: ``[N_pub]`` amended sampling weights.
      sample_idx: ``[N_s]`` the public batch drawn.
      disagreement: ``[N_s]`` ``d_j``.
      skew_out: ``[C]`` output skew ``JS(z_k || z_bar) / ln 2``.
      participation: ``[C]`` bool, this round's participants.
    """

    hopkins: jax.Array
    points: jax.Array
    z: jax.Array
    js_dist: jax.Array
    gram: jax.Array
    pub_weights: jax.Array
    sample_idx: jax.Array
    disagreement: jax.Array
    skew_out: jax.Array
    participation: jax.Array


class FedTSDPAlgorithm(NamedTuple):
    """FedTSDP's functions; ``(init, step)`` make it usable with ``jd.run``.

    Attributes:
      init: ``init(params, label_hist) -> FedTSDPState``.
      step: ``step(state, batch, key) -> (state, FedTSDPInfo)`` (one round, no
        clustering event; ``aggregate(*local_phase(state, batch, key))``).
      local_phase: ``(state, batch, key) -> (state_mid, FedTSDPLocal)`` (steps 1-2).
      aggregate: ``(state_mid, local) -> (state, FedTSDPInfo)`` (step 3; count + 1).
      probe: ``(params_before, state_mid, key) -> FedTSDPProbe`` (jittable, steps 5-6
        and the distances of 8-9).
      decide: host ``(state_mid, probe) -> (state_mid, record)`` (trigger, layer rule
        "output", stages 1-2; ``record`` is a JSON-ready dict).
      needs_event: host ``(state) -> bool``: is round ``state.count`` a check round.
      full_round: host ``(state) -> bool``: is that check round a clustering round
        that invites every client (pass ``full=True`` to the three halves).
    """

    init: Callable
    step: Callable
    local_phase: Callable
    aggregate: Callable
    probe: Callable
    decide: Callable
    needs_event: Callable
    full_round: Callable


# ------------------------------------------------------------------------ helpers


def personal_layers(skew: jax.typing.ArrayLike, l_top: int) -> jax.Array:
    r"""Layer rule ``p_k = min(L_top, floor(s_k (L_top + 1)))`` (int32, jittable).

    Non-decreasing in ``s_k``; ``s_k = 0`` (IID) gives 0.
    """
    s = jnp.asarray(skew, jnp.float32)
    p = jnp.floor(s * (l_top + 1)).astype(jnp.int32)
    return jnp.clip(p, 0, l_top)


def amend_weights(w: jax.Array, idx: jax.Array, d: jax.Array, beta: float) -> jax.Array:
    r"""Amended public sampling weights (rule 6; jittable, dtype of ``w`` kept).

    .. math::
        w_j \leftarrow (1 - \beta) w_j + \beta \frac{1 + d_j / \ln 2}{N_{pub}}
        \ (j \in \text{idx}), \qquad w \leftarrow w / \textstyle\sum_j w_j.

    Args:
      w: ``[N_pub]`` current weights (positive, sum 1).
      idx: ``[N_s]`` indices of the sampled public batch (distinct).
      d: ``[N_s]`` per-sample disagreement ``d_j`` in ``[0, ln 2]``.
      beta: step in ``[0, 1]``.

    Returns:
      ``[N_pub]`` positive weights summing to 1. With ``d = 0`` and uniform ``w``
      they stay uniform.
    """
    n_pub = w.shape[0]
    upd = (1.0 - beta) * w[idx] + beta * (
        1.0 + d.astype(w.dtype) / clustering.LN2
    ) / n_pub
    w = w.at[idx].set(upd.astype(w.dtype))
    return w / jnp.sum(w)


def _matches(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def block_index(params: PyTree, blocks: Sequence[str]) -> PyTree:
    """Block number (0 = bottom) of every leaf: the block whose path prefix it has.

    Raises:
      ValueError: a leaf in no block or in more than one.
    """

    def one(path, _):
        p = jtree.path_str(path)
        hits = [i for i, b in enumerate(blocks) if _matches(p, b)]
        if len(hits) != 1:
            raise ValueError(
                f"fedtsdp: parameter {p!r} lies in {len(hits)} of the blocks "
                f"{list(blocks)}; every leaf must lie under exactly one block path "
                "prefix (e.g. blocks=['body/Dense_0', 'body/Dense_1', 'head'])."
            )
        return hits[0]

    return jax.tree_util.tree_map_with_path(one, params)


def _check_int(v, name: str, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, np.integer))
        or v < lo
        or (hi is not None and v > hi)
    ):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"fedtsdp: {name} must be an int {rng}, got {v!r}.")
    return int(v)


def _check_float(v, name: str, lo: float, hi: float | None = None) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if not (f >= lo and (hi is None or f <= hi)):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"fedtsdp: {name} must be a number in {rng}, got {v!r}.")
    return f


# ------------------------------------------------------------------------ factory


def fedtsdp(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    predict_fn: Callable[[PyTree, jax.Array], jax.Array],
    public_x: jax.typing.ArrayLike,
    *,
    blocks: Sequence[str],
    l_top: int = 2,
    clients_per_round: int | None = None,
    seed: int = 0,
    timing: str = "hopkins",
    cluster_round: int = 2,
    check_every: int = 1,
    h_star: float = 0.66,
    patience: int = 3,
    hopkins_repeats: int = 20,
    hopkins_exponent: float = 1.0,
    hopkins_q: int | None = None,
    hopkins_points: str = "mean",
    public_batch: int = 256,
    beta: float = 0.5,
    layer_rule: str | int = "label",
    stage2_metric: str | None = "cosine",
    stage2_min_size: int = 4,
    stage2_min_silhouette: float = 0.1,
    n_clusters: int | None = None,
    coarse_threshold: float | None = None,
    recluster_every: int | None = None,
    sync_nonparticipants: bool = True,
    has_aux: bool = False,
) -> FedTSDPAlgorithm:
    r"""Build FedTSDP-style training (see the module docstring for the rules).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE client.
      optimizer: client optax optimizer (state per client, never aggregated).
      predict_fn: ``predict_fn(params_k, x [N, ...]) -> probabilities [N, K]``
        (softmax outputs) for ONE client.
      public_x: public unlabeled inputs ``[N_pub, ...]`` (server side).
      blocks: ordered layer-block path prefixes, bottom to top (every parameter in
        exactly one).
      l_top: ``L_top``, most personal top blocks (``0 <= L_top <= L``).
      clients_per_round: ``k`` of ``C`` per round (``None``: all).
      seed: participation seed.
      timing: ``"hopkins"`` (default), ``"fixed_round"`` or ``"never"``.
      cluster_round: the clustering round of ``timing="fixed_round"``.
      check_every: rounds between Hopkins checks before clustering.
      h_star: Hopkins trigger threshold ``h*``.
      patience: consecutive checks above ``h*`` needed.
      hopkins_repeats: ``R`` draws averaged per check.
      hopkins_exponent: ``e``.
      hopkins_q: points sampled per draw (default ``max(2, floor(k/4))`` with ``k``
        the round's participants).
      hopkins_points: ``"mean"`` (``z_k``) or ``"concat"`` (outputs on
        ``public_x[:32]``, flattened).
      public_batch: ``N_s`` public samples per check (``<= N_pub``).
      beta: sampling-weight step ``beta`` in ``[0, 1]``.
      layer_rule: ``"label"`` (client label counts), ``"output"`` (server side, from
        ``z_k``) or an int ``p`` in ``[0, L_top]`` for all clients.
      stage2_metric: ``"cosine"`` (default) or ``None`` (no stage 2).
      stage2_min_size: smallest coarse cluster stage 2 tries to split.
      stage2_min_silhouette: acceptance threshold of a stage-2 split.
      n_clusters: fixed number of coarse clusters (else silhouette search).
      coarse_threshold: stage-1 distance threshold (instead of the search).
      recluster_every: re-cluster every this many rounds after the first event
        (``None``: one-shot).
      sync_nonparticipants: non-participants receive their cluster's new shared
        blocks (default) or stay unchanged.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A :class:`FedTSDPAlgorithm`.
    """
    fed._check_args(loss_fn, optimizer, "fedtsdp", has_aux)
    if not callable(predict_fn):
        raise ValueError("fedtsdp: predict_fn must be callable predict_fn(params, x).")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, str) and b for b in blocks):
        raise ValueError(
            "fedtsdp: blocks must be a non-empty list of parameter path prefixes, "
            "bottom to top, e.g. ['body/Dense_0', 'body/Dense_1', 'head']."
        )
    L = len(blocks)
    l_top = _check_int(l_top, "l_top", 0, L)
    fed._check_k(clients_per_round, "fedtsdp")
    seed = fed._check_seed(seed, "fedtsdp")
    if timing not in ("hopkins", "fixed_round", "never"):
        raise ValueError(
            f"fedtsdp: timing must be 'hopkins', 'fixed_round' or 'never', got "
            f"{timing!r}."
        )
    cluster_round = _check_int(cluster_round, "cluster_round", 0)
    check_every = _check_int(check_every, "check_every", 1)
    h_star = _check_float(h_star, "h_star", 0.0, 1.0)
    patience = _check_int(patience, "patience", 1)
    hopkins_repeats = _check_int(hopkins_repeats, "hopkins_repeats", 1)
    hopkins_exponent = _check_float(hopkins_exponent, "hopkins_exponent", 1e-12)
    if hopkins_points not in ("mean", "concat"):
        raise ValueError(
            f"fedtsdp: hopkins_points must be 'mean' or 'concat', got "
            f"{hopkins_points!r}."
        )
    pub = jnp.asarray(public_x)
    if pub.ndim < 1 or pub.shape[0] < 2:
        raise ValueError(
            f"fedtsdp: public_x must be [N_pub, ...] with N_pub >= 2, got {pub.shape}."
        )
    n_pub = int(pub.shape[0])
    if isinstance(public_batch, (int, np.integer)) and public_batch > n_pub:
        raise ValueError(
            f"fedtsdp: public_batch={public_batch} exceeds the {n_pub} public samples "
            f"(drawn without replacement); pass public_batch <= {n_pub} or a larger "
            "public_x."
        )
    n_s = _check_int(public_batch, "public_batch", 1, n_pub)
    beta = _check_float(beta, "beta", 0.0, 1.0)
    if isinstance(layer_rule, str):
        if layer_rule not in ("label", "output"):
            raise ValueError(
                f"fedtsdp: layer_rule must be 'label', 'output' or an int in "
                f"[0, {l_top}], got {layer_rule!r}."
            )
    else:
        layer_rule = _check_int(layer_rule, "layer_rule", 0, l_top)
    if stage2_metric not in ("cosine", None):
        raise ValueError(
            f"fedtsdp: stage2_metric must be 'cosine' or None, got {stage2_metric!r}."
        )
    stage2_min_size = _check_int(stage2_min_size, "stage2_min_size", 2)
    stage2_min_silhouette = _check_float(
        stage2_min_silhouette, "stage2_min_silhouette", -1.0, 1.0
    )
    if n_clusters is not None:
        n_clusters = _check_int(n_clusters, "n_clusters", 1)
    if coarse_threshold is not None:
        coarse_threshold = _check_float(coarse_threshold, "coarse_threshold", 0.0)
    if n_clusters is not None and coarse_threshold is not None:
        raise ValueError("fedtsdp: give n_clusters or coarse_threshold, not both.")
    if recluster_every is not None:
        recluster_every = _check_int(recluster_every, "recluster_every", 1)
    if not isinstance(sync_nonparticipants, bool):
        raise ValueError("fedtsdp: sync_nonparticipants must be True or False.")
    vg = _common.worker_value_and_grad(loss_fn, has_aux)
    seed_key = lambda: jax.random.key(seed)  # noqa: E731

    def num_clients(params, full: bool = False) -> tuple[int, int]:
        C = jtree.num_workers(params)
        k = participation.check_participation(C, clients_per_round, "fedtsdp")
        return C, (C if full else k)

    # ------------------------------------------------------------------ init

    def init(params: PyTree, label_hist: jax.typing.ArrayLike) -> FedTSDPState:
        C, _ = num_clients(params)
        block_index(params, blocks)
        h = np.asarray(label_hist, np.float64)
        if h.ndim != 2 or h.shape[0] != C or h.min() < 0 or (h.sum(1) <= 0).any():
            raise ValueError(
                f"fedtsdp.init: label_hist must be [C, K] = [{C}, K] non-negative "
                f"label counts with a positive sum per client, got shape {h.shape}; "
                "use np.stack([np.bincount(y_k, minlength=K) for y_k in ...])."
            )
        if layer_rule == "label":
            p = personal_layers(clustering.skew_score(h), l_top)
        elif layer_rule == "output":
            p = jnp.zeros((C,), jnp.int32)
        else:
            p = jnp.full((C,), layer_rule, jnp.int32)
        return FedTSDPState(
            params=params,
            opt_state=jax.vmap(optimizer.init)(params),
            cluster=jnp.zeros((C,), jnp.int32),
            n_personal=p,
            pub_weights=jnp.full((n_pub,), 1.0 / n_pub, jnp.float32),
            hopkins_streak=jnp.zeros((), jnp.int32),
            clustered=jnp.zeros((), bool),
            clustered_at=jnp.full((), -1, jnp.int32),
            cluster_next=jnp.zeros((), bool),
            hopkins=jnp.full((), jnp.nan, jnp.float32),
            weights=jnp.asarray(h.sum(1), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    # ------------------------------------------------------------- the round

    def local_phase(
        state: FedTSDPState, batch, key, full: bool = False
    ) -> tuple[FedTSDPState, Any]:
        C, k = num_clients(state.params, full)
        fed.local_steps_of(batch, C, "fedtsdp")
        _, idx = fed.participants(seed_key(), state.count, C, k)
        y, s, loss, aux = fed.local_train(
            vg,
            optimizer,
            fed._take(state.params, idx),
            fed._take(state.opt_state, idx),
            fed._take(batch, idx),
            key,
        )
        mid = state._replace(
            params=fed._put(state.params, idx, y),
            opt_state=fed._put(state.opt_state, idx, s),
        )
        return mid, FedTSDPLocal(loss, aux)

    def aggregate(
        state: FedTSDPState, local: FedTSDPLocal | None = None, full: bool = False
    ) -> tuple[FedTSDPState, FedTSDPInfo]:
        C, k = num_clients(state.params, full)
        mask, idx = fed.participants(seed_key(), state.count, C, k)
        bidx = block_index(state.params, blocks)
        same = (state.cluster[:, None] == state.cluster[None, :]).astype(jnp.float32)
        mats, active, shared = {}, {}, {}
        for blk in range(L):
            s_l = blk < (L - state.n_personal)  # [C]: block blk is shared by client k
            contrib = mask & s_l
            A = clustering.labels_to_matrix(state.cluster, state.weights, contrib)
            den = jnp.matmul(same, state.weights * contrib.astype(jnp.float32))
            # rows that average: shared block, cluster has a contributor, and the
            # client took part (or non-participants are synced)
            row = s_l & (mask | sync_nonparticipants) & (den > 0)
            mats[blk], active[blk], shared[blk] = A, row, s_l

        def mix(b, x):
            x2 = x.reshape(C, -1)
            y = jnp.matmul(
                mats[b].astype(x.dtype), x2, precision=jax.lax.Precision.HIGHEST
            )
            return jnp.where(active[b][:, None], y, x2).reshape(x.shape)

        params = jax.tree.map(mix, bidx, state.params)
        sizes = np.zeros(L, np.int64)
        for b, x in zip(
            jax.tree.leaves(bidx), jax.tree.leaves(state.params), strict=True
        ):
            sizes[b] += int(np.prod(x.shape[1:], dtype=np.int64))
        per_client = sum(
            shared[b].astype(jnp.float32) * float(sizes[b]) for b in range(L)
        )
        up = jnp.mean(per_client * mask.astype(jnp.float32))
        if local is None:  # no local phase reported: loss unknown, not a failure
            loss_k, aux, loss_ok = jnp.full((k,), jnp.nan, jnp.float32), None, None
        else:
            loss_k, aux = local.loss, local.aux
            loss_ok = loss_k
        info = FedTSDPInfo(
            loss=jnp.mean(loss_k),
            participation=mask.astype(jnp.float32),
            floats_sent=up,
            floats_received=up,
            finite=fed._finite(
                jnp.zeros((k,), jnp.float32) if loss_ok is None else loss_ok,
                idx,
                C,
                params,
            ),
            num_clusters=(jnp.max(state.cluster) + 1).astype(jnp.int32),
            hopkins=state.hopkins,
            aux=aux,
        )
        return state._replace(params=params, count=state.count + 1), info

    def step(state: FedTSDPState, batch, key) -> tuple[FedTSDPState, FedTSDPInfo]:
        return aggregate(*local_phase(state, batch, key))

    # ---------------------------------------------------------------- probe

    def probe(
        params_before: PyTree, state: FedTSDPState, key, full: bool = False
    ) -> FedTSDPProbe:
        C, k = num_clients(state.params, full)
        mask, idx = fed.participants(seed_key(), state.count, C, k)
        k_pub, k_hop = jax.random.split(key)
        sample_idx = jax.random.choice(
            k_pub, n_pub, (n_s,), replace=False, p=state.pub_weights
        )
        xb = pub[sample_idx]
        P = jax.vmap(predict_fn, in_axes=(0, None))(state.params, xb)  # [C, N_s, K]
        P = P.astype(jnp.float32)
        z = jnp.mean(P, axis=1)
        if hopkins_points == "mean":
            points = z
        else:
            sub = pub[: min(32, n_pub)]
            points = jax.vmap(predict_fn, in_axes=(0, None))(state.params, sub)
            points = points.reshape(C, -1).astype(jnp.float32)
        # Hopkins on this round's participants only: a non-participant holds its
        # cluster's model, which carries no fresh information about its data
        pts = points if idx is None else points[idx]
        if k >= 2:
            q = hopkins_q if hopkins_q is not None else max(2, k // 4)
            H = clustering.hopkins_mean(
                k_hop,
                pts,
                min(int(q), k),
                repeats=hopkins_repeats,
                exponent=hopkins_exponent,
            )
        else:
            H = jnp.full((), jnp.nan, jnp.float32)
        p_bar = jtree.mean0(P)  # [N_s, K]
        d = jnp.mean(clustering.js_divergence(P, p_bar[None]), axis=0)  # [N_s]
        w_new = amend_weights(state.pub_weights, sample_idx, d, beta)
        D = clustering.js_distances(P)
        bidx = block_index(state.params, blocks)
        gram = jnp.zeros((L, C, C), jnp.float32)
        for b, x1, x0 in zip(
            jax.tree.leaves(bidx),
            jax.tree.leaves(state.params),
            jax.tree.leaves(params_before),
            strict=True,
        ):
            dx = (x1 - x0).reshape(C, -1).astype(jnp.float32)
            gram = gram.at[b].add(
                jnp.matmul(dx, dx.T, precision=jax.lax.Precision.HIGHEST)
            )
        z_bar = jtree.mean0(z)
        skew_out = clustering.js_divergence(z, z_bar[None]) / clustering.LN2
        return FedTSDPProbe(
            hopkins=H,
            points=points,
            z=z,
            js_dist=D,
            gram=gram,
            pub_weights=w_new,
            sample_idx=sample_idx,
            disagreement=d,
            skew_out=skew_out,
            participation=mask,
        )

    # --------------------------------------------------------------- events

    def needs_event(state: FedTSDPState) -> bool:
        if timing == "never":
            return False
        t = int(state.count)
        if bool(state.cluster_next):
            return True
        if not bool(state.clustered):
            if timing == "fixed_round":
                return t == cluster_round or (
                    t < cluster_round and t % check_every == 0
                )
            return t % check_every == 0
        if recluster_every is None:
            return False
        t0 = int(state.clustered_at)
        return t > t0 and (t - t0) % recluster_every == 0

    def full_round(state: FedTSDPState) -> bool:
        """Whether check round ``state.count`` is a clustering round that invites
        every client (only matters with ``clients_per_round < C``)."""
        if not needs_event(state):
            return False
        t = int(state.count)
        if bool(state.cluster_next) or bool(state.clustered):
            return True  # deferred clustering or a re-clustering round
        return timing == "fixed_round" and t >= cluster_round

    def decide(state: FedTSDPState, pr: FedTSDPProbe) -> tuple[FedTSDPState, dict]:
        t = int(state.count)
        h_t = float(pr.hopkins)
        clustered = bool(state.clustered)
        pending = bool(state.cluster_next)
        everyone = bool(np.all(np.asarray(pr.participation)))
        streak = int(state.hopkins_streak)
        streak = streak + 1 if h_t > h_star else 0
        n_personal = np.asarray(state.n_personal)
        if layer_rule == "output":  # participants' outputs are fresh
            p_out = np.asarray(personal_layers(np.asarray(pr.skew_out), l_top))
            n_personal = np.where(np.asarray(pr.participation), p_out, n_personal)
        defer = False
        if clustered or pending:
            trigger = True  # re-clustering round, or the deferred clustering round
        elif timing == "hopkins":
            fired = streak >= patience
            trigger = fired and everyone
            defer = fired and not everyone  # cluster next round, with everyone
        else:
            trigger = t >= cluster_round
        rec: dict[str, Any] = {
            "round": t,
            "hopkins": h_t,
            "streak": streak,
            "triggered": bool(trigger),
            "deferred": bool(defer),
            "recluster": clustered,
            "all_clients": everyone,
        }
        cluster = np.asarray(state.cluster)
        clustered_at = int(state.clustered_at)
        if trigger:
            gram = np.asarray(pr.gram, np.float64)

            def d_fine(members: np.ndarray) -> np.ndarray:
                top = int(np.max(n_personal[members]))
                use = list(range(max(1, L - top)))
                G = gram[use].sum(0)[np.ix_(members, members)]
                return np.asarray(clustering.cosine_from_gram(G))

            coarse, fine, details = clustering.two_stage(
                np.asarray(pr.js_dist, np.float64),
                d_fine if stage2_metric == "cosine" else None,
                n_clusters=n_clusters,
                threshold=coarse_threshold,
                min_size=stage2_min_size,
                min_silhouette=stage2_min_silhouette,
                fine_members=np.asarray(pr.participation, bool),
            )
            if clustered:  # refine: intersect with the old partition
                pairs = cluster.astype(np.int64) * (int(fine.max()) + 1) + fine
                fine = clustering.canonical_labels(pairs)
            else:
                clustered_at = t
            cluster = fine
            clustered = True
            rec.update(
                coarse=coarse.tolist(),
                fine=fine.tolist(),
                num_coarse=int(coarse.max()) + 1,
                num_clusters=int(fine.max()) + 1,
                coarse_silhouette=details["coarse_silhouette"],
                splits=[
                    {k: v for k, v in s.items() if k != "members"}
                    for s in details["splits"]
                ],
            )
        new = state._replace(
            cluster=jnp.asarray(cluster, jnp.int32),
            n_personal=jnp.asarray(n_personal, jnp.int32),
            pub_weights=jnp.asarray(pr.pub_weights, jnp.float32),
            hopkins_streak=jnp.asarray(streak, jnp.int32),
            clustered=jnp.asarray(clustered),
            clustered_at=jnp.asarray(clustered_at, jnp.int32),
            cluster_next=jnp.asarray(defer),
            hopkins=jnp.asarray(h_t, jnp.float32),
        )
        return new, rec

    return FedTSDPAlgorithm(
        init, step, local_phase, aggregate, probe, decide, needs_event, full_round
    )


# ------------------------------------------------------------------------ driver


def run_fedtsdp(
    algo: FedTSDPAlgorithm,
    state: FedTSDPState,
    sampler: Sampler,
    key: jax.Array,
    num_rounds: int,
    *,
    eval_every: int | None = None,
    eval_fn: Callable[[Any], dict[str, Any]] | None = None,
    progress: bool = True,
    desc: str | None = None,
    start_step: int = 0,
) -> tuple[FedTSDPState, History, list[dict]]:
    """Run FedTSDP: jitted chunks of rounds with host clustering events between them.

    Round ``t`` uses the keys of :func:`jaxdec.loop.step_keys` ``(key, t)`` exactly
    like :func:`jaxdec.run`, so without events the trajectory equals
    ``jd.run(algo, ...)``. On a check round (``algo.needs_event``) the round is run
    in its halves: ``local_phase`` (jitted), ``probe`` (jitted, key
    ``fold_in(k_algo, tag)``), ``decide`` (host: Hopkins trigger, SciPy clustering),
    ``aggregate`` (jitted), each with ``full=algo.full_round(state)`` (clustering
    rounds invite every client). Between check rounds, rounds run as one
    ``lax.scan`` per chunk (up to the next evaluation or check round).

    Args:
      algo: from :func:`fedtsdp`.
      state: from ``algo.init``.
      sampler: round sampler ``sampler(key, t) -> batch [C, E, b, ...]``.
      key: PRNG key of the run.
      num_rounds: rounds to run.
      eval_every: evaluation period in rounds (default: ``num_rounds``).
      eval_fn: jittable ``eval_fn(state) -> {name: scalar}``.
      progress: show a tqdm bar.
      desc: bar label.
      start_step: first round index.

    Returns:
      ``(state, history, events)``: a :class:`jaxdec.loop.History` (per-round train
      summaries, evaluations) and one JSON-ready record per check round.
    """
    num_rounds = _check_int(num_rounds, "num_rounds", 1)
    eval_every = (
        num_rounds if eval_every is None else _check_int(eval_every, "eval_every", 1)
    )
    sample = jit_with(lambda k, t, smp: smp(k, t), sampler)
    local_j = jax.jit(algo.local_phase, static_argnames="full")
    agg_j = jax.jit(algo.aggregate, static_argnames="full")
    probe_j = jax.jit(algo.probe, static_argnames="full")
    ev = None if eval_fn is None else jit_with(lambda s, fn: fn(s), eval_fn)
    chunks: dict[int, Callable] = {}

    def chunk(length: int) -> Callable:  # rounds between events: one lax.scan
        if length not in chunks:
            scan = scan_steps(algo, summarize_info, length)
            chunks[length] = jit_with(scan, sampler)
        return chunks[length]

    hist = History()
    parts: list[dict[str, np.ndarray]] = []
    eval_steps, eval_rows, events = [], [], []

    def do_eval(s, t):
        if ev is not None:
            eval_steps.append(t)
            eval_rows.append({k: float(v) for k, v in ev(s).items()})

    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_rounds, desc=desc, disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    t = int(start_step)
    end = t + num_rounds
    do_eval(state, t)
    next_eval = t + eval_every
    while t < end:
        tic = time.perf_counter()
        if algo.needs_event(state):
            k_data, k_algo = step_keys(key, jnp.int32(t))
            full = algo.full_round(state)
            before = state.params
            batch = sample(k_data, jnp.int32(t))
            mid, local = local_j(state, batch, k_algo, full=full)
            pr = probe_j(before, mid, jax.random.fold_in(k_algo, _PROBE_TAG), full=full)
            mid, rec = algo.decide(mid, jax.device_get(pr))
            state, info = agg_j(mid, local, full=full)
            events.append(rec)
            summ = jax.device_get(summarize_info(info))
            parts.append({k: np.asarray(v)[None] for k, v in summ.items()})
            length = 1
        else:
            stop = min(end, next_eval)
            view = _event_view(state)  # one host read of the clustering flags
            probe_t = t + 1
            while probe_t < stop and not _would_event(algo, view, probe_t):
                probe_t += 1
            length = probe_t - t
            state, summ, _ = chunk(length)(state, key, jnp.int32(t))
            parts.append({k: np.asarray(v) for k, v in jax.device_get(summ).items()})
        hist.wall_time.append(time.perf_counter() - tic)
        t += length
        if bar is not None:
            bar.update(length)
        if t >= next_eval or t == end:
            do_eval(state, t)
            next_eval = t + eval_every
    if bar is not None:
        bar.close()
    if parts:
        hist.train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    hist.eval_steps = np.asarray(eval_steps, np.int64)
    if eval_rows:
        hist.eval = {k: np.asarray([r[k] for r in eval_rows]) for k in eval_rows[0]}
    return state, hist, events


_EVENT_FIELDS = ("count", "cluster_next", "clustered", "clustered_at")


def _event_view(state: FedTSDPState) -> FedTSDPState:
    """``state`` with the fields ``needs_event`` reads copied to the host once."""
    vals = jax.device_get(tuple(getattr(state, f) for f in _EVENT_FIELDS))
    return state._replace(**dict(zip(_EVENT_FIELDS, vals, strict=True)))


def _would_event(algo: FedTSDPAlgorithm, view: FedTSDPState, t: int) -> bool:
    """Whether round ``t`` would be a check round, the clustering state unchanged
    (``view`` from :func:`_event_view`: no device access)."""
    return bool(algo.needs_event(view._replace(count=np.int32(t))))
