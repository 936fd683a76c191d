"""The gradient's batched matmuls on this CPU: XLA against a tuned library kernel.

The vmapped gradient of one worker's MLP 64-64-10 loss (batch 32) runs five matmuls
per worker (``experiments/bench.py`` finds them in the optimized HLO of the D-SGD
step). This script times each of them for ``n`` workers, in one run, as

* ``xla``: the batched dot as ``jax.jit`` compiles it on one device (the program
  ``bench.py`` times; XLA:CPU runs it on one core);
* ``xla D=K``: the same with the worker axis over ``K`` devices (one per core);
* ``mkl T=1`` / ``mkl T=K``: Intel MKL's ``cblas_sgemm_batch_strided`` with one and
  ``K`` threads (``pip install mkl``; looked up in ``sys.prefix/lib``, or pass
  ``--mkl PATH``), outputs preallocated, called through ``ctypes``;

against the ``f32`` matmul peak measured in the same run (``2048 x 2048``, XLA). MKL's
batched GEMM is a vendor kernel tuned for this shape class, so the table says how
much of the gradient's distance to the peak is XLA's and how much the shapes' own
(``[32 x 64] . [64 x 10]`` cannot fill a vector unit the way a large matmul does).
The ``all five`` row divides their FLOPs by their summed time: the best the
gradient's matmuls can do with that kernel, before any elementwise work. Every
variant is checked against ``numpy.einsum`` (``max_abs_err``).

    python experiments/bench_dots.py                 # n = 256, 1024; 2 devices
    python experiments/bench_dots.py --n 4096 --devices 2 --mkl /path/libmkl_rt.so.2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_dots"

# (name, role, M, K, N, A transposed, B transposed): C[M, N] = op(A) op(B) per worker;
# A is stored [K, M] when transposed, B is stored [N, K]. MLP 64-64-10, batch 32.
DOTS = (
    ("[32x64].[64x64]", "first layer, forward", 32, 64, 64, False, False),
    ("[64x32].[32x64]", "first layer, weight gradient", 64, 32, 64, True, False),
    ("[32x64].[64x10]", "output layer, forward", 32, 64, 10, False, False),
    ("[32x10].[10x64]", "output layer, input gradient", 32, 10, 64, False, True),
    ("[64x32].[32x10]", "output layer, weight gradient", 64, 32, 10, True, False),
)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024], help="workers")
    p.add_argument("--devices", type=int, default=2, help="fake K CPU devices")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=20, help="calls per timing")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--mkl", default=None, help="path of libmkl_rt (default: search)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    import jax

    jax.config.update("jax_num_cpu_devices", ARGS.devices)

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import Peak, _best, machine_end, machine_info, markdown_machine  # noqa: E402

import jaxdec as jd  # noqa: E402


def operands(n: int, dot: tuple, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ``A, B`` of one dot for ``n`` workers, in their stored layouts."""
    _, _, M, K, N, ta, tb = dot
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, K, M) if ta else (n, M, K), dtype=np.float32)
    b = rng.standard_normal((n, N, K) if tb else (n, K, N), dtype=np.float32)
    return a, b


def subscripts(dot: tuple) -> str:
    """``einsum`` subscripts of ``C[w, m, j] = sum_k op(A)[w, m, k] op(B)[w, k, j]``."""
    ta, tb = dot[5], dot[6]
    return f"{'wkm' if ta else 'wmk'},{'wjk' if tb else 'wkj'}->wmj"


# ------------------------------------------------------------------------ MKL


def find_mkl(path: str | None = None) -> str | None:
    """``libmkl_rt`` from ``path``, ``$MKL_RT`` or the ``mkl`` wheel's
    ``sys.prefix/lib`` (``None`` if there is none)."""
    cands = [path, os.environ.get("MKL_RT")]
    cands += [
        os.path.join(sys.prefix, "lib", f"libmkl_rt.so{v}") for v in (".3", ".2", "")
    ]
    return next((c for c in cands if c and os.path.exists(c)), None)


class MKL:
    """``cblas_sgemm_batch_strided`` (row-major) through ``ctypes``."""

    ROW, NOTRANS, TRANS = 101, 111, 112

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        self.lib.cblas_sgemm_batch_strided.restype = None
        self.version = self._version()

    def _version(self) -> str:
        buf = ctypes.create_string_buffer(256)
        try:
            self.lib.MKL_Get_Version_String(buf, 256)
        except AttributeError:
            return "unknown"
        return buf.value.decode(errors="replace").strip()

    def threads(self, t: int) -> None:
        self.lib.MKL_Set_Num_Threads(ctypes.c_int(t))

    def call(self, dot: tuple, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        _, _, M, K, N, ta, tb = dot
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self.lib.cblas_sgemm_batch_strided(
            i(self.ROW),
            i(self.TRANS if ta else self.NOTRANS),
            i(self.TRANS if tb else self.NOTRANS),
            i(M), i(N), i(K), f(1.0),
            p(a.ctypes.data), i(M if ta else K), i(M * K),
            p(b.ctypes.data), i(K if tb else N), i(K * N), f(0.0),
            p(c.ctypes.data), i(N), i(M * N),
            i(a.shape[0]),
        )  # fmt: skip


# --------------------------------------------------------------------- timing


def time_dot(dot, n, mesh, mkl, calls, repeats) -> dict:
    """Seconds per call of one dot for ``n`` workers, every variant, and each
    variant's largest deviation from ``numpy.einsum``."""
    a, b = operands(n, dot)
    ref = np.einsum(subscripts(dot), a, b)
    f = jax.jit(lambda x, y: jnp.einsum(subscripts(dot), x, y))
    out = {"s": {}, "max_abs_err": {}}

    def record(name, fn):  # best per-call time of `calls` calls in a row
        out["s"][name] = _best(lambda: [fn() for _ in range(calls)][-1], repeats)
        out["s"][name] /= calls
        out["max_abs_err"][name] = float(np.max(np.abs(np.asarray(fn()) - ref)))

    xa, xb = (
        jax.device_put(a, mesh.devices.flat[0]),
        jax.device_put(b, mesh.devices.flat[0]),
    )
    record("xla", lambda: f(xa, xb))
    D = mesh.devices.size
    if D > 1 and n % D == 0:
        sh = NamedSharding(mesh, PartitionSpec(jd.sharding.AXIS))
        sa, sb = jax.device_put(a, sh), jax.device_put(b, sh)
        record(f"xla D={D}", lambda: f(sa, sb))
    if mkl is not None:
        c = np.empty_like(ref)
        for t in sorted({1, D}):
            mkl.threads(t)

            def batched(c=c):
                mkl.call(dot, a, b, c)
                return c

            record(f"mkl T={t}", batched)
    return out


def run(args) -> dict:
    machine = machine_info()
    mesh = jd.sharding.worker_mesh()
    path = find_mkl(args.mkl)
    mkl = MKL(path) if path else None
    peak = Peak(args.peak_size)
    peak.measure(args.repeats)
    rows = []
    for n in args.n:
        for dot in DOTS:
            r = time_dot(dot, n, mesh, mkl, args.calls, args.repeats)
            _, _, M, K, N, _, _ = dot
            r.update(n=n, dot=dot[0], role=dot[1], flops=2.0 * n * M * K * N)
            rows.append(r)
            peak.measure(args.repeats)
    return {
        "machine": machine_end(machine),
        "config": {"n": args.n, "devices": mesh.devices.size, "calls": args.calls},
        "mkl": {"path": path, "version": mkl.version if mkl else None},
        "peak_flops_per_s": peak.best,
        "peak_size": args.peak_size,
        "rows": rows,
        "all_five": {str(n): totals([r for r in rows if r["n"] == n]) for n in args.n},
    }


def totals(rows: list[dict]) -> dict:
    """FLOPs of all five dots over their summed time, per variant (variants that
    ran every dot)."""
    names = set.intersection(*(set(r["s"]) for r in rows))
    flops = sum(r["flops"] for r in rows)
    return {k: flops / sum(r["s"][k] for r in rows) for k in sorted(names)}


def markdown(report: dict) -> str:
    rows, peak, cfg = report["rows"], report["peak_flops_per_s"], report["config"]
    names = list(rows[0]["s"])
    mkl = report["mkl"]

    def cell(v):
        return f"{v / 1e9:.1f} ({v / peak:.0%})"

    md = [
        "# The gradient's batched matmuls: XLA against MKL",
        "",
        *markdown_machine(report),
        f"- workers: n = {', '.join(map(str, cfg['n']))}; every dot timed "
        f"{cfg['calls']} calls at a time, best of the timings",
        "- MKL: "
        + (
            f"`{mkl['version']}` (`cblas_sgemm_batch_strided`)"
            if mkl["path"]
            else "not installed (`pip install mkl`, or `--mkl PATH`)"
        ),
        "",
        "GFLOP/s (share of the measured peak) per dot; `xla` is one device, "
        "`xla D=K` the worker axis over K devices, `mkl T=t` MKL with t threads. "
        "`all five`: their FLOPs over their summed time.",
        "",
        "| n | dot (n workers x) | role | " + " | ".join(names) + " |",
        "|---:|---|---|" + "---:|" * len(names),
    ]
    for n in cfg["n"]:
        for r in (r for r in rows if r["n"] == n):
            vals = " | ".join(cell(r["flops"] / r["s"][k]) for k in names)
            md.append(f"| {n} | `{r['dot']}` | {r['role']} | {vals} |")
        tot = report["all_five"][str(n)]
        md.append(
            f"| {n} | **all five** | the gradient's matmuls | "
            + " | ".join(cell(tot[k]) if k in tot else "-" for k in names)
            + " |"
        )
    err = max(max(r["max_abs_err"].values()) for r in rows)
    md += ["", f"Largest deviation from `numpy.einsum` over all variants: {err:.1e}."]
    return "\n".join(md) + "\n"


def main(args) -> None:
    tic = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - tic
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_dots.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "bench_dots.md").write_text(md)
    print(md)
    print(f"wrote {out}/bench_dots.json, bench_dots.md")


if __name__ == "__main__":
    main(ARGS)
