"""The driver: scan an algorithm over steps in jitted chunks, evaluate between chunks.

Step ``t`` of a run uses the key ``k_t = fold_in(key, t)`` split into a data key (for
``sampler(k_data, t)``) and an algorithm key (for ``algo.step``), so the trajectory is
a pure function of ``key`` and does not depend on how the run is chunked.

* :func:`run` jits one chunk of ``eval_every`` steps as a single ``lax.scan`` (compiled
  once), calls ``eval_fn(state)`` between chunks, shows a progress bar, stops on
  non-finite losses / parameters, and returns ``(state, History)``.
* :func:`run_traced` is the same loop fully traced (no host callbacks, no Python
  control flow on values): ``jax.grad`` and ``jax.vmap`` see through a whole run.

The pure pieces (:func:`step_keys`, :func:`run_traced`, :class:`History`,
:func:`summarize_info`, the scanned chunk) live in :mod:`jaxdec.loop`, below the
algorithms; they are re-exported here.

Example:
  >>> state, hist = jd.run(algo, state, sampler, key, 500, eval_every=50,
  ...                      eval_fn=lambda s: ev(s.params))
  >>> hist.eval["avg_model_acc"][-1]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.loop import (
    History,
    jit_with,
    positive_int,
    run_traced,
    scan_steps,
    step_keys,
    summarize_info,
)
from jaxdec.types import Algorithm, PyTree, Sampler

__all__ = ["History", "Diverged", "run", "run_traced", "summarize_info", "step_keys"]


class Diverged(RuntimeError):
    """Raised by :func:`run` with ``on_nonfinite="raise"``."""


def _sharding_pins(state: PyTree):
    """``(pin_state, pin_out)`` for a state on a multi-device mesh, else ``None``.

    ``pin_state`` constrains every leaf to the sharding it came in with (so dense
    contractions do not leave the worker axis replicated); ``pin_out`` makes
    outputs replicated, readable on every host of a multi-process run."""
    from jaxdec.sharding import is_worker_sharded

    mesh = is_worker_sharded(state)
    if mesh is None:
        return None
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(state)]
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pin_state(st):
        leaves, treedef = jax.tree.flatten(st)
        leaves = [
            jax.lax.with_sharding_constraint(x, s)
            if isinstance(s, jax.sharding.NamedSharding)
            else x
            for x, s in zip(leaves, shardings, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves)

    def pin_out(tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)

    return pin_state, pin_out


def _unaliased(state: PyTree) -> PyTree:
    """``state`` with repeated buffers (one array used as two leaves) copied, so
    each donated leaf is a distinct buffer."""
    seen: set[int] = set()

    def leaf(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return _device_copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(leaf, state)


def _device_copy(x: jax.Array) -> jax.Array:
    """A fresh buffer with the same value and sharding (a runtime copy: nothing to
    compile)."""
    try:
        return jax.device_put(x, x.sharding, may_alias=False)
    except TypeError:  # jax without may_alias
        return x.copy()


def _own_copy(state: PyTree) -> PyTree:
    """Device copies of the ``jax.Array`` leaves (same shardings), so donating them
    leaves the caller's buffers valid."""
    return jax.tree.map(
        lambda x: _device_copy(x) if isinstance(x, jax.Array) else x, state
    )


def run(
    algo: Algorithm,
    state: PyTree,
    sampler: Sampler,
    key: jax.Array,
    num_steps: int,
    *,
    eval_every: int | None = None,
    eval_fn: Callable[[PyTree], dict[str, Any]] | None = None,
    progress: bool = True,
    desc: str | None = None,
    jsonl: str | Path | None = None,
    reduce_info: Callable[[Any], dict[str, jax.Array]] = summarize_info,
    on_nonfinite: str = "stop",
    start_step: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 3,
    resume: bool = False,
    donate: bool | str = True,
    callback: Callable[[PyTree, int], PyTree | None] | None = None,
) -> tuple[PyTree, History]:
    """Run ``num_steps`` steps of ``algo`` from ``state``.

    The loop is ``state, info = algo.step(state, sampler(k_data_t, t), k_algo_t)``
    for ``t = start_step .. start_step + num_steps - 1`` (keys from
    :func:`step_keys`), scanned in chunks of ``eval_every`` steps, each chunk one
    compiled call. ``eval_fn(state)`` (jitted once) runs before training and after
    every chunk.

    Args:
      algo: an ``Algorithm(init, step)``.
      state: the algorithm state (from ``algo.init``); not modified.
      sampler: ``sampler(key, step) -> batch`` (jittable).
      key: PRNG key of the run.
      num_steps: number of steps (``>= 1``).
      eval_every: chunk length / evaluation period (default ``min(num_steps, 100)``).
      eval_fn: ``eval_fn(state) -> {name: scalar}``, jittable; optional (e.g.
        ``jd.metrics.evaluator(...)``, which reads ``state.params``).
      progress: show a tqdm progress bar.
      desc: progress bar label.
      jsonl: if given, write one JSON record per evaluation to this path.
      reduce_info: maps one step's ``Info`` to a dict of scalars.
      on_nonfinite: ``"stop"`` (stop after the chunk, keep the last state and set
        ``History.diverged_at``), ``"raise"`` (raise :class:`Diverged`) or
        ``"ignore"``.
      start_step: index of the first step (to resume a run by hand).
      checkpoint_dir: if given, write a checkpoint (state incl. optimizer states,
        the run key, the step and the history so far; see :mod:`jaxdec.checkpoint`)
        into this folder every ``checkpoint_every`` chunks and at the end. A chunk
        whose final state holds a non-finite value is never checkpointed, so after
        a divergence the newest checkpoint is the last good state.
      checkpoint_every: checkpoint period in chunks (of ``eval_every`` steps).
      keep_checkpoints: number of newest checkpoints kept.
      resume: continue from the newest valid checkpoint in ``checkpoint_dir`` (a
        fresh start if there is none). ``state`` is then only the template of the
        state's structure; the resumed trajectory, history and final state are bit
        for bit those of an uninterrupted run with the same arguments. A corrupt
        checkpoint is skipped (with a message) for the one before it.
      donate: XLA buffer donation of the state between chunks (results unchanged):
        ``True`` donates the run's own intermediate states (``state`` is copied
        once on device and stays valid), ``"input"`` also hands over the buffers
        of ``state`` itself (deleted afterwards; peak memory one state instead of
        two), ``False`` donates nothing.
      callback: host hook between chunks, ``callback(state, t)`` after the chunk
        ending at step ``t`` (after its evaluation, before its checkpoint). It may
        return a replacement state of the same structure (a host-side event: a
        clustering step, a hand-made schedule change, a data swap in the state),
        which the next chunk continues from; ``None`` keeps the state. Keep it a
        pure function of ``(state, t)`` so that runs stay reproducible and resumes
        exact. Chunk boundaries are every ``eval_every`` steps.

    Sharding: a ``state`` (and sampler) placed with
    :func:`jaxdec.sharding.shard_workers` runs sharded; every step's state is pinned
    to its input sharding, per-step summaries come back replicated (also across
    hosts), and the final state keeps the worker sharding.

    Divergence: with ``optax.apply_if_finite(opt, max_consecutive_errors)`` as the
    optimizer a worker skips updates whose gradient is non-finite; its loss is still
    reported non-finite, so pair it with ``on_nonfinite="ignore"``.

    Returns:
      ``(final_state, history)``.

    Raises:
      ValueError: bad arguments, a ``checkpoint_dir`` that already holds checkpoints
        without ``resume=True``, or a checkpoint that does not match this run.
      Diverged: non-finite values with ``on_nonfinite="raise"``.
    """
    num_steps = positive_int(num_steps, "num_steps")
    _check_run_args(algo, sampler, key, eval_fn)
    chunk_len = min(num_steps, 100) if eval_every is None else eval_every
    chunk_len = positive_int(chunk_len, "eval_every")
    if on_nonfinite not in ("stop", "raise", "ignore"):
        raise ValueError(
            f"on_nonfinite must be 'stop', 'raise' or 'ignore', got {on_nonfinite!r}."
        )
    checkpoint_every = positive_int(checkpoint_every, "checkpoint_every")
    if callback is not None and not callable(callback):
        raise ValueError(
            f"callback must be callable callback(state, step) -> state | None, got "
            f"{type(callback).__name__}."
        )
    if donate not in (True, False, "input"):
        raise ValueError(f"donate must be True, False or 'input', got {donate!r}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=<folder of checkpoints>.")
    start_step = int(start_step)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    end = start_step + num_steps
    ckpt, restored = None, None
    if checkpoint_dir is not None:
        from jaxdec import checkpoint as jckpt

        existing = jckpt.all_steps(checkpoint_dir)
        if existing and not resume:
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints (steps {existing[-3:]}); "
                "pass resume=True to continue from the newest, or use an empty folder."
            )
        if resume:
            restored = _restore_latest(
                jckpt, checkpoint_dir, state, key, start_step, end, existing
            )
        ckpt = jckpt.Checkpointer(checkpoint_dir, keep_checkpoints)
    chunks = {}
    pins = _sharding_pins(state)
    donated = (0,) if donate else ()

    def compiled(length):
        if length not in chunks:
            scan = scan_steps(algo, reduce_info, length, pins)
            chunks[length] = jit_with(scan, sampler, donated)
        return chunks[length]

    eval_jit = None
    if eval_fn is not None:
        pin_out = (lambda o: o) if pins is None else pins[1]
        eval_jit = jit_with(lambda s, fn: pin_out(fn(s)), eval_fn)
    hist = History()
    train_parts: list[dict[str, np.ndarray]] = []
    eval_steps, eval_rows = [], []

    def do_eval(s, t):
        if eval_jit is not None:
            eval_steps.append(t)
            eval_rows.append({k: float(v) for k, v in eval_jit(s).items()})

    bar = _progress_bar(num_steps, desc, progress)
    t = start_step
    if restored is None:
        do_eval(state, start_step)
        if donate:
            state = _own_copy(state) if donate is True else _unaliased(state)
    else:
        state, t = restored.tree["state"], restored.step
        old = restored.history
        if old is not None:
            if old.train:
                train_parts.append(dict(old.train))
            eval_steps.extend(int(v) for v in old.eval_steps)
            eval_rows.extend(
                {k: float(v[i]) for k, v in old.eval.items()}
                for i in range(len(old.eval_steps))
            )
            hist.wall_time.extend(old.wall_time)
        bar.update(t - start_step)

    def history_so_far() -> History:
        h = History(wall_time=list(hist.wall_time))
        _fill_history(h, train_parts, eval_steps, eval_rows)
        return h

    try:
        while t < end:
            length = min(chunk_len, end - t)
            tic = time.perf_counter()
            state, summ, finite = compiled(length)(state, key, jnp.int32(t))
            summ = jax.device_get(summ)
            hist.wall_time.append(time.perf_counter() - tic)
            train_parts.append({k: np.asarray(v) for k, v in summ.items()})
            t += length
            do_eval(state, t)
            bar.update(length)
            bar.set_postfix(_postfix(summ, eval_rows), refresh=False)
            if finite is not None and on_nonfinite != "ignore":
                finite = np.asarray(finite)
                if not finite.all():
                    bad_step, _ = np.argwhere(~finite)[0]
                    hist.diverged_at = int(t - length + bad_step)
                    hist.diverged_workers = np.flatnonzero(~finite[bad_step]).tolist()
                    msg = (
                        f"non-finite loss or parameters at step {hist.diverged_at} on "
                        f"workers {hist.diverged_workers[:20]}; lower the learning "
                        "rate or add optax.clip_by_global_norm."
                    )
                    if ckpt is not None:
                        last = jckpt.latest_step(checkpoint_dir)
                        msg += (
                            f" Last good checkpoint: step {last} in {checkpoint_dir}."
                        )
                    if on_nonfinite == "raise":
                        raise Diverged(msg)
                    bar.write("jaxdec.run: stopping: " + msg)
                    break
            if callback is not None:
                new_state = callback(state, t)
                if new_state is not None:
                    _check_same_structure(state, new_state)
                    state = new_state
            n_chunks = -(-(t - start_step) // chunk_len)
            if ckpt is not None and (n_chunks % checkpoint_every == 0 or t == end):
                if _tree_finite(state):
                    ckpt.save(
                        t,
                        {"state": state, "key": key},
                        history=history_so_far(),
                        metadata={"start_step": start_step, "eval_every": chunk_len},
                    )
                else:
                    bar.write(
                        f"jaxdec.run: state at step {t} holds non-finite values; not "
                        "checkpointed (the previous checkpoint is the last good one)."
                    )
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    _fill_history(hist, train_parts, eval_steps, eval_rows)
    if jsonl is not None:
        hist.to_jsonl(jsonl)
    return state, hist


def _check_same_structure(old: PyTree, new: PyTree) -> None:
    """A callback's replacement state must fit the compiled chunk."""
    a, b = jax.tree.structure(old), jax.tree.structure(new)
    if a != b:
        raise ValueError(
            f"callback returned a state with another structure ({b}) than the run's "
            f"({a}); return a state of the same type (e.g. state._replace(...)) or "
            "None."
        )
    for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
            raise ValueError(
                f"callback returned a leaf {jnp.result_type(y)}{list(jnp.shape(y))} "
                f"where the state has {jnp.result_type(x)}{list(jnp.shape(x))}; keep "
                "shapes and dtypes (the chunk is compiled for them)."
            )


def _fill_history(hist: History, train_parts, eval_steps, eval_rows) -> None:
    if train_parts:
        hist.train = {
            k: np.concatenate([p[k] for p in train_parts]) for k in train_parts[0]
        }
    hist.eval_steps = np.asarray(eval_steps, dtype=np.int64)
    if eval_rows:
        hist.eval = {k: np.asarray([r[k] for r in eval_rows]) for k in eval_rows[0]}


def _tree_finite(tree: PyTree) -> bool:
    """Every floating leaf of ``tree`` is finite: one reduction on the devices, only
    the flag comes back (works for sharded and multi-host state)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _restore_latest(jckpt, directory, state, key, start_step, end, steps):
    """Newest valid checkpoint of this run in ``directory`` (``None`` if none)."""
    import sys

    for s in reversed(steps):
        if s > end:
            raise ValueError(
                f"{directory} holds a checkpoint at step {s}, past the end of this run "
                f"(step {end}); raise num_steps or use another folder."
            )
        if s < start_step:
            break
        try:
            got = jckpt.restore(directory, {"state": state, "key": key}, step=s)
        except jckpt.CorruptCheckpoint as err:
            bad = Path(directory) / str(s)
            dest = bad.with_name(f"{s}.corrupt")
            k = 0
            while dest.exists():
                k += 1
                dest = bad.with_name(f"{s}.corrupt{k}")
            bad.rename(dest)  # out of the way of the resumed run, kept to inspect
            print(f"jaxdec.run: skipping: {err} Moved it to {dest}.", file=sys.stderr)
            continue
        saved_key = got.tree["key"]
        same = np.array_equal(
            np.asarray(jax.random.key_data(saved_key)),
            np.asarray(jax.random.key_data(key)),
        )
        if not same:
            raise ValueError(
                f"the checkpoint at step {s} in {directory} was written by a run with "
                "a different key; pass the same key to resume, or use another folder."
            )
        if got.metadata.get("start_step", start_step) != start_step:
            raise ValueError(
                f"the checkpoints in {directory} belong to a run that started at step "
                f"{got.metadata['start_step']}, not {start_step}; pass the same "
                "start_step to resume."
            )
        return got
    return None


def _check_run_args(algo, sampler, key, eval_fn) -> None:
    """Raise ``ValueError`` for driver arguments that cannot work, before compiling."""
    if not (
        callable(getattr(algo, "init", None)) and callable(getattr(algo, "step", None))
    ):
        raise ValueError(
            f"algo must be an Algorithm(init, step) such as "
            f"jd.algorithms.dsgd(...), got {type(algo).__name__}."
        )
    if not callable(sampler):
        raise ValueError(
            "sampler must be callable sampler(key, step) -> batch, e.g. "
            f"jd.data.make_sampler(data, batch_size); got {type(sampler).__name__}."
        )
    if eval_fn is not None and not callable(eval_fn):
        raise ValueError(
            f"eval_fn must be callable or None, got {type(eval_fn).__name__}."
        )
    typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    raw = (
        not typed
        and hasattr(key, "dtype")
        and np.dtype(key.dtype) == np.uint32
        and tuple(np.shape(key)) == (2,)
    )
    if not ((typed and np.shape(key) == ()) or raw):
        raise ValueError(
            f"key must be one PRNG key, e.g. jax.random.key(0); got "
            f"{type(key).__name__} {getattr(key, 'dtype', '')}{list(np.shape(key))}."
        )


_POSTFIX_KEYS = {
    "avg_model_acc": "avg_acc",
    "local_acc_mean": "local_acc",
    "consensus_distance": "consensus",
}


def _postfix(summ: dict, eval_rows: list[dict]) -> dict[str, str]:
    out = {}
    if "loss" in summ:
        out["loss"] = f"{float(np.mean(summ['loss'])):.4f}"
    if eval_rows:
        last = eval_rows[-1]
        preferred = [k for k in _POSTFIX_KEYS if k in last]
        for k in preferred or list(last)[:3]:
            out[_POSTFIX_KEYS.get(k, k)] = f"{last[k]:.4g}"
    return out


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, *a, **k):
        pass

    def write(self, s):
        print(s)

    def close(self):
        pass


def _progress_bar(total: int, desc: str | None, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or "jaxdec", unit="step", dynamic_ncols=True)
