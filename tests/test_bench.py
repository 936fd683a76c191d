"""Smoke test of experiments/bench.py at tiny sizes (no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_bench_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench.py"),
        "--quick",
        "--sizes",
        "8",
        "--dense-max",
        "8",
        "--loop-max",
        "8",
        "--memory-n",
        "8",
        "--repeats",
        "1",
        "--devices",
        "2",
        "--peak-size",
        "256",
        "--out",
        str(out),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=FAST)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    md = (out / "bench.md").read_text()
    assert "## Throughput" in md and "## Memory per worker" in md
    rows = {r["n"]: r for r in report["rows"]}
    assert sorted(rows) == [8]
    assert "dense" in rows[8] and "loop" in rows[8]
    # the per-worker loop computes the same D-SGD step as the vmapped program
    assert rows[8]["loop"]["max_abs_diff"] < 1e-5
    for r in rows.values():
        assert r["sharded"]["devices"] == 2  # --devices 2: two fake CPU devices
        for k in ("sparse", "lean", "sharded"):
            assert r[k]["worker_steps_per_s"] > 0 and r[k]["compile_s"] > 0
        assert r["grad_sharded_flops_per_s"] > 0  # gradient over the 2 devices
        assert r["grad_flops_per_s"] > 0 and r["bytes_per_worker"] > 0
        parts = ("grad", "gossip", "sample", "diagnostics", "other")
        assert abs(sum(r[f"frac_{k}"] for k in parts) - 1) < 1e-9
    # the profiled step: phases of the summed op time, and every gradient matmul
    # (read from the HLO, labeled by the JAX name stack) inside the gradient phase
    r8 = rows[8]
    assert abs(sum(r8["phases"].values()) - 1) < 1e-9
    assert r8["phases"]["gradient"] > 0 and r8["phases"]["gossip"] > 0
    assert r8["grad_step_matmul_flops"] == 8 * _bench_module().matmul_flops([64], 32)
    assert r8["step_ops"] and "## Inside the sparse step (n=8" in md
    assert report["peak_flops_per_s"] > 0
    assert report["machine"]["backend"] == "cpu"
    # the report says under which XLA flags it ran (ours: the per-op profiler)
    assert FAST in report["machine"]["xla_flags"]
    assert f"- `XLA_FLAGS`: `{report['machine']['xla_flags']}`" in md
    if report["machine"]["steal"] is not None:  # Linux: /proc/stat
        assert 0 <= report["machine"]["steal"] <= 1 and "stolen" in md
    cpu = report["machine"]["cpu"]  # CPU figures say which CPU gave them
    if cpu["model"] is not None:  # Linux: /proc/cpuinfo
        assert f"- device: **CPU ({cpu['model']}" in md
    assert {m["model"] for m in report["memory"]} == {"mlp", "cnn"}
    assert all(m["workers_per_gib"] > 0 for m in report["memory"])
    assert "## Device memory" not in md  # XLA:CPU keeps no allocator statistics
    # on an accelerator each row carries the allocator's figures: rendered as GiB
    report["rows"][0]["device_memory"] = {
        "bytes_in_use": 3 * 2**30,
        "peak_bytes_in_use": 5 * 2**30,
        "bytes_limit": 79 * 2**30,
    }
    gpu_md = _bench_module().markdown(report)
    assert "## Device memory" in gpu_md and "| 8 | 3 | 5 | 79 |" in gpu_md


def _bench_module():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def _row(n, steps_per_s):
    return {
        "n": n,
        "sparse": {"worker_steps_per_s": steps_per_s},
        "grad_flops_per_s": 1.0,
    }


def test_accelerator_targets_only_on_accelerators():
    bench = _bench_module()
    rows = [_row(1024, 4e5), _row(131072, 2.5e6)]
    gpu = {t["claim"]: t for t in bench.targets(rows, 10.0, "gpu")}
    steps = next(t for c, t in gpu.items() if "worker-steps/s" in c)
    mem = next(t for c, t in gpu.items() if "device memory" in c)
    assert steps["value"] == 2.5e6 and steps["pass"] and "n=131072" in steps["claim"]
    assert mem["value"] == 131072 and mem["pass"]
    small = {t["claim"]: t for t in bench.targets(rows[:1], 10.0, "gpu")}
    assert [t["pass"] for c, t in small.items() if c.startswith("gpu:")] == [
        False,
        False,
    ]
    cpu = bench.targets(rows, 10.0, "cpu")
    assert not any(t["claim"].startswith("gpu") for t in cpu)
    # the CPU gradient claim is computed for every n >= 256 (here 1 / 10 < 0.3)
    assert [t["pass"] for t in cpu if "gradient" in t["claim"]] == [False, False]


def test_hlo_matmul_flops_and_phases():
    """The HLO reader counts exactly the MLP's matmul FLOPs in a compiled vmapped
    gradient, and jaxdec's named scopes put the ops of a D-SGD step in phases."""
    import jax
    import optax

    import jaxdec as jd

    bench = _bench_module()
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import _profile
    finally:
        sys.path.pop(0)
    n = 4
    _, loss, params, sampler = bench.workload(n, [16], 8)
    batch = jax.jit(sampler)(jax.random.key(2), 0)
    keys = jax.random.split(jax.random.key(3), n)
    vg = jax.jit(jax.vmap(jax.value_and_grad(loss)))
    ops = _profile.module_ops(vg.lower(params, batch, keys).compile().as_text())
    assert sum(o["flops"] for o in ops.values()) == n * bench.matmul_flops([16], 8)
    assert {o["phase"] for o in ops.values() if o["flops"]} == {"gradient"}
    dots = [d for o in ops.values() for d in o["dots"]]
    assert "4 x [8x64].[64x16]" in dots  # first layer forward: x [8,64] W [64,16]

    W = jd.topology.mixing_matrix(jd.topology.ring(n))
    algo = jd.algorithms.dsgd(loss, optax.sgd(0.1), jd.gossip.sparse(W))
    step = jax.jit(lambda s, smp: jd.run_traced(algo, s, smp, jax.random.key(1), 2))
    text = step.lower(algo.init(params), sampler).compile().as_text()
    phases = {o["phase"] for o in _profile.module_ops(text).values()}
    assert {"gradient", "gossip", "sample", "diagnostics"} <= phases
    assert _profile.phase("jit(f)/while/body/gossip/add") == "gossip"
    assert _profile.phase("jit(f)/consensus_distance/reduce_sum") == "diagnostics"
    assert _profile.phase("jit(f)/add") == "other"


def test_checkpoint_bench_runs_and_writes_its_report(tmp_path):
    """experiments/bench_checkpoint.py at a tiny size on 2 devices: both ways of
    checkpointing run, the restored state is bit-exact in the saved sharding."""
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_checkpoint.py"),
           "--sizes", "8", "--devices", "2", "--repeats", "1",
           "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=FAST)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_checkpoint.json").read_text())["rows"]
    assert [(r["n"], r["devices"]) for r in rows] == [(8, 2)]
    assert all(r["restored_equal"] for r in rows)
    for r in rows:
        assert r["state_MiB"] > 0 and r["jaxdec_save_s"] > 0 and r["gather_save_s"] > 0
    assert "| 8 | 2 |" in (tmp_path / "bench_checkpoint.md").read_text()


def test_steal_share_from_cpu_counters():
    bench = _bench_module()
    assert bench.steal_share([1000, 10], [1400, 110]) == 0.25
    assert bench.steal_share(None, [1, 0]) is None  # no /proc/stat
    assert bench.steal_share([5, 0], [5, 0]) is None  # no time passed
    stat = bench._cpu_stat()
    if stat is not None:
        assert stat[0] >= stat[1] >= 0


def test_paired_scaling_alternates_two_sizes_and_feeds_the_target():
    import argparse

    bench = _bench_module()
    args = argparse.Namespace(sizes=[8, 16], hidden=[8], batch=4, quick=True, repeats=1)
    ps = bench.paired_scaling(args, small=8, big=16)
    ws = ps["worker_steps_per_s"]
    assert set(ws) == {"8", "16"} and all(v > 0 for v in ws.values())
    assert ps["best_ratio"] == ws["8"] / ws["16"]
    # the claim's figure: the median of the per-round paired ratios
    rr = ps["round_ratios"]
    assert ps["rounds"] == len(rr) == 5 and all(r > 0 for r in rr)
    assert ps["ratio"] == sorted(rr)[2]
    q1, q3 = ps["ratio_quartiles"]
    assert min(rr) <= q1 <= ps["ratio"] <= q3 <= max(rr)
    assert bench.paired_scaling(args, small=8, big=32) is None  # 32 not benchmarked
    # the scaling claim is judged on the alternating measurement when there is one
    ts = bench.targets([], 1.0, "cpu", dict(ps, ratio=1.2))
    assert [(t["value"], t["pass"]) for t in ts] == [(1.2, True)]
    assert "alternation" in ts[0]["claim"]
    assert not bench.targets([], 1.0, "cpu", dict(ps, ratio=1.6))[0]["pass"]


def test_cpu_model_and_widest_simd_from_cpuinfo():
    bench = _bench_module()
    intel = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw amx_tile\n"
    )
    assert bench.cpu_model(intel) == {
        "model": "Intel(R) Xeon(R) Platinum 8488C",
        "simd": "avx512f",
    }
    amd = "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx fma avx2\n"
    assert bench.cpu_model(amd) == {"model": "AMD EPYC", "simd": "avx2"}
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve\nCPU part\t: 0xd40\n"
    assert bench.cpu_model(arm) == {"model": None, "simd": "sve"}
    assert bench.cpu_model("") == {"model": None, "simd": None}


def test_bench_dots_runs_checks_every_dot_and_sums_them(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench_dots.py"),
        *("--n", "8", "16", "--devices", "2", "--repeats", "1", "--calls", "2"),
        *("--peak-size", "128", "--out", str(tmp_path)),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=FAST)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "bench_dots.json").read_text())
    rows = report["rows"]
    assert [(r["n"], r["dot"]) for r in rows[:2]] == [
        (8, "[32x64].[64x64]"),
        (8, "[64x32].[32x64]"),
    ]
    assert len(rows) == 10 and {r["n"] for r in rows} == {8, 16}
    for r in rows:  # every variant ran, computed the dot (numpy.einsum), was timed
        assert {"xla", "xla D=2"} <= set(r["s"]) and all(t > 0 for t in r["s"].values())
        assert max(r["max_abs_err"].values()) < 1e-4
    # the MLP 64-64-10 gradient's matmul FLOPs, per worker (bench.matmul_flops)
    flops8 = sum(r["flops"] for r in rows if r["n"] == 8)
    assert flops8 == 8 * _bench_module().matmul_flops([64], 32)
    t8 = sum(r["s"]["xla"] for r in rows if r["n"] == 8)
    assert abs(report["all_five"]["8"]["xla"] - flops8 / t8) < 1e-6 * flops8 / t8
    md = (tmp_path / "bench_dots.md").read_text()
    assert "| 16 | **all five** |" in md and "device: **" in md
    if report["mkl"]["path"] is None:
        assert "MKL: not installed" in md and "mkl T=1" not in md
