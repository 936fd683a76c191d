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
    assert report["peak_flops_per_s"] > 0
    assert report["machine"]["backend"] == "cpu"
    assert {m["model"] for m in report["memory"]} == {"mlp", "cnn"}
    assert all(m["workers_per_gib"] > 0 for m in report["memory"])
