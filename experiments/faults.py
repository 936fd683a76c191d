"""Fault injection: SIGKILL a real training process mid-run, resume, compare bits.

For each algorithm (D-SGD with momentum, gradient tracking with Adam) on digits:

1. run ``jaxdec run ... --checkpoint-dir REF`` uninterrupted in a subprocess;
2. run the same command with ``--resume`` into ``FAULTY``, SIGKILL it at a random
   moment (uniform over the measured length of a run), relaunch, kill again, ...
   ``--kills`` times, then let it finish;
3. restore both final checkpoints and compare every leaf of the final state
   (parameters, trackers, optimizer states, counters), the run key, and the per-step
   training history bit for bit, plus the evaluation records written to
   ``metrics.jsonl``.

Writes ``experiments/results/faults/{report.json,report.md,timeline.png}``.

    python experiments/faults.py [--quick] [--kills 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxdec import checkpoint as jckpt
from jaxdec.cli import ExperimentConfig, build

OUT = Path(__file__).resolve().parent / "results" / "faults"


def _cfg(algorithm: str, quick: bool) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="digits",
        n_workers=8,
        topology="ring",
        algorithm=algorithm,
        lr=0.05 if algorithm == "dsgd" else 0.02,
        momentum=0.9 if algorithm == "dsgd" else 0.0,
        batch_size=16,
        steps=60 if quick else 1500,
        eval_every=10 if quick else 25,
        hidden=(32,),
        seed=0,
    )


def _command(cfg: ExperimentConfig, ckdir: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "jaxdec.cli", "run", "--no-progress"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        cmd += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return cmd + ["--checkpoint-dir", str(ckdir), "--resume", "--out", str(out)]


def _launch(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives with proc)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    return proc


def _tmp_dirs(d: Path) -> list[str]:
    return (
        sorted(p.name for p in d.glob("*orbax-checkpoint-tmp*")) if d.exists() else []
    )


def _watch(proc, ckdir: Path, t0: float, timeline: list, kill=None):
    """Poll until the process ends; with ``kill = (target_step, extra_s)`` SIGKILL it
    ``extra_s`` seconds after its newest checkpoint reaches ``target_step``."""
    deadline = None
    while proc.poll() is None:
        now = time.perf_counter() - t0
        step = jckpt.latest_step(ckdir) or 0
        timeline.append((now, step))
        if kill is not None and deadline is None and step >= kill[0]:
            deadline = now + kill[1]
        if deadline is not None and now >= deadline:
            tmp = _tmp_dirs(ckdir)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed_at_s": round(now, 3), "tmp_dirs_at_kill": tmp}
        time.sleep(0.02)
    if proc.returncode != 0:
        proc.log.seek(0)
        raise RuntimeError(f"training process failed:\n{proc.log.read()[-3000:]}")
    return None


def _compare(cfg: ExperimentConfig, ref_dir: Path, faulty_dir: Path) -> dict:
    b = build(cfg)
    like = {"state": b["state"], "key": jax.random.key(cfg.seed + 1)}
    ref = jckpt.restore(ref_dir, like)
    got = jckpt.restore(faulty_dir, like)
    leaves_r, leaves_g = jax.tree.leaves(ref.tree), jax.tree.leaves(got.tree)
    unequal = 0
    for a, c in zip(leaves_r, leaves_g, strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, c = jax.random.key_data(a), jax.random.key_data(c)
        unequal += not np.array_equal(np.asarray(a), np.asarray(c))
    hist_equal = all(
        np.array_equal(ref.history.train[k], got.history.train[k], equal_nan=True)
        for k in ref.history.train
    ) and all(
        np.array_equal(ref.history.eval[k], got.history.eval[k])
        for k in ref.history.eval
    )
    return {
        "final_step_ref": ref.step,
        "final_step_faulty": got.step,
        "leaves": len(leaves_r),
        "unequal_leaves": int(unequal),
        "history_bit_identical": bool(hist_equal),
        "final_avg_model_acc": float(ref.history.eval["avg_model_acc"][-1]),
    }


def run_one(algorithm: str, quick: bool, kills: int, rng, work: Path) -> dict:
    cfg = _cfg(algorithm, quick)
    ref_dir, faulty_dir = work / f"{algorithm}_ref", work / f"{algorithm}_faulty"
    ref_out, faulty_out = work / f"{algorithm}_ref_out", work / f"{algorithm}_out"
    print(f"[{algorithm}] uninterrupted reference run ({cfg.steps} steps) ...")
    t0 = time.perf_counter()
    ref_timeline: list = []
    _watch(_launch(_command(cfg, ref_dir, ref_out)), ref_dir, t0, ref_timeline, None)
    t_ref = time.perf_counter() - t0
    # kill moments: uniform over the training phase still ahead of each launch
    # (start-up + compilation take t_first seconds, see below)
    t_first = next((t for t, s in ref_timeline if s > 0), 0.0)
    t_chunk = (t_ref - t_first) / max(1, cfg.steps // cfg.eval_every - 1)
    print(
        f"[{algorithm}] reference took {t_ref:.1f} s (first checkpoint after "
        f"{t_first:.1f} s: start-up and compilation)"
    )

    events, timeline = [], []
    t0 = time.perf_counter()
    for k in range(kills):
        start = time.perf_counter() - t0
        before = jckpt.latest_step(faulty_dir) or 0
        # a random moment of the training still ahead: once the newest checkpoint
        # reaches a uniformly drawn step, wait a uniform fraction of one chunk
        # (so kills land anywhere in a chunk, checkpoint writes included)
        grid = np.arange(before + cfg.eval_every, cfg.steps, cfg.eval_every)
        if len(grid) == 0:
            break
        target = int(rng.choice(grid))
        extra = float(rng.uniform(0.0, t_chunk))
        kill_after = extra
        proc = _launch(_command(cfg, faulty_dir, faulty_out))
        ev = _watch(proc, faulty_dir, t0, timeline, (target, extra))
        if ev is None:  # finished before the kill: nothing left to interrupt
            events.append({"kill": k, "finished_before_kill": True})
            break
        ev.update(
            kill=k,
            target_step=target,
            seconds_after_target=round(kill_after, 3),
            seconds_into_process=round(ev["killed_at_s"] - start, 3),
            checkpoint_before=before,
            checkpoint_after=jckpt.latest_step(faulty_dir) or 0,
        )
        events.append(ev)
        print(
            f"[{algorithm}] SIGKILL #{k + 1} {kill_after:.2f} s after checkpoint "
            f"{target}: checkpoint "
            f"step {ev['checkpoint_before']} -> {ev['checkpoint_after']}"
            + (
                f", unfinished write {ev['tmp_dirs_at_kill']}"
                if ev["tmp_dirs_at_kill"]
                else ""
            )  # fmt: skip
        )
    _watch(
        _launch(_command(cfg, faulty_dir, faulty_out)), faulty_dir, t0, timeline, None
    )
    print(f"[{algorithm}] resumed run finished; comparing ...")
    res = _compare(cfg, ref_dir, faulty_dir)
    ref_recs = (ref_out / "metrics.jsonl").read_text()
    res["metrics_jsonl_identical"] = (
        ref_recs == (faulty_out / "metrics.jsonl").read_text()
    )
    res.update(
        algorithm=algorithm,
        steps=cfg.steps,
        eval_every=cfg.eval_every,
        kills=sum("killed_at_s" in e for e in events),
        kills_during_write=sum(bool(e.get("tmp_dirs_at_kill")) for e in events),
        events=events,
        reference_seconds=round(t_ref, 2),
        faulty_total_seconds=round(time.perf_counter() - t0, 2),
        timeline=[(round(t, 2), s) for t, s in timeline[::5]],
        ref_timeline=[(round(t, 2), s) for t, s in ref_timeline[::5]],
        bit_identical=res["unequal_leaves"] == 0
        and res["history_bit_identical"]
        and res["metrics_jsonl_identical"]
        and res["final_step_faulty"] == cfg.steps,
    )
    return res


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6))
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        t, s = zip(*r["timeline"], strict=True) if r["timeline"] else ((), ())
        ax.plot(t, s, label="killed + resumed", drawstyle="steps-post")
        tr, sr = zip(*r["ref_timeline"], strict=True) if r["ref_timeline"] else ((), ())
        ax.plot(tr, sr, "--", label="uninterrupted", drawstyle="steps-post")
        for e in r["events"]:
            if "killed_at_s" in e:
                ax.axvline(e["killed_at_s"], color="r", lw=0.8, alpha=0.6)
        ax.set_title(f"{r['algorithm']}: {r['kills']} SIGKILLs (red)")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("latest checkpoint step")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: list[dict]) -> str:
    rows = [
        "| algorithm | steps | SIGKILLs | during a write | final step | unequal "
        "leaves | history identical | metrics.jsonl identical | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['algorithm']} | {r['steps']} | {r['kills']} | "
            f"{r['kills_during_write']} | {r['final_step_faulty']} | "
            f"{r['unequal_leaves']}/{r['leaves']} | {r['history_bit_identical']} | "
            f"{r['metrics_jsonl_identical']} | **{r['bit_identical']}** |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs per run")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    kills = args.kills if args.kills is not None else (2 if args.quick else 5)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jaxdec_faults_"))
    try:
        results = [
            run_one(a, args.quick, kills, rng, work)
            for a in ("dsgd", "gradient_tracking")
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"quick": args.quick, "seed": args.seed, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = _markdown(results)
    (out / "report.md").write_text(
        "# Fault injection: SIGKILL + resume\n\n"
        f"Mode: {'quick' if args.quick else 'full'}; each launch is killed at a "
        "random moment: when its newest checkpoint reaches a step drawn uniformly "
        "from the checkpoint steps still ahead, plus a delay uniform over the "
        "duration of one chunk (kills land anywhere in a chunk, writes included), "
        "seed "
        f"{args.seed}. Each kill is a SIGKILL of a `jaxdec run --resume` process; "
        "the next launch resumes from the newest valid checkpoint.\n\n" + table + "\n"
    )
    _plot(results, out / "timeline.png")
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'timeline.png'}")
    return 0 if all(r["bit_identical"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
