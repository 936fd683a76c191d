r"""FeDLRT: federated dynamical low-rank training (Schotthoefer & Laiu, 2024).

Chosen dense kernels are kept factorized, ``W = U S V^T``, with orthonormal bases
``U [n, r]``, ``V [m, r]`` held by the server (global, identical on all clients);
clients train only the coefficients. One ``step`` is one round; with participants
``P_t`` and weights ``p_c`` (see :mod:`jaxdec.algorithms.fedlin`), for every
factorized layer at once:

1. server -> clients: ``U, S, V``.
2. clients, on their gradient batch: ``G_c = grad_W L_c(U S V^T)``,
   ``G_{U,c} = G_c V S^T``, ``G_{V,c} = G_c^T U S``, ``G_{S,c} = U^T G_c V`` (the
   autodiff gradients of the factors). Upload ``G_{U,c}, G_{V,c}``.
3. server: ``G_U = sum_c p_c G_{U,c}``, ``G_V``, ``G_S`` likewise.
4. augmentation: ``U~ = [U | orth((I - U U^T) G_U)]``, ``V~`` likewise, with
   ``a = min(r, n - r, m - r)`` new columns (:func:`jaxdec.lowrank.augment`).
5. server -> clients: the new columns.
6. ``S~ = [[S, 0], [0, 0]]``, so ``U~ S~ V~^T = U S V^T``.
7. variance correction ``V_c`` (``correction=``):
   ``"full"``: ``G~_c = U~^T G_c V~`` (uploaded), ``V_c = sum_d p_d G~_d - G~_c``;
   ``"simplified"``: ``V_c = [[G_S - G_{S,c}, 0], [0, 0]]``; ``"none"``: ``V_c = 0``.
8. local loop (``U~, V~`` frozen, optax state reset): ``S~_c <- S~``, for
   ``s < s*``: ``d = grad_{S~} L_c(U~ S~_c V~^T; B_{c,s}) + V_c``,
   ``(u, o_c) = opt.update(d, o_c, S~_c)``, ``S~_c <- S~_c + u``. Non-factorized
   leaves take their optax steps on the same batches.
9. server: ``S* = sum_c p_c S~_c`` (exact model averaging: the basis is shared);
   non-factorized leaves are averaged like FedAvg.
10. truncation: SVD ``S* = P Sigma Q^T``, ``r_1`` the smallest ``j`` with
    ``||(sigma_{j+1}, ...)||_2 < theta`` (``theta = theta_rel ||sigma||_2`` with
    ``theta_mode="relative"``), clamped to ``[r_min, r_max]``;
    ``U <- U~ P[:, :r_1]``, ``V <- V~ Q[:, :r_1]``, ``S <- diag(sigma_{1..r_1})``.

Static shapes: each factorized layer has capacity ``K = 2 r_max``; the active basis
is the prefix of ``r`` columns (new directions are written at ``r .. r + a - 1``),
and everything outside the active set is zero and masked, so ranks change inside one
compiled program. Communication per participating client and layer (``r`` the rank
at the round start, ``q = r + a``): down ``(n + m) r + r^2 + (n + m) a``
(+ ``q^2`` full); up ``(n + m) r + q^2`` (+ ``r^2`` simplified, + ``q^2`` full);
non-factorized leaves ``d_0`` each way (twice with ``non_factorized="corrected"``).

The model is evaluated through ``loss_fn(params, batch, key)`` on the *factorized
layout*: each factorized kernel is a dict ``{"U", "S", "V"}`` (use
``jaxdec.lowrank.LowRank(model)`` for flax models, or
``jaxdec.lowrank.densified(loss)`` for small problems).

Example:
  >>> model = jd.models.MLP(hidden=(256, 256))
  >>> loss = jd.models.classification_loss(jaxdec.lowrank.LowRank(model))
  >>> algo = fedlrt(loss, optax.sgd(0.05), factorize=r"body/Dense_\d+/kernel",
  ...               local_steps=10)
  >>> state = algo.init(model.init(key, x[:1])["params"])
  >>> sampler = round_sampler(data, 64, 10, grad_batch_size=512)
  >>> state, info = algo.step(state, sampler(key, 0), key)   # info.rank per layer
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdec import lowrank as lr
from jaxdec import tree as jtree
from jaxdec.algorithms.fedlin import (
    check_round_args,
    check_round_batch,
    client_mean,
    finite_flags,
    local_loop,
    select_clients,
    take_clients,
)
from jaxdec.types import Algorithm, LossFn, PyTree

__all__ = ["FeDLRTState", "FeDLRTInfo", "fedlrt", "CORRECTIONS"]

CORRECTIONS = ("full", "simplified", "none")
NON_FACTORIZED = ("train", "corrected", "frozen")


class FeDLRTState(NamedTuple):
    """State of :func:`fedlrt` (server state only; clients keep nothing).

    Attributes:
      params: the global model in the factorized layout: factor dicts
        ``{"U": [n, K], "S": [K, K], "V": [m, K]}`` (prefix layout, ``K = 2 r_max``)
        at the factorized kernels, other leaves as given (no worker axis).
      rank: ``{path: int32}`` active rank of every factorized kernel.
      count: int32 round counter ``t``.
    """

    params: PyTree
    rank: dict[str, jax.Array]
    count: jax.Array


class FeDLRTInfo(NamedTuple):
    """Per-round diagnostics of :func:`fedlrt` (returned, not carried).

    Attributes:
      loss: ``[k]`` participants' loss on their first local batch at the round-start
        model.
      global_loss: ``sum_c p_c loss_c`` (with full local batches: ``L(W^t)``).
      grad_loss: ``sum_c p_c L_c`` on the gradient batches at the round start.
      rank: ``{path: int32}`` rank after truncation.
      aug_rank: ``{path: int32}`` augmented rank ``q = r + a``.
      trunc_error: ``{path: ||U~ S* V~^T - U S V^T||_F}`` (the discarded tail).
      floats_up: floats one participating client uploads this round.
      floats_down: floats one participating client downloads this round.
      clients: int32 ``[k]`` participant ids.
      finite: ``[C]`` loss and new model finite (True for non-participants).
    """

    loss: jax.Array
    global_loss: jax.Array
    grad_loss: jax.Array
    rank: dict[str, jax.Array]
    aug_rank: dict[str, jax.Array]
    trunc_error: dict[str, jax.Array]
    floats_up: jax.Array
    floats_down: jax.Array
    clients: jax.Array
    finite: jax.Array


def _int(v, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or int(v) != v or int(v) < lo:
        raise ValueError(f"fedlrt: {name} must be an integer >= {lo}, got {v!r}.")
    return int(v)


def _selector(factorize, params) -> Callable[[int, str], bool]:
    """Position/path predicate from a regex, a callable or a mask pytree."""
    if isinstance(factorize, str) or callable(factorize):
        pred = lr._predicate(factorize)
        return lambda i, p: pred(p, None)
    flat = jax.tree_util.tree_leaves(params, is_leaf=lr.is_factors)
    mask = jax.tree.leaves(factorize)
    jtree.validate_mask(factorize, params, name="factorize")
    if len(mask) != len(flat):
        raise ValueError(
            "fedlrt: factorize mask must have one bool per parameter leaf; pass a "
            "path regex instead when params already hold factor dicts."
        )
    return lambda i, p: bool(mask[i])


def _compact(f: Mapping[str, jax.Array], w: int) -> dict[str, jax.Array]:
    """The first ``w`` columns of a prefix-layout factor dict (static ``w``)."""
    return {"U": f["U"][:, :w], "S": f["S"][:w, :w], "V": f["V"][:, :w]}


def _pad2(x: jax.Array, K: int) -> jax.Array:
    """Zero-pad the last two axes to ``K``."""
    w = x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, K - w), (0, K - w)])


def _expand(g: Mapping[str, jax.Array], K: int) -> dict[str, jax.Array]:
    """Zero-pad a compact factor dict (leading client axis) back to capacity ``K``."""
    w = g["S"].shape[-1]
    pad_c = [(0, 0), (0, 0), (0, K - w)]
    return {
        "U": jnp.pad(g["U"], pad_c),
        "S": _pad2(g["S"], K),
        "V": jnp.pad(g["V"], pad_c),
    }


def fedlrt(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    factorize: str | Callable[[str], bool] | PyTree,
    local_steps: int = 10,
    r0: int = 16,
    r_min: int = 2,
    r_max: int | Mapping[str, int] | None = None,
    theta: float = 0.02,
    theta_mode: str = "relative",
    correction: str = "full",
    init: str = "svd",
    non_factorized: str = "train",
    clients_per_round: int | None = None,
    weights: jax.typing.ArrayLike | None = None,
    compute_buckets: int = 1,
) -> Algorithm:
    """Build FeDLRT (see the module docstring for the round).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` for ONE client, on the
        factorized layout (factor dicts at the chosen kernels).
      optimizer: client optax transformation for the coefficients and the
        non-factorized leaves (state reset every round; the basis changes).
      factorize: which 2-D kernels to factorize: a regex searched in the parameter
        path (``r"body/Dense_\\d+/kernel"``), a callable ``path -> bool``, or a
        boolean mask pytree matching ``params``.
      local_steps: ``s*`` local coefficient steps per round.
      r0: initial rank.
      r_min: smallest rank after truncation.
      r_max: largest rank (int for all layers, ``{path: int}``, or ``None``:
        ``min(n, m) // 2`` per layer); the capacity is ``K = 2 r_max``.
      theta: truncation tolerance (relative to ``||S*||_F`` or absolute).
      theta_mode: ``"relative"`` or ``"absolute"``.
      correction: ``"full"``, ``"simplified"`` or ``"none"``.
      init: ``"svd"`` (truncated SVD of the given kernels) or ``"random"``
        (random orthonormal bases, Galerkin coefficients; needs ``key`` in init).
      non_factorized: ``"train"`` (local optax steps, FedAvg averaging, no
        correction), ``"corrected"`` (also the FedLin correction
        ``mean_d g_d - g_c`` from the gradient batch) or ``"frozen"``.
      clients_per_round: ``k`` participants per round (``None``: all ``C``).
      weights: client weights ``[C]`` (``None``: equal).
      compute_buckets: ``B >= 1``. The client computations (gradient pass,
        correction pass, local loop) run on the first ``w_j = ceil(K / 2^(B-1-j))``
        columns of every factor, ``j`` the narrowest bucket holding all active
        columns, chosen per round with ``lax.switch`` (all ``B`` variants are
        compiled once): the same result as ``B = 1`` (up to rounding), with client
        compute that follows the rank instead of the capacity.

    Returns:
      ``Algorithm(init, step)``: ``init(params, key=None) -> FeDLRTState`` for one
      model's dense params (no worker axis); ``step(state, (grad_batch,
      local_batches), key) -> (FeDLRTState, FeDLRTInfo)``.

    Raises:
      ValueError: unknown mode names, bad ranks or tolerances (before compiling).
    """
    w = check_round_args(
        "fedlrt", loss_fn, optimizer, local_steps, clients_per_round, weights
    )
    for name, v, ok in (
        ("correction", correction, CORRECTIONS),
        ("theta_mode", theta_mode, ("relative", "absolute")),
        ("init", init, ("svd", "random")),
        ("non_factorized", non_factorized, NON_FACTORIZED),
    ):
        if v not in ok:
            raise ValueError(f"fedlrt: {name} must be one of {ok}, got {v!r}.")
    theta = float(theta)
    if not theta >= 0.0 or theta == float("inf"):
        raise ValueError(f"fedlrt: theta must be a finite number >= 0, got {theta}.")
    r0 = _int(r0, "r0")
    r_min = _int(r_min, "r_min")
    if r_min > r0:
        raise ValueError(f"fedlrt: need r_min <= r0, got r_min={r_min}, r0={r0}.")
    buckets = _int(compute_buckets, "compute_buckets")
    relative = theta_mode == "relative"
    corr_rest = non_factorized == "corrected"
    train_rest = non_factorized != "frozen"

    def layer_rmax(path: str, n: int, m: int) -> int:
        if r_max is None:
            v = min(n, m) // 2
        elif isinstance(r_max, Mapping):
            if path not in r_max:
                raise ValueError(
                    f"fedlrt: r_max has no entry for {path}; give every factorized "
                    f"path ({sorted(r_max)} given)."
                )
            v = _int(r_max[path], f"r_max[{path}]")
        else:
            v = _int(r_max, "r_max")
        if v > min(n, m):
            raise ValueError(
                f"fedlrt: r_max={v} exceeds min(n, m)={min(n, m)} for {path} "
                f"({n} x {m}); lower r_max."
            )
        if not r_min <= r0 <= v:
            raise ValueError(
                f"fedlrt: need r_min <= r0 <= r_max for {path}, got r_min={r_min}, "
                f"r0={r0}, r_max={v} ({n} x {m} kernel); lower r0 or raise r_max."
            )
        return v

    def init_fn(params: PyTree, key: jax.Array | None = None) -> FeDLRTState:
        if init == "random" and key is None:
            raise ValueError("fedlrt: init='random' needs init(params, key).")
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lr.is_factors
        )
        sel = _selector(factorize, params)
        leaves, ranks = [], {}
        for i, (path, x) in enumerate(flat):
            p = jtree.path_str(path)
            if not sel(i, p):
                if lr.is_factors(x):
                    raise ValueError(
                        f"fedlrt: {p} is a factor dict that factorize does not "
                        "select; select it (it is then re-factorized) or densify it "
                        "with jaxdec.lowrank.densify."
                    )
                leaves.append(jnp.asarray(x))
                continue
            W = lr.reconstruct(x) if lr.is_factors(x) else jnp.asarray(x)
            if W.ndim != 2:
                raise ValueError(
                    f"fedlrt: {p} has shape {W.shape}; only 2-D kernels can be "
                    "factorized (pass one model's params, without a worker axis)."
                )
            n, m = W.shape
            K = 2 * layer_rmax(p, n, m)
            if init == "svd":
                f = lr.truncated_svd(W, r0, K)
            else:
                f = lr.random_factors(jax.random.fold_in(key, i), W, r0, K)
            leaves.append(f)
            ranks[p] = jnp.asarray(r0, jnp.int32)
        if not ranks:
            raise ValueError(
                "fedlrt: factorize selected no parameter; paths look like "
                f"{[jtree.path_str(q) for q, _ in flat][:4]}."
            )
        return FeDLRTState(treedef.unflatten(leaves), ranks, jnp.zeros((), jnp.int32))

    def step(state: FeDLRTState, batch, key) -> tuple[FeDLRTState, FeDLRTInfo]:
        gb, lb, C = check_round_batch("fedlrt", batch, local_steps, True)
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            state.params, is_leaf=lr.is_factors
        )
        paths = [jtree.path_str(p) for p, _ in flat]
        leaves = [x for _, x in flat]
        fpos = [i for i, x in enumerate(leaves) if lr.is_factors(x)]
        rest = [i for i in range(len(leaves)) if i not in fpos]
        if set(state.rank) != {paths[i] for i in fpos}:
            raise ValueError(
                "fedlrt: state.rank does not match the factorized kernels; build "
                "the state with algo.init."
            )
        rank = {i: state.rank[paths[i]] for i in fpos}
        dtype = leaves[fpos[0]]["S"].dtype
        t = state.count
        k_part, k_grad, k_local = jax.random.split(key, 3)
        idx, _, p = select_clients(k_part, t, C, clients_per_round, w, dtype, "fedlrt")
        gb = take_clients(gb, idx)
        lb = take_clients(lb, idx)
        gkeys = take_clients(jax.random.split(k_grad, C), idx)
        lkeys = take_clients(jax.random.split(k_local, C), idx)
        mean = lambda tree: client_mean(tree, p)  # noqa: E731

        def full_loss(ls, b, kk):
            return loss_fn(treedef.unflatten(ls), b, kk)

        Ks = {i: leaves[i]["S"].shape[0] for i in fpos}
        widths = [
            {i: -(-Ks[i] // 2 ** (buckets - 1 - j)) for i in fpos}
            for j in range(buckets)
        ]

        def switched(need, phase, *args):
            """``phase(widths, *args)`` in the narrowest bucket holding ``need``."""
            if buckets == 1:
                return phase(widths[0], *args)
            j = jnp.zeros((), jnp.int32)
            for i in fpos:
                ws = jnp.asarray([wd[i] for wd in widths])
                j = jnp.maximum(j, jnp.sum(need[i] > ws).astype(jnp.int32))
            branches = [functools.partial(phase, wd) for wd in widths]
            return jax.lax.switch(j, branches, *args)

        # 2-3: factor gradients on the gradient batch (clients), server averages
        def grad_phase(wd, gb, gkeys):
            ls = [_compact(x, wd[i]) if i in wd else x for i, x in enumerate(leaves)]
            gl, g = jax.vmap(jax.value_and_grad(full_loss), in_axes=(None, 0, 0))(
                ls, gb, gkeys
            )
            return gl, [_expand(x, Ks[i]) if i in wd else x for i, x in enumerate(g)]

        gloss, grads = switched(rank, grad_phase, gb, gkeys)
        aug, q = {}, {}
        for i in fpos:
            G_U = mean(grads[i]["U"])
            G_V = mean(grads[i]["V"])
            aug[i], q[i] = lr.augment(leaves[i], G_U, G_V, rank[i])  # 4-6

        def outer(i, r):
            a = lr.active_mask(r, Ks[i])
            return a[:, None] & a[None, :]

        masks = {i: outer(i, q[i]) for i in fpos}

        # 7: variance correction (leaves [k, ...]; None entries: no correction)
        corr: list[Any] = [None] * len(leaves)
        if correction == "full":

            def corr_phase(wd, gb, gkeys):
                def s_loss(Ss, b, kk):
                    ls = list(leaves)
                    for j, i in enumerate(fpos):
                        ls[i] = dict(_compact(aug[i], wd[i]), S=Ss[j])
                    return full_loss(ls, b, kk)

                S0 = [_compact(aug[i], wd[i])["S"] for i in fpos]
                Gt = jax.vmap(jax.grad(s_loss), in_axes=(None, 0, 0))(S0, gb, gkeys)
                return [_pad2(g, Ks[i]) for g, i in zip(Gt, fpos, strict=True)]

            Gt = switched(q, corr_phase, gb, gkeys)
            for j, i in enumerate(fpos):
                g = jnp.where(masks[i][None], Gt[j], 0)
                corr[i] = mean(g)[None] - g
        elif correction == "simplified":
            for i in fpos:
                g = jnp.where(outer(i, rank[i])[None], grads[i]["S"], 0)
                corr[i] = mean(g)[None] - g
        if corr_rest:
            for i in rest:
                corr[i] = mean(grads[i])[None] - grads[i]

        # 8: local loop on the coefficients (and the non-factorized leaves)
        k_eff = jax.tree.leaves(lb)[0].shape[0]

        def local_phase(wd, lb, lkeys, corr):
            basis = {i: _compact(aug[i], wd[i]) for i in fpos}

            def local_loss(tr, b, kk):
                tl = treedef.flatten_up_to(tr)
                ls = [
                    dict(basis[i], S=x) if i in basis else x for i, x in enumerate(tl)
                ]
                return full_loss(ls, b, kk)

            x0 = [basis[i]["S"] if i in basis else x for i, x in enumerate(leaves)]
            v = None
            if any(c is not None for c in corr):
                v = treedef.unflatten(
                    [
                        jnp.zeros((k_eff, *jnp.shape(x)), x.dtype)
                        if c is None
                        else (c[:, : wd[i], : wd[i]] if i in wd else c)
                        for i, (c, x) in enumerate(zip(corr, x0, strict=True))
                    ]
                )
            mk = {i: masks[i][: wd[i], : wd[i]] for i in fpos}

            def project(tree):
                tl = treedef.flatten_up_to(tree)
                out = []
                for i, x in enumerate(tl):
                    if i in mk:
                        x = jnp.where(mk[i], x, 0)
                    elif not train_rest:
                        x = jnp.zeros_like(x)
                    out.append(x)
                return treedef.unflatten(out)

            y, loss = local_loop(
                local_loss, optimizer, treedef.unflatten(x0), lb, lkeys, v, project
            )
            yl = treedef.flatten_up_to(y)
            return [_pad2(x, Ks[i]) if i in wd else x for i, x in enumerate(yl)], loss

        yl, loss = switched(q, local_phase, lb, lkeys, corr)
        y = treedef.unflatten(yl)

        # 9-10: exact averaging and truncation
        ybar = treedef.flatten_up_to(mean(y))
        new_leaves = list(ybar)
        new_rank, errs = {}, {}
        for i in fpos:
            f, r1, err = lr.truncate(
                dict(aug[i], S=jnp.where(masks[i], ybar[i], 0)),
                q[i],
                theta,
                r_min,
                Ks[i] // 2,
                relative=relative,
            )
            new_leaves[i] = f
            new_rank[paths[i]] = r1
            errs[paths[i]] = err
        if not train_rest:
            for i in rest:
                new_leaves[i] = leaves[i]
        new_params = treedef.unflatten(new_leaves)

        # 11: accounting
        up = jnp.zeros((), jnp.float32)
        down = jnp.zeros((), jnp.float32)
        for i in fpos:
            n, m = leaves[i]["U"].shape[0], leaves[i]["V"].shape[0]
            r = rank[i].astype(jnp.float32)
            qq = q[i].astype(jnp.float32)
            a = qq - r
            down += (n + m) * r + r * r + (n + m) * a
            up += (n + m) * r + qq * qq
            if correction == "simplified":
                up += r * r
            if correction == "full":
                up += qq * qq
                down += qq * qq
        if train_rest:
            d0 = float(sum(jnp.size(leaves[i]) for i in rest))
            up += d0 * (2.0 if corr_rest else 1.0)
            down += d0 * (2.0 if corr_rest else 1.0)
        info = FeDLRTInfo(
            loss=loss,
            global_loss=jnp.dot(p.astype(loss.dtype), loss),
            grad_loss=jnp.dot(p.astype(gloss.dtype), gloss),
            rank=new_rank,
            aug_rank={paths[i]: q[i].astype(jnp.int32) for i in fpos},
            trunc_error=errs,
            floats_up=up,
            floats_down=down,
            clients=jnp.arange(C, dtype=jnp.int32) if idx is None else idx,
            finite=finite_flags(C, idx, loss, new_params),
        )
        return FeDLRTState(new_params, new_rank, t + 1), info

    return Algorithm(init_fn, step)
