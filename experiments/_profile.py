"""Per-XLA-op times of one compiled program, with the FLOPs of every matmul in it.

Used by ``bench.py`` to show where the time of the vmapped gradient goes: which
dots (and at what achieved GFLOP/s) and which elementwise / reduction fusions.

Times come from JAX's profiler (``jax.profiler.trace``, exported as a Perfetto
trace). XLA:CPU records one event per executed op only with
``--xla_cpu_enable_xprof_traceme=true`` in ``XLA_FLAGS`` before JAX starts its
backend (:data:`TRACEME_FLAG`; ``bench.py`` sets it); GPU kernels are recorded by
the profiler anyway. Without events :func:`op_times` returns ``{}`` and the report
leaves the table out.

FLOPs are read from the optimized HLO text (``compiled.as_text()``): a ``dot`` is
``2 * prod(output dims) * prod(lhs contracting dims)``; a fusion counts the dots of
the computation it calls, so a dot inside a library fusion (XNNPACK / YNNPACK on
CPU, a Triton GEMM on GPU) is still counted; a cuBLAS GEMM custom call is counted
from its ``dot_dimension_numbers``. Each op is put in a phase of the step
(:func:`phase`) by the JAX name stack XLA keeps in its metadata.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"

_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)"
    r"\s+([\w\-]+)\((.*)$"
)
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")


def _dims(shape: str) -> tuple[int, ...] | None:
    m = _SHAPE.match(shape)
    if m is None:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def parse_hlo(text: str) -> tuple[dict, str | None]:
    """Computations of an HLO module text.

    Returns ``(comps, entry)``: ``comps[name][instr] = (dims, opcode, rest)`` with
    ``rest`` the text after the opcode's ``(``; ``entry`` is the ENTRY name.
    """
    comps: dict[str, dict] = {}
    entry, cur = None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("(")[0]:
                cur = m.group(2)
                comps[cur] = {}
                entry = cur if m.group(1) else entry
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            comps[cur][name] = (_dims(shape), opcode, rest)
    return comps, entry


def _operands(rest: str) -> list[str]:
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    return re.findall(r"%([\w.\-]+)", rest[: i - 1])


def _contracting(rest: str) -> list[int] | None:
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    if m is None:  # GEMM custom calls carry the dimension numbers as JSON
        m = re.search(r'"lhs_contracting_dimensions":\[([0-9",]*)\]', rest)
    if m is None:
        return None
    return [int(d) for d in m.group(1).replace('"', "").split(",") if d]


def _dot_shape(comps: dict, comp: str, name: str) -> tuple[float, str] | None:
    """FLOPs and ``batch x [M x K] . [K x N]`` of a dot (or GEMM custom call)."""
    dims, _, rest = comps[comp][name]
    ops, contract = _operands(rest), _contracting(rest)
    lhs = comps[comp].get(ops[0]) if ops else None
    if dims is None or lhs is None or lhs[0] is None or contract is None:
        return None
    m = re.search(r"lhs_batch_dims=\{([0-9,]*)\}", rest) or re.search(
        r'"lhs_batch_dimensions":\[([0-9",]*)\]', rest
    )
    bdims = [int(d) for d in m.group(1).replace('"', "").split(",") if d] if m else []
    b = math.prod(lhs[0][d] for d in bdims)
    k = math.prod(lhs[0][d] for d in contract)
    mm = math.prod(lhs[0]) // max(b * k, 1)
    nn = math.prod(dims) // max(b * mm, 1)
    desc = f"{b} x [{mm}x{k}].[{k}x{nn}]" if b > 1 else f"[{mm}x{k}].[{k}x{nn}]"
    return 2.0 * math.prod(dims) * k, desc


def _dots(comps: dict, comp: str, name: str, seen: frozenset = frozenset()) -> list:
    """``(flops, desc)`` of every dot that executing instruction ``name`` runs
    itself: its own, or those of the computation a fusion calls (the bodies of
    loops and calls are not counted: their ops are profiled on their own)."""
    _, opcode, rest = comps[comp][name]
    head = rest.split("metadata=")[0]
    if opcode == "dot" or (opcode == "custom-call" and "gemm" in head.lower()):
        d = _dot_shape(comps, comp, name)
        return [d] if d else []
    if opcode != "fusion":
        return []
    called = re.findall(r"calls=%?([\w.\-]+)", head)
    return [
        d
        for c in called
        if c in comps and c not in seen
        for i in comps[c]
        for d in _dots(comps, c, i, seen | {comp})
    ]


PHASES = ("gradient", "gossip", "sample", "diagnostics", "other")


def phase(op_name: str) -> str:
    """The step phase of an op, from the ``op_name`` (JAX name stack) XLA keeps in
    its metadata: jaxdec labels its ops with ``jax.named_scope`` (``grad``,
    ``gossip``, ``sample``, ``consensus_distance``, ``all_finite``); autodiff ops
    carry ``jvp(``. A fusion carries the name of its root op."""
    if "/grad/" in op_name or "jvp(" in op_name:
        return "gradient"
    if "/gossip" in op_name:
        return "gossip"
    if "/sample" in op_name:
        return "sample"
    if "consensus_distance" in op_name or "all_finite" in op_name:
        return "diagnostics"
    return "other"


def module_ops(text: str) -> dict[str, dict]:
    """Every instruction of an HLO module that runs as an op (not inside a fusion
    or a reducer; names are unique in a module): output dims, opcode, matmul FLOPs,
    the shapes of the dots it runs (``batch x [M x K].[K x N]``), its ``op_name``
    and :func:`phase`."""
    comps, _ = parse_hlo(text)
    inner = {  # fused computations and reducers: no ops of their own at run time
        c
        for instrs in comps.values()
        for _, op, rest in instrs.values()
        for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
        if op != "call"
    }
    out = {}
    for comp, instrs in comps.items():
        if comp in inner:
            continue
        for name, (d, op, rest) in instrs.items():
            dots = _dots(comps, comp, name)
            m = re.search(r'op_name="([^"]*)"', rest)
            op_name = m.group(1) if m else ""
            out[name] = {
                "dims": d,
                "opcode": op,
                "flops": sum(f for f, _ in dots),
                "dots": [s for _, s in dots],
                "op_name": op_name,
                "phase": phase(op_name),
            }
    return out


def _events(trace_dir: str) -> list[dict]:
    files = sorted(Path(trace_dir).rglob("*.json.gz"))
    if not files:
        return []
    with gzip.open(files[-1]) as f:
        data = json.loads(f.read())
    return data["traceEvents"] if isinstance(data, dict) else data


def op_times(call: Callable[[], object], module: str, repeats: int) -> dict:
    """Mean seconds per call of each HLO op of ``module`` over ``repeats`` profiled
    calls of ``call`` (already warm); ``{}`` when the profiler records no op."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(call())
        events = _events(d)
    acc: dict[str, float] = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        mine = args.get("hlo_module", module) == module
        if e.get("ph") == "X" and "hlo_op" in args and mine:
            acc[args["hlo_op"]] += float(e["dur"]) * 1e-6
    return {k: v / repeats for k, v in acc.items()}


def module_name(text: str) -> str:
    m = re.match(r"HloModule\s+([\w.\-]+)", text)
    return m.group(1) if m else ""


def _row(name: str, info: dict, s: float, total: float) -> dict:
    fl = info["flops"]
    return {
        "op": name,
        "opcode": info["opcode"],
        "phase": info["phase"],
        "dims": list(info["dims"]) if info["dims"] else None,
        "dots": info["dots"],
        "s": s,
        "share": s / total,
        "flops": fl,
        "flops_per_s": fl / s if fl and s > 0 else None,
    }


def profile(
    call: Callable[[], object],
    hlo_text: str,
    repeats: int = 5,
    *,
    per: int = 1,
    top: int = 12,
) -> dict:
    """Profile ``call`` (a warm call of the compiled program whose optimized HLO is
    ``hlo_text``); times are divided by ``per`` (e.g. the steps of a scanned chunk).

    Returns ``{}`` when the profiler records no op (XLA:CPU without
    :data:`TRACEME_FLAG`), else a dict with

    * ``op_sum_s``: summed op time per ``per`` (above the wall time when
      independent ops run concurrently);
    * ``phases``: seconds per :data:`PHASES` entry; ``phase_flops``: matmul FLOPs
      per phase;
    * ``ops``: the ``top`` slowest ops (seconds, share of ``op_sum_s``, phase,
      opcode, output dims, dots, FLOPs, FLOP/s), then one ``(other K ops)`` row.
    """
    ops = module_ops(hlo_text)
    times = op_times(call, module_name(hlo_text), repeats)
    if not times:
        return {}
    unknown = {"dims": None, "opcode": "?", "flops": 0.0, "dots": [], "phase": "other"}
    times = {k: v / per for k, v in times.items()}
    total = sum(times.values())
    rows = [
        _row(k, ops.get(k, unknown), s, total)
        for k, s in sorted(times.items(), key=lambda kv: -kv[1])
    ]
    phases = dict.fromkeys(PHASES, 0.0)
    phase_flops = dict.fromkeys(PHASES, 0.0)
    for r in rows:
        phases[r["phase"]] += r["s"]
        phase_flops[r["phase"]] += r["flops"]
    if len(rows) > top:
        rest = rows[top:]
        merged = {
            "dims": None,
            "opcode": "",
            "flops": sum(r["flops"] for r in rest),
            "dots": [],
            "phase": "",
        }
        s = sum(r["s"] for r in rest)
        rows = [*rows[:top], _row(f"(other {len(rest)} ops)", merged, s, total)]
    return {
        "op_sum_s": total,
        "phases": phases,
        "phase_flops": phase_flops,
        "ops": rows,
    }
