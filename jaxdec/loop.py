"""The pure stepping core under every driver: step keys, scanned chunks, summaries.

The stepping functions here are jittable and host-free, and the module sits below
the algorithms in the layering (it imports only :mod:`jaxdec.types`), so
algorithm-specific drivers (:func:`jaxdec.algorithms.run_fedtsdp`) and the
differentiable unrolls of :mod:`jaxdec.hyper` build on it without importing the
driver :mod:`jaxdec.run`.

* :func:`step_keys`: step ``t`` uses ``split(fold_in(key, t))`` as (data, algorithm)
  keys, so a trajectory is a pure function of ``key``, however it is chunked.
* :func:`scan_steps`: ``length`` steps as one ``lax.scan`` with per-step summaries.
* :func:`jit_with`: ``jit`` with a sampler / evaluator passed as data when it is a
  pytree of arrays (not compiled in as constants), closed over otherwise.
* :func:`run_traced`: a whole run as one traced scan (``jax.grad`` / ``jax.vmap``
  see through it).
* :class:`History`, :func:`summarize_info`: what a run records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.types import Algorithm, PyTree, Sampler

__all__ = [
    "History",
    "summarize_info",
    "step_keys",
    "scan_steps",
    "jit_with",
    "is_data_pytree",
    "run_traced",
    "positive_int",
]


@dataclasses.dataclass
class History:
    """What a run recorded.

    Attributes:
      train: per-step training diagnostics, ``{name: array [num_steps_done]}``
        (worker-axis fields of ``Info`` are averaged over workers, flags reduced).
      eval_steps: steps at which ``eval_fn`` ran (0 = before training).
      eval: ``{name: array [len(eval_steps)]}``.
      wall_time: seconds spent per chunk (compile included in the first).
      diverged_at: first step with a non-finite worker, or ``None``.
      diverged_workers: indices of the non-finite workers at that step.
    """

    train: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    eval_steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
    eval: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    wall_time: list[float] = dataclasses.field(default_factory=list)
    diverged_at: int | None = None
    diverged_workers: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """Number of training steps recorded."""
        return len(next(iter(self.train.values()))) if self.train else 0

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per evaluation point (train metrics averaged over
        the steps since the previous evaluation)."""
        out = []
        prev = 0
        for k, s in enumerate(self.eval_steps):
            rec: dict[str, Any] = {"step": int(s)}
            for name, v in self.train.items():
                if s > prev:
                    rec[f"train_{name}"] = float(np.mean(v[prev:s]))
            for name, v in self.eval.items():
                rec[name] = float(v[k])
            out.append(rec)
            prev = int(s)
        return out

    def to_jsonl(self, path: str | Path) -> None:
        """Write :meth:`records` as JSON lines."""
        with open(path, "w") as f:
            for rec in self.records():
                f.write(json.dumps(rec) + "\n")


def summarize_info(info: Any) -> dict[str, jax.Array]:
    """Reduce an algorithm's ``Info`` to scalars per step.

    Leaves with a leading worker axis are averaged (boolean flags: ``all``); fields
    named ``finite`` become ``nonfinite_workers`` (a count). ``None`` fields are
    dropped; nested ``aux`` dicts are flattened as ``aux_<key>``.
    """
    fields = info._asdict() if hasattr(info, "_asdict") else dict(info)
    out: dict[str, jax.Array] = {}
    for name, v in fields.items():
        if v is None:
            continue
        if name == "finite":
            out["nonfinite_workers"] = jnp.sum(~v.astype(bool)).astype(jnp.int32)
            continue
        if isinstance(v, dict):
            for k, leaf in v.items():
                out[f"{name}_{k}"] = jnp.mean(leaf)
            continue
        v = jnp.asarray(v)
        out[name] = (
            jnp.all(v) if v.dtype == jnp.bool_ else jnp.mean(v.astype(jnp.float32))
        )
    return out


def step_keys(key: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data and algorithm keys of step ``t``: ``split(fold_in(key, t))``.

    Args:
      key: the run's PRNG key.
      t: the step index (int32 scalar, may be traced).

    Returns:
      ``(k_data, k_algo)``: the sampler's key and ``algo.step``'s key of step ``t``.
    """
    k_data, k_algo = jax.random.split(jax.random.fold_in(key, t))
    return k_data, k_algo


def scan_steps(
    algo: Algorithm,
    reduce: Callable[[Any], dict[str, jax.Array]],
    length: int,
    pin: tuple[Callable, Callable] | None = None,
) -> Callable:
    r"""``length`` steps of ``algo`` as one ``lax.scan`` (not jitted: wrap it).

    Step ``t`` computes :math:`(k^d_t, k^a_t) = \mathrm{split}(\mathrm{fold\_in}(key,
    t))`, :math:`s_{t+1}, \mathrm{info}_t = \mathrm{step}(s_t,
    \mathrm{sampler}(k^d_t, t), k^a_t)` and records ``reduce(info_t)``.

    Args:
      algo: an ``Algorithm(init, step)``.
      reduce: per-step summary of ``Info`` (e.g. :func:`summarize_info`).
      length: number of steps in the chunk.
      pin: ``(pin_state, pin_out)`` for sharded runs: pins the carried state to
        its input sharding at every step and the summaries to replicated.

    Returns:
      ``chunk(state, key, start, sampler) -> (state, summaries, finite)`` with
      summaries ``[length]`` per name and ``finite`` the per-step worker flags of
      ``Info.finite`` (``None`` when the algorithm has none).
    """

    def chunk(state, key, start, sampler):
        def body(st, t):
            k_data, k_algo = step_keys(key, t)
            with jax.named_scope("sample"):  # profile labels
                batch = sampler(k_data, t)
            st, info = algo.step(st, batch, k_algo)
            if pin is not None:
                st = pin[0](st)
            with jax.named_scope("summaries"):
                summ = reduce(info)
            return st, (summ, getattr(info, "finite", None))

        ts = start + jnp.arange(length, dtype=jnp.int32)
        state, (summ, finite) = jax.lax.scan(body, state, ts)
        if pin is not None:
            summ, finite = pin[1]((summ, finite))
        return state, summ, finite

    return chunk


def is_data_pytree(fn: Any) -> bool:
    """True for callables whose pytree leaves are arrays (``jax.tree_util.Partial``
    samplers / evaluators): those are passed to jit as arguments, so their data
    are not compiled into the program as constants."""
    leaves = jax.tree.leaves(fn)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)


def jit_with(fn: Callable, obj: Any, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """``jit(fn)`` called as ``g(*args) = fn(*args, obj)``.

    Args:
      fn: function whose last argument is ``obj``.
      obj: a sampler / evaluator. When it is a pytree of arrays
        (:func:`is_data_pytree`) it is passed to the jitted function as an
        argument, so its data are not compiled in as constants; otherwise it is
        closed over.
      donate_argnums: forwarded to ``jax.jit`` (positions in ``args``).

    Returns:
      ``g(*args)``.
    """
    if is_data_pytree(obj):
        jitted = jax.jit(fn, donate_argnums=donate_argnums)
        return lambda *args: jitted(*args, obj)
    return jax.jit(lambda *args: fn(*args, obj), donate_argnums=donate_argnums)


def run_traced(
    algo: Algorithm,
    state: PyTree,
    sampler: Sampler,
    key: jax.Array,
    num_steps: int,
    *,
    start_step: int = 0,
    reduce_info: Callable[[Any], dict[str, jax.Array]] = summarize_info,
    checkpoint_every: int | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Fully traced run: one ``lax.scan`` over ``num_steps`` (no host callbacks).

    Same trajectory as :func:`run` with the same arguments. Differentiable with
    ``jax.grad`` (e.g. with respect to hyperparameters closed over by ``algo``) and
    vmappable. Pass large-data samplers into your jitted function as arguments
    (they are pytrees) rather than closing over them, so the data are not
    compiled in as constants. With ``checkpoint_every=c`` the scan is split into
    ``num_steps / c`` rematerialized chunks (``jax.checkpoint``), bounding
    reverse-mode memory.

    Returns:
      ``(final_state, per_step_summaries)`` where each summary is ``[num_steps]``.
    """
    num_steps = positive_int(num_steps, "num_steps")
    if checkpoint_every is None:
        chunk = scan_steps(algo, reduce_info, num_steps)
        state, summ, _ = chunk(state, key, jnp.int32(start_step), sampler)
        return state, summ
    c = positive_int(checkpoint_every, "checkpoint_every")
    if num_steps % c:
        raise ValueError(
            f"checkpoint_every={c} must divide num_steps={num_steps}; pick a divisor."
        )
    chunk = scan_steps(algo, reduce_info, c)
    inner = jax.checkpoint(lambda st, start: chunk(st, key, start, sampler))

    def outer(st, start):
        st, summ, _ = inner(st, start)
        return st, summ

    starts = start_step + c * jnp.arange(num_steps // c, dtype=jnp.int32)
    state, summ = jax.lax.scan(outer, state, starts)
    return state, jax.tree.map(lambda v: v.reshape(num_steps, *v.shape[2:]), summ)


def positive_int(v: Any, name: str) -> int:
    """``int(v)`` if ``v`` is an integer ``>= 1``, else a ``ValueError`` naming it."""
    if isinstance(v, bool) or int(v) != v or int(v) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
    return int(v)
