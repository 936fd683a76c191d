"""Throughput of a full D-SGD step: vmapped jaxdec vs a per-worker Python loop.

For every worker count n, one D-SGD step (per-worker minibatch gradient of an MLP on
digits, batch 32, SGD update, gossip on a ring) is timed as

* ``jaxdec dense``: ``jd.algorithms.dsgd`` with ``jd.gossip.dense(W)``, scanned;
* ``jaxdec sparse``: the same with ``jd.gossip.sparse(W)`` (rolls of the worker axis);
* ``loop``: the same JAX math as a Python loop over workers (a jitted one-worker
  gradient step, then a jitted one-worker neighbour average), measured in the same
  run, the way a simulator without a worker axis runs.

Reported: worker-steps per second (n x steps / s) and the speedup over the loop.

    python experiments/bench_gossip.py [--sizes 16 64 256 1024 4096] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdec as jd

OUT = Path(__file__).parent / "results" / "bench_gossip"


def _setup(n: int, batch: int, seed: int = 0):
    ds = jd.data.load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    # every worker holds 64 training digits (drawn with overlap, so any n works)
    parts = [rng.choice(len(ds.y_train), 64, replace=False) for _ in range(n)]
    wd = jd.data.stack(ds.x_train, ds.y_train, parts)
    model = jd.models.MLP(hidden=(64,), num_classes=10)
    params = jd.models.init_workers(model, jax.random.key(seed), n, ds.x_train[:1])
    loss = jd.models.classification_loss(model)
    sampler = jd.data.make_sampler(wd, batch)
    W = jd.topology.mixing_matrix(jd.topology.ring(n))
    return params, loss, sampler, W


def _time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def bench_vmapped(n, mixer, steps, batch, lr=0.05, repeats=3):
    params, loss, sampler, W = _setup(n, batch)
    mix = mixer(W)
    algo = jd.algorithms.dsgd(loss, optax.sgd(lr), mix)
    state = algo.init(params)
    key = jax.random.key(1)
    # the sampler is a pytree: passing it as an argument keeps the data out of
    # the compiled program
    run = jax.jit(lambda s, smp: jd.run_traced(algo, s, smp, key, steps)[0])
    return _time(lambda: run(state, sampler), repeats) / steps


def bench_loop(n, steps, batch, lr=0.05, repeats=2):
    params, loss, sampler, W = _setup(n, batch)
    grad = jax.grad(loss)

    @jax.jit
    def local_step(p, b, key):  # one worker: x_i <- x_i - lr g_i
        g = grad(p, b, key)
        return jax.tree.map(lambda x, gg: x - lr * gg, p, g)

    @jax.jit
    def average(ws, ps):  # one worker: x_i <- sum_j W_ij x_j over its neighbours
        return jax.tree.map(
            lambda *xs: sum(w * x for w, x in zip(ws, xs, strict=True)), *ps
        )

    workers = [jax.tree.map(lambda x, i=i: x[i], params) for i in range(n)]
    nbrs = [np.flatnonzero(W[i]) for i in range(n)]
    weights = [tuple(float(W[i, j]) for j in nb) for i, nb in enumerate(nbrs)]
    key = jax.random.key(1)

    def run():
        ws = workers
        for t in range(steps):
            xb, yb = sampler(key, jnp.int32(t))
            keys = jax.random.split(jax.random.fold_in(key, t), n)
            ws = [local_step(ws[i], (xb[i], yb[i]), keys[i]) for i in range(n)]
            ws = [average(weights[i], [ws[j] for j in nbrs[i]]) for i in range(n)]
        return ws

    return _time(run, repeats) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--loop-max", type=int, default=256, help="largest n for the loop")
    p.add_argument("--dense-max", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    rows = []
    for n in args.sizes:
        row = {"n": n}
        row["sparse_s"] = bench_vmapped(n, jd.gossip.sparse, args.steps, args.batch)
        if n <= args.dense_max:
            row["dense_s"] = bench_vmapped(n, jd.gossip.dense, args.steps, args.batch)
        if n <= args.loop_max:
            loop_steps = max(2, min(args.steps, 2000 // n))
            row["loop_s"] = bench_loop(n, loop_steps, args.batch)
        for k in ("sparse", "dense", "loop"):
            if f"{k}_s" in row:
                row[f"{k}_worker_steps_per_s"] = n / row[f"{k}_s"]
        if "loop_s" in row:
            row["speedup_sparse_vs_loop"] = row["loop_s"] / row["sparse_s"]
            if "dense_s" in row:
                row["speedup_dense_vs_loop"] = row["loop_s"] / row["dense_s"]
        rows.append(row)
        print(_fmt_row(row), flush=True)

    by_n = {r["n"]: r for r in rows}
    checks = {}
    if 256 in by_n and "speedup_sparse_vs_loop" in by_n[256]:
        checks["vmapped_vs_loop_at_256"] = by_n[256]["speedup_sparse_vs_loop"]
    if 256 in by_n and 4096 in by_n:
        checks["sparse_throughput_4096_over_256"] = (
            by_n[4096]["sparse_worker_steps_per_s"]
            / by_n[256]["sparse_worker_steps_per_s"]
        )
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": __import__("os").cpu_count(),
        },
        "config": vars(args),
        "rows": rows,
        "checks": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [_HEADER, "|---:|---:|---:|---:|---:|---:|"]
    md += [_fmt_md(r) for r in rows]
    md += ["", *(f"- {k}: {v:.2f}" for k, v in checks.items())]
    (out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(f"{k}: {v:.2f}" for k, v in checks.items()))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


_HEADER = (
    "| n | sparse worker-steps/s | dense worker-steps/s | loop worker-steps/s "
    "| sparse / loop | dense / loop |"
)


def _get(r, k, f="{:.3g}"):
    return f.format(r[k]) if k in r else "-"


def _fmt_md(r):
    return (
        f"| {r['n']} | {_get(r, 'sparse_worker_steps_per_s')} "
        f"| {_get(r, 'dense_worker_steps_per_s')} "
        f"| {_get(r, 'loop_worker_steps_per_s')} "
        f"| {_get(r, 'speedup_sparse_vs_loop', '{:.1f}x')} "
        f"| {_get(r, 'speedup_dense_vs_loop', '{:.1f}x')} |"
    )


def _fmt_row(r):
    return (
        f"n={r['n']:>5}  sparse {_get(r, 'sparse_worker_steps_per_s'):>8} w-steps/s  "
        f"dense {_get(r, 'dense_worker_steps_per_s'):>8}  "
        f"loop {_get(r, 'loop_worker_steps_per_s'):>8}  "
        f"sparse/loop {_get(r, 'speedup_sparse_vs_loop', '{:.1f}x'):>7}"
    )


if __name__ == "__main__":
    main()
