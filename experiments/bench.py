"""jaxdec benchmark suite: throughput, time breakdown, FLOP/s, compile time, memory.

One D-SGD step of an MLP on digits (every worker holds 64 training digits, batch 32,
SGD, ring gossip) is timed for worker counts ``n = 16 .. 16384`` as

* ``dense``:   ``jd.gossip.dense(W)``, one ``(n, n)`` matrix product per leaf;
* ``sparse``:  ``jd.gossip.sparse(W)``, rolls of the worker axis;
* ``sharded``: ``jd.sharding.ppermute_gossip(W, mesh)`` with state and data sharded
  over all local devices (``shard_map`` + ``lax.ppermute``; ``D = 1`` on a plain CPU,
  ``--devices K`` fakes ``K`` CPU devices);
* ``loop``:    the same math as a Python loop over workers (a jitted one-worker
  gradient step, then a jitted one-worker neighbour average), in the same run; its
  first step is checked against the vmapped step (``loop_max_abs_diff``).

Every vmapped variant is the program ``jd.run`` compiles (a ``lax.scan`` of steps
with per-step summaries, state donated). The sparse step is profiled
(``experiments/_profile.py``: JAX's profiler for the time of every XLA op, the
optimized HLO for the matmuls each op runs, jaxdec's ``jax.named_scope`` labels for
its phase): the report splits the step into gradient / gossip / sampling /
diagnostics / rest, gives the gradient's matmul FLOP/s inside the step against this
machine's measured ``f32`` matmul peak, and lists the slowest ops with their dots.
The vmapped gradient is also timed as a program of its own (``alone``; with the
worker axis over the devices too), and gossip, sampling and the diagnostics alone
(``frac_*`` in the JSON, the breakdown used where the backend records no ops). Compile
time and the compiled program's memory per worker (XLA buffer assignment: arguments
+ outputs - donated + temporaries) are recorded too. ``--memory`` (on by default)
adds bytes per worker and workers per GiB for the MLP and LeNet-5 in float32,
bfloat16 storage (``jd.sharding.cast_floats`` + ``float32_loss``) and with
``jax.checkpoint`` on the loss.

Runs on whatever backend JAX picks: on a GPU the report names the GPU
(``device_kind``), the full sizes go on to 65536 and 131072 workers, every row
records the device's peak memory in use, and two more target lines check the
accelerator claims (>= 1e6 worker-steps/s for the MLP on digits, >= 1e5 workers
stepped in device memory). The load average before and after is recorded: numbers
from a busy machine are marked as such.

    python experiments/bench.py            # full (sizes 16 .. 16384; GPU: .. 131072)
    python experiments/bench.py --quick    # seconds: 16 .. 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"  # bench/ on CPU, bench_gpu/ on a GPU


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, seconds")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dense-max", type=int, default=None)
    p.add_argument("--loop-max", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=[64])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--devices", type=int, default=None, help="fake K CPU devices")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-n", type=int, default=None)
    p.add_argument("--peak-size", type=int, default=None, help="matmul N for the peak")
    p.add_argument(
        "--profile-n", type=int, default=None, help="n of the per-op table of the step"
    )
    p.add_argument(
        "--out", default=None, help="default: results/bench (CPU), bench_<backend>"
    )
    a = p.parse_args(argv)
    full = not a.quick
    a.default_sizes = a.sizes is None and full  # extended on an accelerator
    a.sizes = a.sizes or ([16, 64, 256, 1024, 4096, 16384] if full else [16, 64, 256])
    a.dense_max = a.dense_max or (4096 if full else 256)
    a.loop_max = a.loop_max or (1024 if full else 64)
    a.memory_n = a.memory_n or (1024 if full else 64)
    a.repeats = a.repeats or (3 if full else 2)
    if a.profile_n is None:  # the loop's size, 1024, or the largest size below it
        a.profile_n = max((n for n in a.sizes if n <= 1024), default=a.sizes[0])
    return a


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts its backend: XLA:CPU per-op profiler events
    from _profile import TRACEME_FLAG

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACEME_FLAG}"
if ARGS is not None and ARGS.devices:
    import jax

    jax.config.update("jax_num_cpu_devices", ARGS.devices)

import _profile  # noqa: E402  (experiments/, beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxdec as jd  # noqa: E402
from jaxdec import sharding  # noqa: E402
from jaxdec.run import step_keys  # noqa: E402

LR = 0.05
PER_WORKER = 64
_DIGITS = {}


# ---------------------------------------------------------------------- machine


def _cpu_stat() -> list[int] | None:
    """Jiffies of all CPUs from ``/proc/stat`` (Linux): ``[total, steal]``, or
    ``None`` elsewhere. The steal share over the run says how much of the CPU a
    virtual machine's host took away (another source of run-to-run spread)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return [sum(v[:8]), v[7]] if len(v) >= 8 else None


def steal_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Fraction of CPU time stolen by the hypervisor between two :func:`_cpu_stat`."""
    if not start or not end or end[0] <= start[0]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


_SIMD = ("avx512f", "avx2", "avx", "sse4_2", "sve", "asimd")  # widest first


def cpu_model(cpuinfo: str) -> dict:
    """The CPU's model name and widest vector ISA from ``/proc/cpuinfo`` text
    (``{"model": None, "simd": None}`` where it names neither). The matmul peak and
    the small batched dots move with both (AVX-512 doubles the peak, not the dots),
    so CPU figures must say which CPU gave them."""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if model is None and k in ("model name", "cpu model", "hardware"):
            model = v.strip() or None
        elif k in ("flags", "features") and not flags:
            flags = set(v.split())
    return {"model": model, "simd": next((f for f in _SIMD if f in flags), None)}


def _cpu_model() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_model(f.read())
    except OSError:
        return cpu_model("")


def machine_info() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "loadavg_start": list(os.getloadavg()),
        "cpu_stat_start": _cpu_stat(),
        "xla_flags": os.environ.get("XLA_FLAGS", "").strip(),
    }


def machine_end(m: dict) -> dict:
    """Close :func:`machine_info` at the end of a run: the load average then and the
    share of CPU time the hypervisor stole since it started."""
    m["loadavg_end"] = list(os.getloadavg())
    m["steal"] = steal_share(m["cpu_stat_start"], _cpu_stat())
    return m


def device_memory() -> dict | None:
    """Bytes in use / peak / limit of device 0 (``None`` where the backend keeps
    no allocator statistics, e.g. XLA:CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats} or None


def _best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - tic)
    return best


class Peak:
    """Measured dense ``f32`` matmul FLOP/s (``N x N @ N x N``); the best of every
    measurement in the run, re-measured next to each gradient timing."""

    def __init__(self, size: int):
        self.N = size
        self.a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        self.f = jax.jit(lambda a: a @ a).lower(self.a).compile()
        self.best = 0.0
        self.samples = []

    def measure(self, repeats: int = 3) -> float:
        t = _best(lambda: self.f(self.a), repeats)
        v = 2.0 * self.N**3 / t
        self.samples.append(v)
        self.best = max(self.best, v)
        return v


# ---------------------------------------------------------------------- workload


def _digits():
    if not _DIGITS:
        ds = jd.data.load_digits(seed=0)
        _DIGITS.update(x=np.asarray(ds.x_train, np.float32), y=ds.y_train)
    return _DIGITS["x"], _DIGITS["y"]


_MODELS: dict = {}


def _model(hidden, model_name: str):
    """The model and its one-worker loss (cached, so per-worker jits compile once)."""
    key = (tuple(hidden), model_name)
    if key not in _MODELS:
        if model_name == "mlp":
            model, sample = jd.models.MLP(hidden=tuple(hidden), num_classes=10), (64,)
        else:
            model, sample = jd.models.LeNet5(num_classes=10), (8, 8, 1)
        x0 = np.zeros((1, *sample), np.float32)
        theta0 = jax.jit(model.init)(jax.random.key(0), x0)["params"]
        theta0 = jax.tree.map(np.asarray, theta0)
        _MODELS[key] = (model, jd.models.classification_loss(model), theta0)
    return _MODELS[key]


def workload(n: int, hidden, batch: int, model_name: str = "mlp"):
    """Per-worker digits (64 each), a model, its one-worker loss, params, sampler."""
    x, y = _digits()
    idx = np.random.default_rng(n).integers(0, len(y), size=(n, PER_WORKER))
    model, loss, theta0 = _model(hidden, model_name)
    xw = x[idx] if model_name == "mlp" else x[idx].reshape(n, PER_WORKER, 8, 8, 1)
    # = jd.data.from_worker_arrays(xw, y[idx]) and, for the parameters,
    # jd.models.init_workers(same_init=True), built on the host with device_put so
    # that no small program is compiled per n
    data = jd.data.WorkerData(
        *jax.device_put((xw, y[idx].astype(np.int32), np.full(n, PER_WORKER, np.int32)))
    )
    params = jax.tree.map(
        lambda a: jax.device_put(
            np.ascontiguousarray(np.broadcast_to(a, (n, *a.shape)))
        ),
        theta0,
    )
    return model, loss, params, jd.data.make_sampler(data, batch)


def matmul_flops(hidden, batch: int, d_in: int = 64, classes: int = 10) -> float:
    """Matmul FLOPs of one worker's ``value_and_grad`` (MLP): forward ``2 b sum
    a_l b_l``, weight gradients the same, input gradients for layers >= 2."""
    dims = [d_in, *hidden, classes]
    layers = list(zip(dims[:-1], dims[1:], strict=True))
    fwd = sum(2.0 * batch * a * b for a, b in layers)
    return 2.0 * fwd + sum(2.0 * batch * a * b for a, b in layers[1:])


def _copy(tree):
    """Fresh device buffers (donated calls consume their inputs)."""
    return jax.tree.map(lambda v: jax.device_put(v, v.sharding, may_alias=False), tree)


def _compile(fn, *args, donate=(0,)):
    tic = time.perf_counter()
    c = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return c, time.perf_counter() - tic


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0))
        for k in ("argument", "output", "alias", "temp")
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def loss_only(info) -> dict:
    """Per-step summary with the mean loss only: XLA then drops the diagnostics
    (consensus distance, finiteness flags) the per-worker loop does not compute."""
    return {"loss": jnp.mean(info.loss)}


def time_steps(
    algo, state, sampler, steps: int, repeats: int, reduce_info=None, profile=False
) -> dict:
    """Compile ``steps`` steps as one scan (what ``jd.run`` runs per chunk, state
    donated) and time it; returns seconds per step, compile seconds, memory, and
    with ``profile=True`` the per-op profile of the step (:func:`_profile.profile`,
    ``{}`` when the backend records no op). ``reduce_info`` (default: ``jd.run``'s)
    picks the per-step summaries."""
    call, compiled, t_compile = _chunk_call(algo, state, sampler, steps, reduce_info)
    t = _best(call, repeats)
    out = {"s_per_step": t / steps, "compile_s": t_compile, "memory": _memory(compiled)}
    if profile:
        out["profile"] = _profile.profile(
            call, compiled.as_text(), repeats, per=steps, top=12
        )
    return out


def _chunk_call(algo, state, sampler, steps: int, reduce_info=None):
    """Compile ``steps`` steps as one scan (``jd.run``'s chunk, state donated);
    returns ``(call, compiled, compile_s)``, ``call()`` running one chunk on the
    state it carries."""
    key = jax.random.key(1)
    kw = {} if reduce_info is None else {"reduce_info": reduce_info}

    def chunk(s, smp):
        return jd.run_traced(algo, s, smp, key, steps, **kw)

    compiled, t_compile = _compile(chunk, state, sampler)
    box = [_copy(state)]

    def call():
        box[0], summ = compiled(box[0], sampler)
        return summ

    return call, compiled, t_compile


def paired_scaling(args, small: int = 1024, big: int = 16384) -> dict | None:
    """Per-worker throughput of the sparse step at ``small`` over ``big`` workers,
    timed in alternation.

    The per-size rows are minutes apart, and the speed of a shared virtual machine
    drifts by tens of percent within minutes. Here the two programs run by turns
    (the order flips every round), and each round gives one paired ratio
    ``(t_big / big) / (t_small / small)`` from two adjacent calls. The claim is
    judged on the median of these ratios: the best-of-each ratio (also reported)
    pairs two calls that may be minutes apart, and one lucky moment of either
    program moves it. ``None`` unless both sizes are benchmarked.
    """
    if small not in args.sizes or big not in args.sizes:
        return None
    calls = {}
    for n in (small, big):
        _, loss, params, sampler = workload(n, args.hidden, args.batch)
        W = jd.topology.mixing_matrix(jd.topology.ring(n))
        algo = jd.algorithms.dsgd(loss, optax.sgd(LR), jd.gossip.sparse(W))
        steps = _steps_for(n, args.quick)
        call = _chunk_call(algo, algo.init(params), sampler, steps)[0]
        jax.block_until_ready(call())  # warm-up
        calls[n] = (call, steps)
    per_worker = {n: [] for n in calls}  # seconds per worker-step, one per round
    for r in range(max(5, 4 * args.repeats - 1)):
        for n in (small, big) if r % 2 == 0 else (big, small):
            call, steps = calls[n]
            tic = time.perf_counter()
            jax.block_until_ready(call())
            per_worker[n].append((time.perf_counter() - tic) / steps / n)
    ratios = [b / a for a, b in zip(per_worker[small], per_worker[big], strict=True)]
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    best = {n: 1 / min(t) for n, t in per_worker.items()}
    return {
        "small": small,
        "big": big,
        "rounds": len(ratios),
        "round_ratios": ratios,
        "ratio": med,
        "ratio_quartiles": [q1, q3],
        "worker_steps_per_s": {str(n): v for n, v in best.items()},
        "best_ratio": best[small] / best[big],
    }


def time_mix(mix, params, steps: int, repeats: int) -> float:
    """Seconds per application of ``mix`` to the parameters alone."""

    def f(p):
        return jax.lax.fori_loop(0, steps, lambda t, q: mix(q, t), p)

    compiled, _ = _compile(f, params)
    box = [_copy(params)]

    def call():
        box[0] = compiled(box[0])
        return box[0]

    return _best(call, repeats) / steps


def time_grad(loss, params, sampler, repeats: int) -> tuple[float, float | None]:
    """Seconds of one vmapped ``value_and_grad`` on a fixed batch (a program of its
    own: fresh output buffers every call), and XLA's own FLOP count of it."""
    n = jd.tree.num_workers(params)
    batch = jax.jit(sampler)(jax.random.key(2), 0)
    keys = jax.random.split(jax.random.key(3), n)
    vg = jax.vmap(jax.value_and_grad(loss))
    compiled, _ = _compile(vg, params, batch, keys, donate=())
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        xla_flops = float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is optional on some backends
        xla_flops = None
    return _best(lambda: compiled(params, batch, keys), repeats), xla_flops


def time_parts(params, sampler, repeats: int) -> dict:
    """Seconds of the step's other parts, each as one call: drawing the minibatches
    (``sampler``) and the per-step diagnostics every algorithm reports
    (``consensus_distance`` and the per-worker finiteness flags)."""
    from jaxdec.algorithms import _common

    n = jd.tree.num_workers(params)
    smp, _ = _compile(
        lambda s, k: s(k, jnp.int32(0)), sampler, jax.random.key(2), donate=()
    )
    key = jax.random.key(2)

    def diag(p):
        loss = jnp.zeros((n,), jnp.float32)
        return jd.tree.consensus_distance(p), _common.all_finite(loss, p)

    dg, _ = _compile(diag, params, donate=())
    return {
        "sample_s": _best(lambda: smp(sampler, key), repeats),
        "diagnostics_s": _best(lambda: dg(params), repeats),
    }


# -------------------------------------------------------------------- the loop


_LOOP_FNS: dict = {}


def _loop_fns(loss):
    """Jitted one-worker gradient step and neighbour average (built once per loss)."""
    if id(loss) not in _LOOP_FNS:
        grad = jax.grad(loss)

        @jax.jit
        def local_step(p, x, y, key_data):  # x_i <- x_i - lr g_i
            g = grad(p, (x, y), jax.random.wrap_key_data(key_data))
            return jax.tree.map(lambda a, gg: a - LR * gg, p, g)

        @jax.jit
        def average(ws, ps):  # x_i <- sum_j W_ij x_j over the neighbourhood of i
            return jax.tree.map(
                lambda *xs: sum(ws[k] * x for k, x in enumerate(xs)), *ps
            )

        _LOOP_FNS[id(loss)] = (local_step, average)
    return _LOOP_FNS[id(loss)]


def loop_bench(n, loss, params, sampler, W, steps: int, repeats: int) -> dict:
    """The same D-SGD math as a Python loop over workers (jitted per-worker calls:
    gradient step, then neighbour average), fed with the same minibatches and keys
    as the vmapped program (``jd.run``'s :func:`step_keys`)."""
    local_step, average = _loop_fns(loss)
    nbrs = [np.flatnonzero(W[i]) for i in range(n)]
    weights = [jax.device_put(W[i, nb].astype(np.float32)) for i, nb in enumerate(nbrs)]
    host = jax.tree.map(np.asarray, params)
    workers = [
        jax.tree.map(lambda a, i=i: jax.device_put(a[i]), host) for i in range(n)
    ]
    key = jax.random.key(1)

    @jax.jit
    def batch_and_keys(smp, t):  # the minibatches and worker keys of step t
        k_data, k_algo = step_keys(key, t)
        xb, yb = smp(k_data, t)
        return xb, yb, jax.random.key_data(jax.random.split(k_algo, n))

    def run(ws, t0, num):
        for t in range(t0, t0 + num):
            xb, yb, kd = map(np.asarray, batch_and_keys(sampler, np.int32(t)))
            ws = [local_step(ws[i], xb[i], yb[i], kd[i]) for i in range(n)]
            ws = [average(weights[i], [ws[j] for j in nbrs[i]]) for i in range(n)]
        return ws

    first = run(workers, 0, 1)  # warm-up, and step 0 to check against vmapped
    algo = jd.algorithms.dsgd(loss, optax.sgd(LR), jd.gossip.sparse(W))

    @jax.jit
    def ref_step(p, smp):
        k_data, k_algo = step_keys(key, jnp.int32(0))
        return algo.step(algo.init(p), smp(k_data, jnp.int32(0)), k_algo)[0].params

    ref = jax.tree.leaves(ref_step(params, sampler))
    got = zip(*[jax.tree.leaves(w) for w in first], strict=True)
    diff = max(
        float(np.max(np.abs(np.stack(a) - np.asarray(b))))
        for a, b in zip(got, ref, strict=True)
    )
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(run(first, 1, steps))
        best = min(best, time.perf_counter() - tic)
    return {"s_per_step": best / steps, "steps": steps, "max_abs_diff": diff}


# -------------------------------------------------------------------- sweeps


_PARTS = ("grad", "gossip", "sample", "diagnostics")


def _steps_for(n: int, quick: bool) -> int:
    return int(np.clip((2**13 if quick else 2**15) // n, 2, 40))


GRAD_CALLS = 20  # best-of calls of the gradient alone (full runs)


def grad_calls(cfg: dict) -> int:
    """Calls the gradient alone is timed over (best of): the peak it is compared
    with is the best of every measurement in the run (3 calls each, ~40 in all), so
    a full run takes the gradient's best of ``GRAD_CALLS`` too (reports written
    before this say nothing and took the best of ``repeats``)."""
    return cfg.get("grad_calls", cfg["repeats"])


def bench_size(n: int, args, peak: Peak, mesh) -> dict:
    hidden, batch, reps = args.hidden, args.batch, args.repeats
    g_reps = grad_calls(vars(args))
    _, loss, params, sampler = workload(n, hidden, batch)
    W = jd.topology.mixing_matrix(jd.topology.ring(n))
    steps = _steps_for(n, args.quick)
    row: dict = {"n": n, "steps_timed": steps}

    def dsgd(mix):
        return jd.algorithms.dsgd(loss, optax.sgd(LR), mix)

    sparse = dsgd(jd.gossip.sparse(W))
    r = time_steps(
        sparse, sparse.init(_copy(params)), sampler, steps, reps, profile=True
    )
    prof = r.pop("profile")
    if prof:  # where the step's time goes, per op and per phase (profiler)
        row["phases"] = {k: v / prof["op_sum_s"] for k, v in prof["phases"].items()}
        row["op_sum_s"] = prof["op_sum_s"]
        g_s, g_fl = prof["phases"]["gradient"], prof["phase_flops"]["gradient"]
        row["grad_step_flops_per_s"] = g_fl / g_s if g_s > 0 else None
        row["grad_step_matmul_flops"] = g_fl
        if n == args.profile_n:
            row["step_ops"] = prof["ops"]
    row["sparse"] = r
    st = sparse.init(_copy(params))
    row["lean"] = time_steps(sparse, st, sampler, steps, reps, reduce_info=loss_only)
    if n <= args.dense_max:  # O(n^2 d) per step: fewer steps per timed call
        dense = dsgd(jd.gossip.dense(W))
        d_steps = int(np.clip(steps * 256 // n, 2, steps))
        row["dense"] = time_steps(
            dense, dense.init(_copy(params)), sampler, d_steps, reps
        )
    D = mesh.devices.size
    if n % D == 0:
        sh = dsgd(sharding.ppermute_gossip(W, mesh))
        st = sharding.shard_workers(sh.init(_copy(params)), mesh)
        row["sharded"] = time_steps(
            sh, st, sharding.shard_workers(sampler, mesh), steps, reps
        )
        row["sharded"]["devices"] = D
        if D > 1:  # the gradient with the worker axis split over the devices
            row["grad_sharded_s"] = time_grad(
                loss, *sharding.shard_workers((params, sampler), mesh), g_reps
            )[0]
    row["gossip_s"] = time_mix(jd.gossip.sparse(W), params, steps, reps)
    peak.measure(reps)
    t_grad, xla_flops = time_grad(loss, params, sampler, g_reps)
    peak.measure(reps)
    flops = n * matmul_flops(hidden, batch)
    row["grad_s"] = t_grad
    row["grad_matmul_flops"] = flops
    row["grad_xla_flops"] = xla_flops
    row["grad_flops_per_s"] = flops / t_grad
    if "grad_sharded_s" in row:
        row["grad_sharded_flops_per_s"] = flops / row["grad_sharded_s"]
    if n <= args.loop_max:
        loop_steps = int(max(1, min(steps, 256 // n)))
        row["loop"] = loop_bench(n, loss, params, sampler, W, loop_steps, 2)
    for k in ("sparse", "lean", "dense", "sharded", "loop"):
        if k in row:
            row[k]["worker_steps_per_s"] = n / row[k]["s_per_step"]
    if "loop" in row:
        for k in ("sparse", "lean", "dense", "sharded"):
            if k in row:
                row[f"speedup_{k}_vs_loop"] = (
                    row["loop"]["s_per_step"] / row[k]["s_per_step"]
                )
    row.update(time_parts(params, sampler, reps))
    t_step = row["sparse"]["s_per_step"]
    row["frac_grad"] = t_grad / t_step
    row["frac_gossip"] = row["gossip_s"] / t_step
    row["frac_sample"] = row["sample_s"] / t_step
    row["frac_diagnostics"] = row["diagnostics_s"] / t_step
    row["frac_other"] = 1.0 - sum(row[f"frac_{k}"] for k in _PARTS)
    mem = row["sparse"]["memory"]
    if mem:
        row["bytes_per_worker"] = mem["peak"] / n
    row["device_memory"] = device_memory()  # allocator peak so far (accelerators)
    print(_line(row), flush=True)
    return row


def memory_table(args) -> list[dict]:
    """Compiled peak bytes per worker (one D-SGD step, sparse ring gossip, state
    donated) for the MLP and LeNet-5 in several precision / remat settings."""
    n = args.memory_n
    W = jd.topology.mixing_matrix(jd.topology.ring(n))
    variants = ["f32"] if args.quick else ["f32", "bf16", "remat", "bf16+remat"]
    rows = []
    for model_name in ("mlp", "cnn"):
        _, loss0, params0, sampler = workload(n, args.hidden, args.batch, model_name)
        for v in variants:
            loss, params = loss0, params0
            if "bf16" in v:
                loss = sharding.float32_loss(loss)
                params = sharding.cast_floats(params, jnp.bfloat16)
            if "remat" in v:
                loss = sharding.remat(loss)
            algo = jd.algorithms.dsgd(loss, optax.sgd(LR), jd.gossip.sparse(W))
            state = algo.init(_copy(params))
            key = jax.random.key(1)

            def one(s, smp, algo=algo, key=key):
                return jd.run_traced(algo, s, smp, key, 1)

            compiled, t_c = _compile(one, state, sampler)
            mem = _memory(compiled)
            state_b = sum(x.nbytes for x in jax.tree.leaves(state)) / n
            data_b = sum(x.nbytes for x in jax.tree.leaves(sampler)) / n
            per = mem.get("peak", float("nan")) / n
            rows.append(
                {
                    "model": model_name,
                    "variant": v,
                    "n": n,
                    "params_per_worker": jd.tree.num_params(params),
                    "state_bytes_per_worker": state_b,
                    "data_bytes_per_worker": data_b,
                    "temp_bytes_per_worker": mem.get("temp", float("nan")) / n,
                    "bytes_per_worker": per,
                    "workers_per_gib": 2**30 / per,
                    "compile_s": t_c,
                }
            )
            print(
                f"memory {model_name:>3} {v:<10} {per / 1024:8.1f} KiB/worker "
                f"-> {2**30 / per:9.0f} workers/GiB",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------- targets


ACCEL_STEPS_PER_S = 1e6  # the accelerator claims of the scale issue (H100-class)
ACCEL_WORKERS = 1e5


def targets(
    rows: list[dict], peak: float, backend: str = "cpu", paired: dict | None = None
) -> list[dict]:
    """PASS / MISS lines for the claims: the 2-core-CPU ratios everywhere, and on
    an accelerator backend also the worker-steps/s and workers-in-memory claims.
    The scaling claim is judged on the alternating measurement ``paired``
    (:func:`paired_scaling`) when there is one, else on the per-size rows."""
    by_n = {r["n"]: r for r in rows}
    out = []
    if backend != "cpu" and rows:
        best = max(rows, key=lambda r: r["sparse"]["worker_steps_per_s"])
        v = best["sparse"]["worker_steps_per_s"]
        name = f"{backend}: D-SGD sparse worker-steps/s, MLP on digits (n={best['n']})"
        out.append(_target(name, v, ">=", ACCEL_STEPS_PER_S))
        out.append(
            _target(
                f"{backend}: most workers stepped in device memory",
                max(r["n"] for r in rows),
                ">=",
                ACCEL_WORKERS,
            )
        )
    what = {
        "sparse": "D-SGD sparse step at n=1024 vs per-worker loop",
        "lean": "D-SGD sparse step, loss-only summaries (the loop's math), "
        "at n=1024 vs per-worker loop",
        "sharded": "D-SGD sharded ppermute step at n=1024 vs per-worker loop",
    }
    for k, name in what.items():
        if 1024 in by_n and f"speedup_{k}_vs_loop" in by_n[1024]:
            v = by_n[1024][f"speedup_{k}_vs_loop"]
            if k == "sharded":
                name = name.replace("step", f"step (D={by_n[1024][k]['devices']})")
            out.append(_target(name, v, ">=", 20))
    name = "sparse per-worker throughput n=1024 / n=16384"
    if paired:
        out.append(
            _target(
                f"{name} (timed in alternation, median of {paired['rounds']} "
                "paired rounds)",
                paired["ratio"],
                "<=",
                1.5,
            )
        )
    elif 1024 in by_n and 16384 in by_n:
        v = (
            by_n[1024]["sparse"]["worker_steps_per_s"]
            / by_n[16384]["sparse"]["worker_steps_per_s"]
        )
        out.append(_target(name, v, "<=", 1.5))
    big = [r for r in rows if r["n"] >= 256]
    for r in big:
        v = r["grad_flops_per_s"] / peak
        out.append(
            _target(f"gradient FLOP/s / matmul peak at n={r['n']}", v, ">=", 0.30)
        )
        if r.get("grad_step_flops_per_s"):
            v = r["grad_step_flops_per_s"] / peak
            name = "gradient FLOP/s inside the D-SGD step (profiled) / peak at n="
            out.append(_target(f"{name}{r['n']}", v, ">=", 0.30))
        if "grad_sharded_flops_per_s" in r:
            v = r["grad_sharded_flops_per_s"] / peak
            D = r["sharded"]["devices"]
            name = f"gradient FLOP/s (worker axis over {D} devices) / peak at n="
            out.append(_target(f"{name}{r['n']}", v, ">=", 0.30))
    return out


def _target(name, value, op, bound):
    ok = value >= bound if op == ">=" else value <= bound
    return {"claim": name, "value": value, "op": op, "bound": bound, "pass": ok}


# -------------------------------------------------------------------- output


def _g(v, f="{:.3g}"):
    return "-" if v is None else f.format(v)


def _ws(r, k):
    return r[k]["worker_steps_per_s"] if k in r else None


def _line(r) -> str:
    return (
        f"n={r['n']:>6}  sparse {_g(_ws(r, 'sparse')):>8} w-steps/s  "
        f"lean {_g(_ws(r, 'lean')):>8}  "
        f"dense {_g(_ws(r, 'dense')):>8}  sharded {_g(_ws(r, 'sharded')):>8}  "
        f"loop {_g(_ws(r, 'loop')):>8}  sparse/loop "
        f"{_g(r.get('speedup_sparse_vs_loop'), '{:.1f}x'):>6}  grad "
        f"{r['frac_grad']:.0%} gossip {r['frac_gossip']:.0%} sample "
        f"{r['frac_sample']:.0%} diag {r['frac_diagnostics']:.0%}  "
        f"{r['grad_flops_per_s'] / 1e9:.1f} GFLOP/s"
    )


def step_ops_markdown(rows: list[dict], peak: float) -> list[str]:
    """The per-op table of the profiled sparse step (none when nothing was
    profiled)."""
    r = next((r for r in rows if r.get("step_ops")), None)
    if r is None:
        return []
    ops = r["step_ops"]
    md = [
        "",
        f"## Inside the sparse step (n={r['n']}, XLA ops, profiler)",
        "",
        f"Op times per step (sum {r['op_sum_s'] * 1e3:.3g} ms against "
        f"{r['sparse']['s_per_step'] * 1e3:.3g} ms wall: independent ops can run "
        "at once). An op's phase is that of its root in the JAX name stack "
        "(jaxdec's `jax.named_scope` labels, `jvp(` for autodiff). Ops that run "
        "matmuls show them as `workers x [M x K].[K x N]` with the achieved "
        "GFLOP/s.",
        "",
        "| op | phase | output | dots | ms | share | GFLOP/s | % of peak |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for o in ops:
        f = o["flops_per_s"]
        dims = "x".join(map(str, o["dims"])) if o["dims"] else ""
        md.append(
            f"| {o['op']} | {o['phase']} | {dims} | {'; '.join(o['dots'])} "
            f"| {o['s'] * 1e3:.3g} | {o['share']:.0%} | {_g(f and f / 1e9, '{:.1f}')} "
            f"| {_g(f and f / peak, '{:.0%}')} |"
        )
    return md


def device_name(m: dict) -> str:
    """The accelerator's kind, or ``CPU (model, ISA, arch)`` on a CPU."""
    if m["backend"] != "cpu":
        return m["device_kind"]
    cpu = m.get("cpu") or {}
    what = [cpu.get("model"), (cpu.get("simd") or "").upper() or None, m["processor"]]
    return f"CPU ({', '.join(filter(None, what))})"


def markdown_machine(report: dict, workload: str | None = None) -> list[str]:
    """The report's header lines: which device (on a CPU: its model and vector ISA),
    the measured peak, the workload, the load and steal, the ``XLA_FLAGS``."""
    m, peak = report["machine"], report["peak_flops_per_s"]
    dev = device_name(m)
    busy = max(m["loadavg_start"][0], m["loadavg_end"][0]) > (m["cpu_count"] or 1)
    return [
        f"- device: **{dev}**, backend `{m['backend']}`, {m['num_devices']} device(s),"
        f" {m['cpu_count']} CPU cores, jax {m['jax']}",
        f"- measured f32 matmul peak: **{peak / 1e9:.1f} GFLOP/s** "
        f"({report['peak_size']}x{report['peak_size']}, best of the run)",
        *([f"- workload: {workload}"] if workload else []),
        f"- load average start / end: {m['loadavg_start'][0]:.1f} / "
        f"{m['loadavg_end'][0]:.1f}"
        + (" (**busy machine: other processes competed for the CPU**)" if busy else "")
        + (
            f"; CPU time stolen by the hypervisor: {100 * m['steal']:.1f}%"
            if m.get("steal") is not None
            else ""
        ),
        f"- `XLA_FLAGS`: `{m.get('xla_flags') or '(none)'}`",
    ]


def markdown(report: dict) -> str:
    rows, cfg, peak = report["rows"], report["config"], report["peak_flops_per_s"]
    D = next((r["sharded"]["devices"] for r in rows if "sharded" in r), 1)
    workload = (
        f"D-SGD, MLP 64-{'-'.join(map(str, cfg['hidden']))}-10 on digits, "
        f"batch {cfg['batch']}, ring gossip"
    )
    md = [
        f"# jaxdec benchmark ({'quick' if cfg['quick'] else 'full'})",
        "",
        *markdown_machine(report, workload),
        "",
        "## Throughput (worker-steps / s)",
        "",
        "`sparse` is the program `jd.run` compiles (per-step summaries of the "
        "loss, consensus distance and finiteness flags); `lean` is the same step "
        "summarizing the loss only (XLA drops the diagnostics, which the "
        "per-worker loop does not compute either); `sharded` is `sparse` with the "
        f"worker axis over {D} device(s) and ppermute gossip.",
        "",
        f"| n | dense | sparse | lean | sharded (D={D}) | per-worker loop "
        "| sparse / loop | lean / loop | sharded / loop | dense / loop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['n']} | {_g(_ws(r, 'dense'))} | {_g(_ws(r, 'sparse'))} "
            f"| {_g(_ws(r, 'lean'))} "
            f"| {_g(_ws(r, 'sharded'))} | {_g(_ws(r, 'loop'))} "
            + "".join(
                f"| {_g(r.get(f'speedup_{k}_vs_loop'), '{:.1f}x')} "
                for k in ("sparse", "lean", "sharded", "dense")
            )
            + "|"
        )
    ps = report.get("paired_scaling")
    if ps:
        a, b = (ps["worker_steps_per_s"][str(k)] for k in (ps["small"], ps["big"]))
        q1, q3 = ps["ratio_quartiles"]
        md += [
            "",
            f"Scaling, timed in alternation (the sparse step at n={ps['small']} "
            f"and n={ps['big']} run by turns, {ps['rounds']} rounds, so that both "
            "sizes see the same machine; each round gives the ratio of the two "
            f"per-worker step times): median ratio **{ps['ratio']:.2f}** "
            f"(quartiles {q1:.2f}-{q3:.2f}). Best of each: {_g(a)} and {_g(b)} "
            f"worker-steps/s, ratio {ps['best_ratio']:.2f}.",
        ]
    profiled = all("phases" in r for r in rows)
    how = (
        "Fractions of the summed op time of the sparse step, from the profiler "
        "(each XLA op in the phase of its JAX name stack: the vmapped gradient, "
        "gossip, drawing the minibatches, the diagnostics (consensus distance, "
        "finiteness flags), and the rest: optimizer update, summaries, loop). "
        "`in step` is the gradient phase's matmul FLOP/s inside that program; "
        "`alone` times the vmapped gradient as a program of its own (fresh output "
        f"buffers each call; best of {grad_calls(cfg)} calls, the peak being the "
        "best of every measurement in the run)."
        if profiled
        else "Fractions of the sparse step, each part timed alone: the vmapped "
        "gradient, gossip, drawing the minibatches, the diagnostics (consensus "
        "distance, finiteness flags), and the rest (update, summaries, loop "
        "overhead; negative when the parts timed alone overlap less well than "
        "inside the step)."
    )
    md += [
        "",
        "## Where the time goes (sparse step)",
        "",
        how,
        "",
        "| n | ms / step | gradient | gossip | sample | diagnostics | rest "
        + ("| gradient GFLOP/s in step | % of peak " if profiled else "")
        + f"| gradient GFLOP/s alone | % of peak | D={D} gradient GFLOP/s alone "
        "| % of peak | compile s | KiB / worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if profiled else ""),
    ]
    for r in rows:
        gs = r.get("grad_sharded_flops_per_s")
        if profiled:
            fr = "".join(f"| {r['phases'][k]:.0%} " for k in _profile.PHASES)
            gi = r.get("grad_step_flops_per_s")
            fr += f"| {_g(gi and gi / 1e9, '{:.1f}')} "
            fr += f"| {_g(gi and gi / peak, '{:.0%}')} "
        else:
            fr = "".join(f"| {r[f'frac_{k}']:.0%} " for k in (*_PARTS, "other"))
        md.append(
            f"| {r['n']} | {r['sparse']['s_per_step'] * 1e3:.3g} "
            + fr
            + f"| {r['grad_flops_per_s'] / 1e9:.1f} "
            f"| {r['grad_flops_per_s'] / peak:.0%} "
            f"| {_g(gs and gs / 1e9, '{:.1f}')} | {_g(gs and gs / peak, '{:.0%}')} "
            f"| {r['sparse']['compile_s']:.2f} "
            f"| {_g(r.get('bytes_per_worker', 0) / 1024, '{:.1f}')} |"
        )
    md += step_ops_markdown(rows, peak)
    dm = [(r["n"], r.get("device_memory")) for r in rows if r.get("device_memory")]
    if dm:
        md += [
            "",
            "## Device memory (allocator statistics after each size)",
            "",
            "| n | GiB in use | peak GiB so far | limit GiB |",
            "|---:|---:|---:|---:|",
        ]
        gib = 2.0**30
        for n, m in dm:
            md.append(
                f"| {n} | {_g(m.get('bytes_in_use', 0) / gib)} "
                f"| {_g(m.get('peak_bytes_in_use', 0) / gib)} "
                f"| {_g(m.get('bytes_limit', 0) / gib)} |"
            )
    if report.get("memory"):
        md += [
            "",
            f"## Memory per worker (compiled D-SGD step, n={report['memory'][0]['n']})",
            "",
            "| model | storage | params / worker | state B | data B | temp B "
            "| total KiB | workers / GiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["memory"]:
            md.append(
                f"| {r['model']} | {r['variant']} | {r['params_per_worker']} "
                f"| {r['state_bytes_per_worker']:.0f} "
                f"| {r['data_bytes_per_worker']:.0f} "
                f"| {r['temp_bytes_per_worker']:.0f} "
                f"| {r['bytes_per_worker'] / 1024:.1f} "
                f"| {r['workers_per_gib']:.0f} |"
            )
    if report["targets"]:
        md += ["", "## Targets", ""]
        for t in report["targets"]:
            md.append(
                f"- {'PASS' if t['pass'] else 'MISS'}: {t['claim']} = "
                f"{t['value']:.3g} (target {t['op']} {t['bound']})"
            )
    return "\n".join(md) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for k, style in (
        ("dense", "s-"),
        ("sparse", "o-"),
        ("lean", "o:"),
        ("sharded", "^-"),
        ("loop", "x--"),
    ):
        pts = [(r["n"], _ws(r, k)) for r in rows if k in r]
        if pts:
            ax[0].plot(*zip(*pts, strict=True), style, label=k)
    ax[0].set(xscale="log", yscale="log", xlabel="workers n", ylabel="worker-steps / s")
    ax[0].legend()
    ax[0].set_title(device_name(report["machine"]))
    ns = [str(r["n"]) for r in rows]
    bottom = np.zeros(len(rows))
    if all("phases" in r for r in rows):  # profiled: shares of the step's op time
        parts = [(k, [r["phases"][k] for r in rows]) for k in _profile.PHASES]
        ylabel = "share of the sparse step's op time (profiled)"
    else:  # each part timed alone, over the step (overlaps can sum past 1)
        parts = [(k, [r[f"frac_{k}"] for r in rows]) for k in (*_PARTS, "other")]
        ylabel = "part timed alone / sparse step"
    for k, v in parts:
        v = np.clip(v, 0, None)
        ax[1].bar(ns, v, bottom=bottom, label=k)
        bottom += v
    ax[1].set(xlabel="workers n", ylabel=ylabel)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args=None) -> dict:
    args = args or ARGS or _parse([])
    tic = time.perf_counter()
    if not args.quick:
        args.grad_calls = max(args.repeats, GRAD_CALLS)
    report = {"machine": machine_info(), "config": dict(vars(args))}
    print(
        f"jaxdec bench on {report['machine']['device_kind']} "
        f"({report['machine']['backend']}, {jax.device_count()} devices), "
        f"load {report['machine']['loadavg_start'][0]:.1f}",
        flush=True,
    )
    on_cpu = jax.default_backend() == "cpu"
    if args.default_sizes and not on_cpu:  # the accelerator claims: 1e5 workers
        args.sizes = [*args.sizes, 65536, 131072]
    report["config"]["sizes"] = list(args.sizes)
    peak = Peak(args.peak_size or (2048 if on_cpu else 8192))
    peak.measure(args.repeats)
    mesh = sharding.worker_mesh()
    rows = [bench_size(n, args, peak, mesh) for n in args.sizes]
    report["paired_scaling"] = paired_scaling(args)
    report["memory"] = memory_table(args) if args.memory else []
    peak.measure()
    report["peak_size"] = peak.N
    report["peak_flops_per_s"] = peak.best
    report["peak_samples"] = peak.samples
    report["rows"] = rows
    report["targets"] = targets(
        rows, peak.best, report["machine"]["backend"], report["paired_scaling"]
    )
    machine_end(report["machine"])
    report["wall_s"] = time.perf_counter() - tic
    name = "bench" if on_cpu else f"bench_{jax.default_backend()}"
    out = Path(args.out) if args.out else RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    md = markdown(report)
    (out / "bench.md").write_text(md)
    plot(report, out / "bench.png")
    print(md)
    print(f"wrote {out}/bench.json, bench.md, bench.png in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
