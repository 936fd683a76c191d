"""Checkpoints of a whole run: any state pytree, PRNG keys, step and history.

A checkpoint is an orbax-checkpoint step directory ``<dir>/<step>/`` with two items:

* ``state``: every leaf of the saved pytree (any nesting of NamedTuples / dicts /
  lists of arrays: algorithm state with optimizer states, trackers, server state,
  counters, and the run's PRNG key), written by orbax's ``StandardSave``
  (tensorstore, no pickle). Typed PRNG keys (``jax.random.key``) are stored as their
  ``key_data`` and re-wrapped on restore;
* ``meta``: JSON with the step, the tree structure, every leaf's shape and dtype, the
  :class:`~jaxdec.run.History` so far, user metadata, and a SHA-256 content checksum
  over all of it.

Writes are atomic: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames to
``<step>`` only when everything is on disk, so a process killed mid-write leaves a
temporary directory that :func:`all_steps` / :func:`latest_step` ignore (and the next
writer removes). Corruption after the fact (flipped, truncated or deleted files, a
tampered ``meta``) is caught by the checksum: :func:`restore` raises
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
]

FORMAT = "jaxdec-checkpoint"
VERSION = 1
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


def _host_array(x: Any) -> np.ndarray:
    """The whole array on the host. A ``jax.Array`` spread over several processes
    (multi-host sharding) is all-gathered first: every process must call
    :func:`save` together, as the SPMD program does anyway."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _on_devices_like(a: np.ndarray, leaf: jax.Array) -> jax.Array:
    """Place host array ``a`` with ``leaf``'s sharding (each process builds only its
    own shards, so this works for multi-host shardings too)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jax.numpy.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def _to_host(tree: PyTree) -> tuple[list[np.ndarray], list[dict[str, Any]], str]:
    """Leaves as host NumPy arrays (keys as key data), their specs, the treedef."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays, specs = [], []
    for leaf in leaves:
        key = _is_key(leaf)
        a = _host_array(jax.random.key_data(leaf) if key else leaf)
        arrays.append(np.asarray(a, order="C"))
        specs.append(
            {
                "shape": list(a.shape),
                "dtype": a.dtype.str,
                "prng_key": str(jax.random.key_impl(leaf)) if key else None,
            }
        )
    return arrays, specs, str(treedef)


def _digest(arrays: list[np.ndarray], meta: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``meta`` and every array's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, allow_nan=True).encode())
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
        arrays, specs, treedef = _to_host(tree)
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
        meta["sha256"] = _digest(arrays, meta)
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
        keys allowed.
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


def restore(
    directory: str | os.PathLike, like: PyTree, *, step: int | None = None
) -> Restored:
    """Load and verify the checkpoint of ``step`` (default: the latest).

    Every leaf is checked against ``like`` (same tree structure, shapes and dtypes)
    and the SHA-256 content checksum is recomputed; the tree is returned only if it
    matches.

    Args:
      directory: checkpoint folder.
      like: a pytree with the structure, shapes and dtypes of the saved one (e.g.
        ``{"state": algo.init(params), "key": key}``); its values are not used.
      step: which checkpoint (default :func:`latest_step`).

    Returns:
      :class:`Restored` ``(tree, step, history, metadata)``; leaves are ``jax.Array``
      where ``like`` has ``jax.Array`` leaves (keys re-wrapped), NumPy otherwise.

    Raises:
      FileNotFoundError: no (such) checkpoint in ``directory``.
      ValueError: ``like`` does not match the saved structure / shapes / dtypes.
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
    try:
        specs = meta["leaves"]
        treedef_str, saved_sum = meta["treedef"], meta["sha256"]
        shapes = [tuple(int(v) for v in s["shape"]) for s in specs]
        dtypes = [np.dtype(s["dtype"]) for s in specs]
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"malformed metadata: {err}") from err

    leaves, treedef = jax.tree.flatten(like)
    if str(treedef) != treedef_str or len(leaves) != len(specs):
        raise ValueError(
            f"checkpoint {path} holds a different tree ({len(specs)} leaves) than "
            f"like= ({len(leaves)} leaves): saved structure {treedef_str[:300]}; pass "
            "like= built the same way (same algorithm, optimizer and params shapes)."
        )
    for i, (leaf, shape, dtype) in enumerate(zip(leaves, shapes, dtypes, strict=True)):
        ref = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        ref = ref if hasattr(ref, "dtype") else np.asarray(ref)
        if tuple(np.shape(ref)) != shape or np.dtype(ref.dtype) != dtype:
            raise ValueError(
                f"checkpoint {path} leaf {i} is {dtype}{list(shape)} but like= has "
                f"{np.dtype(ref.dtype)}{list(np.shape(ref))}; pass like= built the "
                "same way as the saved state."
            )
    target = {
        f"{i:05d}": np.zeros(s, t)
        for i, (s, t) in enumerate(zip(shapes, dtypes, strict=True))
    }
    try:
        with ocp.StandardCheckpointer() as reader:
            got = reader.restore(path / _STATE, target)
        arrays = [np.asarray(got[f"{i:05d}"]) for i in range(len(specs))]
        # orbax may hand 0-d arrays back as [1]: restore the recorded shape.
        arrays = [
            a.reshape(s) if a.size == int(np.prod(s)) else a
            for a, s in zip(arrays, shapes, strict=True)
        ]
    except Exception as err:  # noqa: BLE001
        raise _corrupt(path, f"array data unreadable: {type(err).__name__}") from err
    body = {k: v for k, v in meta.items() if k != "sha256"}
    for a, s, t in zip(arrays, shapes, dtypes, strict=True):
        if a.shape != s or a.dtype != t:
            raise _corrupt(path, "array shape or dtype differs from its metadata")
    if _digest(arrays, body) != saved_sum:
        raise _corrupt(path, "content checksum mismatch")
    if meta.get("step") != step:
        raise _corrupt(path, "step in metadata differs from the directory name")

    out = []
    for leaf, a in zip(leaves, arrays, strict=True):
        if _is_key(leaf):
            out.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf)))
        elif isinstance(leaf, jax.Array):
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
