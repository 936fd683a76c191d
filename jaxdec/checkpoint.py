"""Checkpoints of a whole run: any state pytree, PRNG keys, step and history.

A checkpoint is an orbax-checkpoint step directory ``<dir>/<step>/`` with two items:

* ``state``: every leaf of the saved pytree (any nesting of NamedTuples / dicts /
  lists of arrays: algorithm state with optimizer states, trackers, server state,
  counters, and the run's PRNG key), written by orbax's ``StandardSave``
  (tensorstore, no pickle). Typed PRNG keys (``jax.random.key``) are stored as their
  ``key_data`` and re-wrapped on restore;
* ``meta``: JSON with the step, the tree structure, every leaf's shape, dtype and
  content fingerprint, the :class:`~jaxdec.run.History` so far, user metadata, and a
  SHA-256 checksum over all of it.

Sharded and multi-host states are written and read shard by shard, never gathered:
orbax writes each process's shards of every ``jax.Array`` (each process into its
own ``ocdbt.process_<i>`` files) and reads into the sharding of ``like=``, and each
leaf's fingerprint (see :func:`fingerprints`) is computed on the devices that hold
it. The fingerprint does not depend on the sharding, so a checkpoint written on 8
devices restores, verified, onto 1 device or onto another mesh, and vice versa.

Writes are atomic: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames to
``<step>`` only when everything is on disk, so a process killed mid-write leaves a
temporary directory that :func:`all_steps` / :func:`latest_step` ignore (and the next
writer removes). Corruption after the fact (flipped, truncated or deleted files, a
tampered ``meta``) is caught by the checksums: :func:`restore` raises
:class:`CorruptCheckpoint` and never returns a tree from such a checkpoint. Nothing
is unpickled; loading a hostile checkpoint parses JSON and array files only.

The minibatch sampler needs no saved position: ``jd.run`` draws the batch of step
``t`` as ``sampler(fold_in(key, t), t)``, so ``(state, key, step)`` determines the rest
of the trajectory bit for bit.

Example:
  >>> jd.checkpoint.save("ckpt", 100, {"state": state, "key": key}, max_to_keep=3)
  >>> jd.checkpoint.latest_step("ckpt")
  100
  >>> ck = jd.checkpoint.restore("ckpt", like={"state": state0, "key": key})
  >>> ck.tree["state"], ck.step, ck.history
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxdec.types import PyTree

__all__ = [
    "CorruptCheckpoint",
    "Restored",
    "Checkpointer",
    "save",
    "restore",
    "all_steps",
    "latest_step",
    "history_to_json",
    "history_from_json",
    "fingerprints",
]

FORMAT = "jaxdec-checkpoint"
VERSION = 2  # 1: arrays gathered to the host, SHA-256 over their bytes
_STATE, _META = "state", "meta"


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files are missing, unreadable or fail the checksum."""


class Restored(NamedTuple):
    """What :func:`restore` returns.

    Attributes:
      tree: the saved pytree, with the structure of ``like``.
      step: the step the checkpoint was written at.
      history: the saved :class:`~jaxdec.run.History` (or ``None``).
      metadata: the user metadata dict saved with it.
    """

    tree: PyTree
    step: int
    history: Any
    metadata: dict[str, Any]


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype_name(dtype: Any) -> str:
    """A dtype as a name that :func:`_parse_dtype` reads back (``"bfloat16"``,
    ``"float32"``, ...); NumPy's ``dtype.str`` spells ``bfloat16`` as ``"<V2"``."""
    return np.dtype(dtype).name


def _parse_dtype(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))


# ------------------------------------------------------------------ fingerprints
# A checkpoint's arrays are verified by a layout-independent content fingerprint
# computed where the data lives (on the devices, shard by shard), so a checkpoint of
# a sharded or multi-host state never has to be gathered to one place:
#
#   w_i  = the array's i-th 32-bit word (row-major; 8-byte items give two words,
#          1- and 2-byte items are zero-extended),
#   r_ki = fmix32(i + s_k)            (i mod 2^32, two lane seeds s_k),
#   F_k  = sum_i fmix32(w_i XOR r_ki)  mod 2^32,   k = 0, 1   (64 bits in all).
#
# fmix32 (MurmurHash3's finalizer) is a bijection of uint32, so changing any one word
# changes both lanes; integer addition mod 2^32 is associative and commutative, so
# F does not depend on the sharding, the device count or the reduction order. The
# SHA-256 over the metadata (which holds every F) protects the rest. Two lanes, not
# more: XLA:CPU runs each lane as its own pass at ~0.5 s/GiB on 2 cores, and 64 bits
# leave a 2^-64 chance that random damage goes unseen (CRC-64 class).
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(h, xp):
    u = xp.uint32
    h = h ^ (h >> u(16))
    h = h * u(0x85EBCA6B)
    h = h ^ (h >> u(13))
    h = h * u(0xC2B2AE35)
    return h ^ (h >> u(16))


def _words(x, xp):
    """``x`` as uint32 words: shape ``x.shape`` (``+ (2,)`` for 8-byte items)."""
    dt = np.dtype(x.dtype)
    if dt.kind == "c":
        x = xp.stack([x.real, x.imag], axis=-1)
        dt = np.dtype(x.dtype)
    if dt == np.bool_:
        x, dt = x.astype(xp.uint8), np.dtype(np.uint8)
    if dt.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"cannot checkpoint arrays of dtype {dt}.")
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[dt.itemsize]
    if xp is np:
        a = np.ascontiguousarray(x).reshape(-1).view(unsigned)
        shape = x.shape + ((2,) if dt.itemsize == 8 else ())
        return a.reshape(shape).astype(np.uint32)
    return jax.lax.bitcast_convert_type(x, unsigned).astype(xp.uint32)


def _lanes(x, xp) -> Any:
    """The fingerprint lanes ``F_k`` of one array (uint32 ``[2]``)."""
    w = _words(x, xp)
    if xp is np:
        i = (np.arange(w.size, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
        i = i.reshape(w.shape)
    else:
        i = xp.zeros(w.shape, xp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):
            i = i + jax.lax.broadcasted_iota(xp.uint32, w.shape, d) * xp.uint32(stride)
            stride = (stride * w.shape[d]) & 0xFFFFFFFF
    return xp.stack(
        [
            xp.sum(_fmix32(w ^ _fmix32(i + xp.uint32(s), xp), xp), dtype=xp.uint32)
            for s in _SEEDS
        ]
    )


def _global(a: Any) -> bool:
    """A ``jax.Array`` of the whole program: any array in one process, and under
    multi-host only arrays spanning processes (a process-local array, like a key
    placed on one local device, is written from the host like a NumPy array)."""
    return isinstance(a, jax.Array) and (
        jax.process_count() == 1 or not a.is_fully_addressable
    )


@jax.jit
def _device_lanes(leaves: list) -> jax.Array:
    return jax.numpy.stack([_lanes(x, jax.numpy) for x in leaves])


def fingerprints(arrays: list) -> list[str]:
    """Layout-independent 64-bit content fingerprints of ``arrays`` (hex strings).

    ``jax.Array`` leaves are hashed on their devices in one jitted call (sharded and
    multi-host arrays included: every process must call it, and no array is
    gathered); NumPy arrays on the host. The same content gives the same
    fingerprint whatever the sharding.

    .. math::
        F_k = \\sum_i \\mathrm{fmix32}\\big(w_i \\oplus
              \\mathrm{fmix32}(i + s_k)\\big) \\bmod 2^{32},\\quad k = 0, 1,

    over the array's row-major 32-bit words ``w_i``.
    """
    out: list[Any] = [None] * len(arrays)
    groups: dict[frozenset, list[int]] = {}  # one jitted call per set of devices
    for i, a in enumerate(arrays):
        if _global(a):
            groups.setdefault(frozenset(a.sharding.device_set), []).append(i)
    for idx in groups.values():
        lanes = _device_lanes([arrays[i] for i in idx])
        lanes = np.asarray(lanes.addressable_data(0))
        for j, i in enumerate(idx):
            out[i] = lanes[j]
    for i, a in enumerate(arrays):
        if out[i] is None:
            with np.errstate(over="ignore"):
                out[i] = _lanes(np.asarray(a), np)
    return ["".join(f"{int(v):08x}" for v in lane) for lane in out]


def _leaves_to_save(tree: PyTree) -> tuple[list[Any], list[dict[str, Any]], str]:
    """Leaves to write (``jax.Array`` stays on its devices, keys as key data, the
    rest as NumPy), their specs with fingerprints, and the treedef."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays, specs = [], []
    for leaf in leaves:
        key = _is_key(leaf)
        a = jax.random.key_data(leaf) if key else leaf
        if not _global(a):
            a = np.asarray(a, order="C")
        arrays.append(a)
        specs.append(
            {
                "shape": list(a.shape),
                "dtype": _dtype_name(a.dtype),
                "prng_key": str(jax.random.key_impl(leaf)) if key else None,
            }
        )
    for spec, fp in zip(specs, fingerprints(arrays), strict=True):
        spec["fingerprint"] = fp
    return arrays, specs, str(treedef)


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, allow_nan=True).encode()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` (which holds every fingerprint)."""
    return hashlib.sha256(_canonical(meta)).hexdigest()


def _on_devices_like(a: np.ndarray, leaf: jax.Array) -> jax.Array:
    """Place host array ``a`` with ``leaf``'s sharding (each process builds only its
    own shards, so this works for multi-host shardings too)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jax.numpy.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


# ----------------------------------------------- version 1 (read only, host arrays)
def _digest_v1(arrays: list[np.ndarray], meta: dict[str, Any]) -> str:
    """Version 1's SHA-256 over the canonical JSON of ``meta`` and every array's
    bytes (the arrays gathered on the host)."""
    h = hashlib.sha256(_canonical(meta))
    for i, a in enumerate(arrays):
        h.update(f"|{i}:{a.dtype.str}:{a.shape}|".encode())
        h.update(np.asarray(a, order="C").tobytes())
    return h.hexdigest()


def history_to_json(hist: Any) -> dict[str, Any] | None:
    """A :class:`~jaxdec.run.History` as a JSON-ready dict (exact: float32 values
    round-trip through Python floats; NaN/inf kept)."""
    if hist is None:
        return None

    def arr(v):
        v = np.asarray(v)
        return {"dtype": v.dtype.str, "values": v.tolist()}

    return {
        "train": {k: arr(v) for k, v in hist.train.items()},
        "eval_steps": arr(np.asarray(hist.eval_steps, np.int64)),
        "eval": {k: arr(v) for k, v in hist.eval.items()},
        "wall_time": [float(w) for w in hist.wall_time],
        "diverged_at": hist.diverged_at,
        "diverged_workers": list(hist.diverged_workers),
    }


def history_from_json(d: dict[str, Any] | None) -> Any:
    """Inverse of :func:`history_to_json`."""
    if d is None:
        return None
    from jaxdec.loop import History

    def arr(v):
        return np.asarray(v["values"], dtype=np.dtype(v["dtype"]))

    return History(
        train={k: arr(v) for k, v in d["train"].items()},
        eval_steps=arr(d["eval_steps"]),
        eval={k: arr(v) for k, v in d["eval"].items()},
        wall_time=list(d["wall_time"]),
        diverged_at=d["diverged_at"],
        diverged_workers=list(d["diverged_workers"]),
    )


def _check_dir(directory: str | os.PathLike) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(
            f"checkpoint directory must be a path, got {type(directory).__name__}."
        )
    return Path(directory).absolute()


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finalized checkpoints in ``directory``, ascending (``[]`` if the
    directory does not exist). Unfinished (temporary) checkpoints are not listed."""
    d = _check_dir(directory)
    if not d.is_dir():
        return []
    return sorted(_ocp().path.step.checkpoint_steps(d))


def latest_step(directory: str | os.PathLike) -> int | None:
    """Step of the newest finalized checkpoint in ``directory``, or ``None``."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


class Checkpointer:
    """Writes checkpoints of one run into ``directory`` keeping the newest
    ``max_to_keep`` (one orbax ``CheckpointManager``, synchronous saves: when
    :meth:`save` returns the checkpoint is finalized on disk).

    Args:
      directory: checkpoint folder (created if missing).
      max_to_keep: number of checkpoints kept (``>= 1``), oldest deleted first.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        if isinstance(max_to_keep, bool) or int(max_to_keep) != max_to_keep:
            raise ValueError(f"max_to_keep must be an integer, got {max_to_keep!r}.")
        if max_to_keep < 1:
            raise ValueError(
                f"max_to_keep must be >= 1 (keep at least the latest checkpoint), "
                f"got {max_to_keep}."
            )
        ocp = _ocp()
        self.directory = _check_dir(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=int(max_to_keep),
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=False,
            ),
        )

    def save(
        self,
        step: int,
        tree: PyTree,
        *,
        history: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``tree`` (+ ``history``, ``metadata``) as the checkpoint of ``step``.

        Returns:
          The finalized step directory.
        """
        if isinstance(step, bool) or int(step) != step or int(step) < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}.")
        step = int(step)
        if step in self._mngr.all_steps():
            raise ValueError(
                f"{self.directory} already has a checkpoint at step {step}; resume "
                "from it or use another directory."
            )
        arrays, specs, treedef = _leaves_to_save(tree)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "treedef": treedef,
            "leaves": specs,
            "history": history_to_json(history),
            "metadata": dict(metadata or {}),
        }
        json.dumps(meta["metadata"])  # user metadata must be JSON (no pickle)
        meta["sha256"] = _meta_digest(meta)
        ocp = _ocp()
        items = {f"{i:05d}": a for i, a in enumerate(arrays)}
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(items), _META: ocp.args.JsonSave(meta)}
            ),
        )
        self._mngr.wait_until_finished()
        return self.directory / str(step)

    def close(self) -> None:
        """Release the manager (waits for pending writes)."""
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(
    directory: str | os.PathLike,
    step: int,
    tree: PyTree,
    *,
    history: Any = None,
    metadata: dict[str, Any] | None = None,
    max_to_keep: int = 3,
) -> Path:
    """Atomically write ``tree`` as the checkpoint of ``step`` in ``directory``.

    Args:
      directory: checkpoint folder (created if missing).
      step: the step number (``>= 0``, not already saved).
      tree: any pytree of arrays (e.g. ``{"state": state, "key": key}``); typed PRNG
        keys allowed. Sharded leaves are written shard by shard; under multi-host
        every process calls :func:`save` together (as the SPMD program does anyway).
      history: optional :class:`~jaxdec.run.History` saved alongside.
      metadata: optional JSON-serializable dict.
      max_to_keep: keep the newest ``max_to_keep`` checkpoints.

    Returns:
      The finalized step directory.
    """
    with Checkpointer(directory, max_to_keep) as ck:
        return ck.save(step, tree, history=history, metadata=metadata)


def _corrupt(path: Path, why: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"checkpoint {path} is corrupt or incomplete ({why}); it was not loaded. "
        "Delete it to resume from an older checkpoint, or restart the run."
    )


def _read_state(path: Path, target: dict[str, Any]) -> list[Any]:
    """The ``state`` item's arrays in ``target``'s order (any read failure is
    corruption)."""
    try:
        with _ocp().StandardCheckpointer() as reader:
            got = reader.restore(path / _STATE, target)
        return [got[k] for k in sorted(target)]
    except Exception as err:  # noqa: BLE001
        # a failed read leaves tensorstore futures behind: collect them now, in this
        # call, rather than at some later point of the program
        gc.collect()
        raise _corrupt(path, f"array data unreadable: {type(err).__name__}") from err


def _read_v1(path, body, saved_sum, shapes, dtypes) -> list[np.ndarray]:
    """Version 1 data: whole arrays on the host, checked by the SHA-256 over them."""
    target = {
        f"{i:05d}": np.zeros(s, t)
        for i, (s, t) in enumerate(zip(shapes, dtypes, strict=True))
    }
    # orbax may hand 0-d arrays back as [1]: restore the recorded shape.
    arrays = [
        np.asarray(a).reshape(s) if np.size(a) == int(np.prod(s)) else np.asarray(a)
        for a, s in zip(_read_state(path, target), shapes, strict=True)
    ]
    for a, s, t in zip(arrays, shapes, dtypes, strict=True):
        if a.shape != s or a.dtype != t:
            raise _corrupt(path, "array shape or dtype differs from its metadata")
    if _digest_v1(arrays, body) != saved_sum:
        raise _corrupt(path, "content checksum mismatch")
    return arrays


def restore(
    directory: str | os.PathLike, like: PyTree, *, step: int | None = None
) -> Restored:
    """Load and verify the checkpoint of ``step`` (default: the latest).

    Every leaf is checked against ``like`` (same tree structure, shapes and dtypes),
    read into ``like``'s sharding (``jax.Array`` leaves; each process reads only its
    shards) and its content fingerprint recomputed where it lives; the tree is
    returned only if every fingerprint and the metadata's SHA-256 match. Checkpoints
    of format version 1 (host arrays, SHA-256 over their bytes) are read too.

    Args:
      directory: checkpoint folder.
      like: a pytree with the structure, shapes and dtypes of the saved one (e.g.
        ``{"state": algo.init(params), "key": key}``); its values are not used.
      step: which checkpoint (default :func:`latest_step`).

    Returns:
      :class:`Restored` ``(tree, step, history, metadata)``; leaves are ``jax.Array``
      with ``like``'s sharding where ``like`` has ``jax.Array`` leaves (keys
      re-wrapped), NumPy otherwise.

    Raises:
      FileNotFoundError: no (such) checkpoint in ``directory``.
      ValueError: ``like`` does not match the saved structure / shapes / dtypes, or
        the checkpoint has a format version newer than this jaxdec reads.
      CorruptCheckpoint: missing or unreadable files, or a checksum mismatch.
    """
    d = _check_dir(directory)
    steps = all_steps(d)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no finalized checkpoint in {d}.")
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {d} (have {steps}).")
    path = d / str(step)
    ocp = _ocp()
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
            meta = reader.restore(path / _META)
    except Exception as err:  # noqa: BLE001  (any reader failure = corrupt)
        raise _corrupt(path, f"metadata unreadable: {type(err).__name__}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, "not a jaxdec checkpoint")
    version = meta.get("version")
    if version not in (1, VERSION):
        raise ValueError(
            f"checkpoint {path} has format version {version!r}; this jaxdec reads "
            f"versions 1 and {VERSION}. Upgrade jaxdec to read it."
        )
    try:
        specs = meta["leaves"]
        treedef_str, saved_sum = meta["treedef"], meta["sha256"]
        shapes = [tuple(int(v) for v in s["shape"]) for s in specs]
        dtypes = [
            np.dtype(s["dtype"]) if version == 1 else _parse_dtype(s["dtype"])
            for s in specs
        ]
        prints = [s["fingerprint"] for s in specs] if version > 1 else None
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"malformed metadata: {err}") from err
    body = {k: v for k, v in meta.items() if k != "sha256"}
    if version > 1 and _meta_digest(body) != saved_sum:
        raise _corrupt(path, "metadata checksum mismatch")

    leaves, treedef = jax.tree.flatten(like)
    if str(treedef) != treedef_str or len(leaves) != len(specs):
        raise ValueError(
            f"checkpoint {path} holds a different tree ({len(specs)} leaves) than "
            f"like= ({len(leaves)} leaves): saved structure {treedef_str[:300]}; pass "
            "like= built the same way (same algorithm, optimizer and params shapes)."
        )
    refs = []
    for i, (leaf, shape, dtype) in enumerate(zip(leaves, shapes, dtypes, strict=True)):
        ref = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        ref = ref if hasattr(ref, "dtype") else np.asarray(ref)
        if tuple(np.shape(ref)) != shape or np.dtype(ref.dtype) != dtype:
            raise ValueError(
                f"checkpoint {path} leaf {i} is {dtype}{list(shape)} but like= has "
                f"{np.dtype(ref.dtype)}{list(np.shape(ref))}; pass like= built the "
                "same way as the saved state."
            )
        refs.append(ref)
    if version == 1:
        arrays = _read_v1(path, body, saved_sum, shapes, dtypes)
    else:
        # every jax.Array leaf is read straight into like='s sharding: each process
        # reads only the shards its devices hold
        target = {
            f"{i:05d}": (
                jax.ShapeDtypeStruct(s, t, sharding=r.sharding)
                if _global(r)
                else np.zeros(s, t)
            )
            for i, (s, t, r) in enumerate(zip(shapes, dtypes, refs, strict=True))
        }
        got = _read_state(path, target)
        arrays = [
            g if isinstance(g, jax.Array) else np.asarray(g).reshape(s)
            for g, s in zip(got, shapes, strict=True)
        ]
        for a, s, t in zip(arrays, shapes, dtypes, strict=True):
            if tuple(a.shape) != s or np.dtype(a.dtype) != t:
                raise _corrupt(path, "array shape or dtype differs from its metadata")
        bad = [
            i
            for i, (fp, want) in enumerate(
                zip(fingerprints(arrays), prints, strict=True)
            )
            if fp != want
        ]
        if bad:
            raise _corrupt(path, f"content checksum mismatch in leaves {bad[:5]}")
    if meta.get("step") != step:
        raise _corrupt(path, "step in metadata differs from the directory name")

    out = []
    for leaf, a in zip(leaves, arrays, strict=True):
        if _is_key(leaf):
            out.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf)))
        elif isinstance(leaf, jax.Array) and not isinstance(a, jax.Array):
            out.append(_on_devices_like(a, leaf))
        else:
            out.append(a)
    try:
        history = history_from_json(meta["history"])
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"malformed history: {err}") from err
    return Restored(
        jax.tree.unflatten(treedef, out), step, history, meta.get("metadata", {})
    )
