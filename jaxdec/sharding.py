r"""Worker-axis sharding: the same jaxdec program on one device, many, or many hosts.

Every per-worker leaf is ``[n, ...]``; here that axis is split into ``D`` contiguous
blocks of ``b = n / D`` workers, one block per device of a 1-D
:class:`jax.sharding.Mesh` axis named ``"workers"`` (worker ``i`` lives on device
``i // b``). Algorithms are unchanged: their vmapped per-worker math partitions
trivially, and gossip becomes real device-to-device traffic.

* :func:`worker_mesh` / :func:`shard_workers` / :func:`replicate` place a state,
  a sampler's data or any worker-axis pytree on the mesh (one call; works on one
  host or under :mod:`jaxdec.launch` across hosts); :func:`gather` brings a
  (possibly multi-host) tree back to host NumPy.
* :func:`ppermute_gossip` is the sharded :func:`jaxdec.gossip.sparse`. It writes
  ``W`` as a sum of shifted diagonals,

  .. math::
      (W X)_i = \sum_{s \in S} a_s[i]\, X_{(i + s) \bmod n}, \qquad
      a_s[i] = W_{i, (i + s) \bmod n},

  and runs every shift ``s = q b + r`` (``0 <= r < b``) inside
  :func:`jax.shard_map` as at most two :func:`jax.lax.ppermute` messages per
  device: rows ``r..b-1`` of device ``d + q`` and rows ``0..r-1`` of device
  ``d + q + 1``. Circulant graphs (ring, exponential, one-peer exponential)
  have a constant ``a_s``; a torus has 7 shifts with per-worker weights; any
  ``W`` with few distinct shifts qualifies. Other sparse graphs fall back to an
  all-gather of the leaf followed by a local gather of the neighbour rows
  (``method="gather"``) and dense mixing to XLA's sharded contraction
  (``method="dense"``, output pinned to the worker sharding).
* :func:`evaluator` / :func:`map_workers`: per-worker evaluation that runs on each
  device's own block (chunked with ``lax.map``), so evaluation stays sharded.
* Memory: :func:`cast_floats` stores parameters in ``bfloat16`` (half the bytes
  per worker and per message); :func:`float32_loss` computes the loss and its
  gradient in float32; every jaxdec mixer accumulates in float32.
  :func:`remat` is ``jax.checkpoint`` on the one-worker loss.

Example:
  >>> mesh = jd.sharding.worker_mesh()                     # all devices
  >>> mix = jd.sharding.ppermute_gossip(W, mesh)           # ring: halo exchange
  >>> algo = jd.algorithms.dsgd(loss_fn, optax.sgd(0.1), mix)
  >>> state = jd.sharding.shard_workers(algo.init(params), mesh)
  >>> sampler = jd.sharding.shard_workers(sampler, mesh)   # data follow workers
  >>> state, hist = jd.run(algo, state, sampler, key, 1000)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdec import gossip, metrics, topology
from jaxdec import tree as jtree
from jaxdec.types import LossFn, PyTree

__all__ = [
    "AXIS",
    "worker_mesh",
    "worker_sharding",
    "shard_workers",
    "replicate",
    "gather",
    "is_worker_sharded",
    "constrain",
    "shift_decomposition",
    "ppermute_gossip",
    "map_workers",
    "evaluator",
    "cast_floats",
    "float32_loss",
    "remat",
]

AXIS = "workers"
"""Default name of the mesh axis that carries the workers."""

_METHODS = ("auto", "shift", "gather", "dense")


# ------------------------------------------------------------------ mesh, placement


def worker_mesh(
    devices: Sequence[jax.Device] | None = None, *, axis_name: str = AXIS
) -> Mesh:
    """A 1-D mesh ``(axis_name,)`` over ``devices`` (default: all global devices).

    Under :func:`jaxdec.launch.initialize` ``jax.devices()`` spans every process,
    so the same call builds the multi-host mesh.

    Args:
      devices: devices in worker-block order; default ``jax.devices()``.
      axis_name: mesh axis name used by :func:`shard_workers` and the mixers.

    Returns:
      A :class:`jax.sharding.Mesh`.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("worker_mesh: no devices given; pass e.g. jax.devices().")
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"worker_mesh: axis_name must be a name, got {axis_name!r}.")
    return Mesh(np.array(devs, dtype=object), (axis_name,))


def _axis(mesh: Mesh, axis_name: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"expected a jax.sharding.Mesh, got {type(mesh).__name__}; build one with "
            "jd.sharding.worker_mesh()."
        )
    if axis_name is None:
        axis_name = AXIS if AXIS in mesh.axis_names else mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"mesh axes are {mesh.axis_names}, not {axis_name!r}; pass "
            f"axis_name= one of them or build the mesh with worker_mesh()."
        )
    return axis_name


def _num_shards(mesh: Mesh, axis_name: str) -> int:
    return int(mesh.shape[axis_name])


def worker_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """``NamedSharding(mesh, P(axis_name))``: leading axis split in device blocks."""
    return NamedSharding(mesh, P(_axis(mesh, axis_name)))


def _check_divisible(n: int, D: int, what: str) -> int:
    if n % D:
        raise ValueError(
            f"{what}: {n} workers cannot be split evenly over {D} devices; use a "
            f"multiple of {D} workers or a smaller mesh, e.g. "
            f"worker_mesh(jax.devices()[:k]) with k dividing {n}."
        )
    return n // D


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Put one leaf on ``sharding`` (global array; every process passes the same
    full value when the mesh spans several processes)."""
    if _is_key(x):
        impl = jax.random.key_impl(x)
        data = _place(jax.random.key_data(x), sharding)  # trailing axis unsharded
        return jax.random.wrap_key_data(data, impl=impl)
    if jax.process_count() == 1 or (
        isinstance(x, jax.Array) and not x.is_fully_addressable
    ):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _first_n(tree: PyTree) -> int:
    for leaf in jax.tree.leaves(tree):
        if np.ndim(leaf) >= 1:
            return int(np.shape(leaf)[0])
    raise ValueError(
        "shard_workers: the tree has no leaf with a worker axis [n, ...]; pass n= "
        "or use replicate() for trees without one."
    )


def shard_workers(
    tree: PyTree, mesh: Mesh, *, n: int | None = None, axis_name: str | None = None
) -> PyTree:
    """Split the worker axis of every ``[n, ...]`` leaf over the mesh, in one call.

    Leaves whose leading dimension is ``n`` get ``P(axis_name)`` (worker ``i`` on
    device ``i // (n / D)``); all other leaves (step counters, server state, PRNG
    keys) are replicated. Works on any pytree: an algorithm state, a
    :class:`~jaxdec.data.WorkerData`, a sampler or evaluator (``Partial``).

    Args:
      tree: worker-axis pytree.
      mesh: from :func:`worker_mesh`.
      n: number of workers (default: the leading dimension of the first leaf that
        has one, e.g. ``params`` in a state).
      axis_name: mesh axis to shard over (default ``"workers"``).

    Returns:
      The same tree with global, sharded arrays as leaves.

    Raises:
      ValueError: ``n`` not divisible by the number of devices on the axis.
    """
    ax = _axis(mesh, axis_name)
    n = _first_n(tree) if n is None else int(n)
    _check_divisible(n, _num_shards(mesh, ax), "shard_workers")
    split = NamedSharding(mesh, P(ax))
    rep = NamedSharding(mesh, P())

    def leaf(x):
        worker = np.ndim(x) >= 1 and np.shape(x)[0] == n
        return _place(x, split if worker else rep)

    return jax.tree.map(leaf, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Put every leaf, whole, on every device of ``mesh`` (e.g. a shared test set)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _place(x, rep), tree)


def gather(tree: PyTree) -> PyTree:
    """Host NumPy copy of ``tree``, also for arrays spread over several processes.

    Every process receives the full arrays (``process_allgather``), so call it
    on all processes. Typed PRNG keys (``jax.random.key``) cannot be NumPy arrays:
    they come back as key arrays on the default device, built from the gathered
    key data.
    """
    multi = jax.process_count() > 1
    if multi:
        from jax.experimental import multihost_utils

    def host(x):
        if multi and isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    def leaf(x):
        if _is_key(x):
            data = host(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return host(x)

    return jax.tree.map(leaf, tree)


def _mesh_of(x: Any) -> Mesh | None:
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
        return s.mesh
    return None


def is_worker_sharded(tree: PyTree) -> Mesh | None:
    """The mesh of the first leaf placed on a multi-device ``NamedSharding``
    (``None`` for a single-device tree)."""
    for x in jax.tree.leaves(tree):
        m = _mesh_of(x)
        if m is not None:
            return m
    return None


def constrain(tree: PyTree, mesh: Mesh, *, axis_name: str | None = None) -> PyTree:
    """Inside ``jit``: pin every ``[n, ...]`` leaf of a worker tree to the worker
    sharding (``with_sharding_constraint``); other leaves are left to XLA."""
    ax = _axis(mesh, axis_name)
    D = _num_shards(mesh, ax)
    split = NamedSharding(mesh, P(ax))
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree
    n = _first_n(tree)

    def leaf(x):
        if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == n and n % D == 0:
            return jax.lax.with_sharding_constraint(x, split)
        return x

    return jax.tree.map(leaf, tree)


# ------------------------------------------------------------------------- gossip


def _shifts_of(Wn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zeros of ``W`` as ``(s, i, j)`` with ``s = (j - i) mod n``, sorted by s."""
    n = Wn.shape[0]
    i, j = np.nonzero(Wn)
    s = (j - i) % n
    order = np.argsort(s, kind="stable")
    return s[order], i[order], j[order]


def shift_decomposition(W: np.typing.ArrayLike) -> dict[int, np.ndarray]:
    """``W = sum_s diag(a_s) P^s``: ``{s: a_s}`` with ``a_s[i] = W[i, (i+s) mod n]``.

    ``P^s`` is the cyclic shift ``(P^s X)_i = X_{(i + s) mod n}``; only shifts with
    a non-zero ``a_s`` are returned, in increasing ``s``. A circulant ``W`` has
    constant ``a_s``; a ``rows x cols`` torus has the 7 shifts ``0, +-1,
    +-(cols - 1), +-cols`` (mod ``n``).
    """
    Wn = np.asarray(W, dtype=np.float64)
    n = Wn.shape[0]
    s, i, j = _shifts_of(Wn)
    out = {}
    bounds = np.flatnonzero(np.diff(s)) + 1
    for si, ii, jj in zip(
        np.split(s, bounds), np.split(i, bounds), np.split(j, bounds), strict=True
    ):
        if si.size:
            a = np.zeros(n)
            a[ii] = Wn[ii, jj]
            out[int(si[0])] = a
    return out


def _shift_pieces(s: int, b: int, D: int) -> list[tuple[int, int, int]]:
    """Pieces ``(start, stop, k)`` of block ``d`` of ``roll(X, -s)``: local rows
    ``start..stop-1`` of device ``d + k``, concatenated in order."""
    q, r = divmod(s, b)
    pieces = [(r, b, q % D)]
    if r:
        pieces.append((0, r, (q + 1) % D))
    return pieces


def _send_rows(pieces: list[jax.Array], k: int, D: int, ax: str) -> list[jax.Array]:
    """One :func:`jax.lax.ppermute` per dtype for the row blocks ``pieces`` (one per
    leaf, ``[r, ...]``): device ``e`` sends them to device ``e - k``. Only the rows
    that move are packed into a message, never whole leaves."""
    perm = [(e, (e - k) % D) for e in range(D)]
    return _packed(lambda m: jax.lax.ppermute(m, ax, perm), pieces)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """``v [b]`` reshaped to broadcast against ``x [b, ...]``."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _packed(
    fn: Callable[[jax.Array], jax.Array], arrays: list[jax.Array]
) -> list[jax.Array]:
    """Apply a row-wise map ``fn`` to ``arrays`` (``[r, ...]`` each), those of one
    dtype flattened to ``[r, d_i]`` and concatenated to one ``[r, d]`` buffer, so a
    collective inside ``fn`` sends one message per dtype instead of one per array."""
    out: list[jax.Array | None] = [None] * len(arrays)
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        groups.setdefault(jnp.dtype(x.dtype), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fn(arrays[idx[0]])
            continue
        flat = [arrays[i].reshape(arrays[i].shape[0], -1) for i in idx]
        sizes = np.cumsum([f.shape[1] for f in flat])[:-1].tolist()
        mixed = jnp.split(fn(jnp.concatenate(flat, axis=1)), sizes, axis=1)
        for i, m in zip(idx, mixed, strict=True):
            out[i] = m.reshape(arrays[i].shape)
    return out


def _fused(fn: Callable[[jax.Array], jax.Array], tree: PyTree, fuse: bool) -> PyTree:
    """Apply a row-wise map ``fn`` to every leaf; with ``fuse`` through one buffer
    per dtype (:func:`_packed`: worth the copy only when ``fn`` sends messages,
    i.e. on more than one device)."""
    if not fuse:
        return jax.tree.map(fn, tree)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, _packed(fn, leaves))


def ppermute_gossip(
    W: np.typing.ArrayLike,
    mesh: Mesh,
    *,
    method: str = "auto",
    axis_name: str | None = None,
    doubly_stochastic: bool = True,
    max_shifts: int | None = None,
) -> gossip.Mixer:
    r"""Sharded neighbour gossip ``X <- W X`` as device-to-device collectives.

    ``method="shift"``: ``W = sum_{s in S} diag(a_s) P^s``
    (:func:`shift_decomposition`); per device and leaf,

    .. math::
        X_d \leftarrow \sum_{s \in S} a_{s,d} \odot
            \mathrm{concat}\big(X_{d+q}[r{:}b],\; X_{d+q+1}[0{:}r]\big),
        \qquad s = q b + r,

    every remote piece one :func:`jax.lax.ppermute` per dtype carrying that piece's
    rows of all leaves (a ring moves one row per device and direction: a halo
    exchange); the weighted sum is then one XLA fusion per leaf, so no leaf is
    copied whole. Accumulation in float32 in
    increasing ``s``, cast back to the leaf dtype (so ``bfloat16`` parameters are
    sent as ``bfloat16``). ``method="gather"``: all-gather the leaf, then
    ``x_i <- sum_k w_{ik} x_{idx_{ik}}`` on the local rows (padded neighbour lists,
    as :func:`jaxdec.gossip.sparse`). ``method="dense"``: :func:`jaxdec.gossip.dense`
    with the result pinned to the worker sharding (XLA's sharded contraction, a
    reduce-scatter). ``"auto"``: ``"shift"`` when ``|S| <= max_shifts`` (default
    twice the largest neighbourhood), else ``"gather"``.

    Equals :func:`jaxdec.gossip.dense` to float tolerance on any mesh, including a
    single device. Time-varying graphs: ``gossip.time_varying([ppermute_gossip(W,
    mesh) for W in topology.one_peer_exponential(n)])``.

    Args:
      W: ``(n, n)`` mixing matrix (validated like :func:`jaxdec.gossip.dense`).
      mesh: device mesh (:func:`worker_mesh`); ``n`` must be a multiple of the
        number of devices on ``axis_name``.
      method: ``"auto"``, ``"shift"``, ``"gather"`` or ``"dense"``.
      axis_name: mesh axis of the workers (default ``"workers"``).
      doubly_stochastic: require column sums of one.
      max_shifts: shift budget of ``"auto"``.

    Returns:
      A :class:`jaxdec.gossip.Mixer` (ignores ``step``).
    """
    if method not in _METHODS:
        raise ValueError(
            f"ppermute_gossip: method must be one of {_METHODS}, got {method!r}."
        )
    Wn = topology.check_mixing_matrix(W, doubly_stochastic=doubly_stochastic)
    n = Wn.shape[0]
    ax = _axis(mesh, axis_name)
    D = _num_shards(mesh, ax)
    b = _check_divisible(n, D, "ppermute_gossip")
    sends = gossip._const_sends(Wn)
    split = P(ax)

    if method == "dense":
        dense = gossip.dense(Wn, doubly_stochastic=doubly_stochastic)

        def dense_fn(tree, step):
            return constrain(dense.fn(tree, step), mesh, axis_name=ax)

        return gossip.Mixer(dense_fn, sends, n, f"sharded_dense(n={n}, D={D})")

    k_max = int((Wn != 0).sum(axis=1).max())
    budget = 2 * k_max if max_shifts is None else int(max_shifts)
    if method == "auto":
        num_shifts = np.unique(_shifts_of(Wn)[0]).size
        method = "shift" if num_shifts <= budget else "gather"

    if method == "shift":
        shifts = shift_decomposition(Wn)
        const = {s: float(a[0]) for s, a in shifts.items() if np.all(a == a[0])}
        var = [s for s in shifts if s not in const]
        a_var = jnp.asarray(
            np.stack([shifts[s] for s in var]) if var else np.zeros((0, n)), jnp.float32
        )

        plan = {s: _shift_pieces(s, b, D) for s in shifts}

        def local(tree, a_loc):
            leaves, treedef = jax.tree.flatten(tree)
            # the halo: each remote piece of each shift is one message per dtype
            got = {
                (s, j): _send_rows([x[lo:hi] for x in leaves], k, D, ax)
                for s, pieces in plan.items()
                for j, (lo, hi, k) in enumerate(pieces)
                if k
            }

            def leaf(i, x):  # sum_s a_s * roll(X, -s) rows, fused by XLA per leaf
                acc = jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
                for s, pieces in plan.items():
                    parts = [
                        got[(s, j)][i] if k else x[lo:hi]
                        for j, (lo, hi, k) in enumerate(pieces)
                    ]
                    xs = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
                    w = const[s] if s in const else _bcast(a_loc[var.index(s)], x)
                    acc = acc + w * xs.astype(acc.dtype)
                return acc.astype(x.dtype)

            return jax.tree.unflatten(
                treedef, [leaf(i, x) for i, x in enumerate(leaves)]
            )

        smap = jax.shard_map(
            local, mesh=mesh, in_specs=(split, P(None, ax)), out_specs=split
        )

        def fn(tree, step):
            return smap(tree, a_var)

        name = f"ppermute(n={n}, D={D}, shifts={len(shifts)})"
        return gossip.Mixer(fn, sends, n, name)

    idx, w = topology.neighbor_lists(Wn)
    idx_j, w_j = jnp.asarray(idx), jnp.asarray(w, jnp.float32)

    def local_gather(tree, idx_loc, w_loc):
        def leaf(x):
            x_all = jax.lax.all_gather(x, ax, tiled=True)  # [n, ...]
            g = x_all[idx_loc]  # [b, k, ...]
            wk = w_loc.reshape(w_loc.shape + (1,) * (x.ndim - 1))
            return jnp.sum(wk * g, axis=1).astype(x.dtype)

        return _fused(leaf, tree, D > 1)

    smap_g = jax.shard_map(
        local_gather, mesh=mesh, in_specs=(split, split, split), out_specs=split
    )

    def fn_g(tree, step):
        return smap_g(tree, idx_j, w_j)

    return gossip.Mixer(
        fn_g, sends, n, f"sharded_gather(n={n}, D={D}, k={idx.shape[1]})"
    )


# --------------------------------------------------------------------- evaluation


def map_workers(
    fn: Callable[[PyTree], Any],
    mesh: Mesh,
    *,
    batch_size: int | None = None,
    axis_name: str | None = None,
) -> Callable[[PyTree], Any]:
    """Sharded ``lax.map`` over the worker axis: ``out_i = fn(tree_i)``.

    Each device maps ``fn`` over its own block of ``n / D`` workers,
    ``batch_size`` at a time (``jax.lax.map(fn, block, batch_size=...)``: a scan over
    chunks, vmap inside), so nothing leaves the device and peak memory is
    ``O(batch_size)`` per-worker evaluations. Outputs keep the worker sharding.
    """
    ax = _axis(mesh, axis_name)
    split = P(ax)

    def local(tree):
        b = jtree.num_workers(tree)
        bs = None if batch_size is None else min(int(batch_size), b)
        return jax.lax.map(fn, tree, batch_size=bs)

    return jax.shard_map(local, mesh=mesh, in_specs=(split,), out_specs=split)


def evaluator(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    test_x: jax.typing.ArrayLike,
    test_y: jax.typing.ArrayLike,
    mesh: Mesh,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
    axis_name: str | None = None,
) -> Callable[[PyTree], dict[str, jax.Array]]:
    """Sharded :func:`jaxdec.metrics.evaluator` (same keys and values).

    Every worker's model ``i`` is evaluated on the device that holds it
    (:func:`map_workers`, ``worker_chunk`` at a time); the averaged model ``x_bar``
    (a cross-device mean) is evaluated once, replicated. Keys:
    ``local_acc_mean``, ``local_acc_min``, ``local_loss_mean``, ``avg_model_acc``,
    ``avg_model_loss``, ``mergeability_gap``, ``consensus_distance``.

    Returns:
      ``eval_fn(params_or_state) -> dict``, a ``jax.tree_util.Partial`` whose leaves
      are the (replicated) test arrays, for ``jd.run(..., eval_fn=eval_fn)``.
    """
    x = jnp.asarray(test_x)
    y = jnp.asarray(test_y, jnp.int32)
    metrics._check_xy(x, y, "sharding.evaluator")
    worker_chunk = metrics._check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = metrics._check_chunk(
        example_chunk, "example_chunk", allow_none=True
    )
    ax = _axis(mesh, axis_name)
    split = P(ax)

    def local(params, x, y):
        one = metrics._global_eval(apply, x, y, example_chunk)
        bs = min(worker_chunk, jtree.num_workers(params))
        return jax.lax.map(one, params, batch_size=bs)

    per_worker = jax.shard_map(
        local, mesh=mesh, in_specs=(split, P(), P()), out_specs=split
    )

    def eval_fn(x, y, target):
        params = getattr(target, "params", target)
        loss, acc = per_worker(params, x, y)
        avg = jtree.worker_mean(params)
        avg_loss, avg_acc = metrics._global_eval(apply, x, y, example_chunk)(avg)
        return {
            "local_acc_mean": jnp.mean(acc),
            "local_acc_min": jnp.min(acc),
            "local_loss_mean": jnp.mean(loss),
            "avg_model_acc": avg_acc,
            "avg_model_loss": avg_loss,
            "mergeability_gap": avg_acc - jnp.mean(acc),
            "consensus_distance": jtree.consensus_distance(params),
        }

    rx, ry = replicate((x, y), mesh)
    return jax.tree_util.Partial(eval_fn, rx, ry)


# ------------------------------------------------------------------------- memory


def cast_floats(tree: PyTree, dtype: Any = jnp.bfloat16) -> PyTree:
    """Cast every floating leaf to ``dtype`` (integers, bools, keys unchanged).

    ``cast_floats(params, jnp.bfloat16)`` halves the bytes per worker of the
    parameters, of the optax state built from them and of every gossip message;
    the jaxdec mixers still accumulate ``sum_j W_ij x_j`` in float32.
    """
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"cast_floats: dtype must be a float type, got {dt}.")

    def leaf(x):
        if _is_key(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jnp.asarray(x).astype(dt)

    return jax.tree.map(leaf, tree)


def float32_loss(loss_fn: LossFn) -> LossFn:
    r"""Mixed precision: ``loss(params, batch, key) = f(float32(params), batch, key)``.

    Parameters stored in ``bfloat16`` are upcast inside the one-worker loss, so
    the forward pass, the backward pass and the loss run in float32; the gradient
    flows back through the cast and arrives in the parameters' dtype,
    ``g = bf16(\nabla f(float32(x)))``. Works with ``has_aux``.
    """
    if not callable(loss_fn):
        raise ValueError("float32_loss: loss_fn must be callable.")

    def wrapped(params, batch, key):
        return loss_fn(cast_floats(params, jnp.float32), batch, key)

    return wrapped


def remat(loss_fn: LossFn, policy: Callable | None = None) -> LossFn:
    """``jax.checkpoint`` on the one-worker loss: activations are recomputed in the
    backward pass instead of stored (``policy``: a ``jax.checkpoint_policies``
    entry, e.g. ``dots_with_no_batch_dims_saveable``). Pays when activations, not
    parameters, dominate memory per worker (CNNs, large batches); see
    ``experiments/bench.py --memory``."""
    if not callable(loss_fn):
        raise ValueError("remat: loss_fn must be callable.")
    return jax.checkpoint(loss_fn, policy=policy)
