"""Checkpoint save / restore of a large sharded algorithm state, against gathering it.

For every worker count n, the state of ``jd.algorithms.gradient_tracking`` (MLP
64-64-10 on digits, Adam: parameters, tracker, last gradient and two moments per
worker) plus the run key is checkpointed on ``D`` CPU devices (worker axis
sharded with ``jd.sharding.shard_workers``) and restored into the same sharding, as

* ``jaxdec``: ``jd.checkpoint.save`` / ``restore`` (format v2): each process writes the
  shards it holds, each leaf is verified by a content fingerprint computed on its
  devices, nothing is gathered;
* ``gather``: the baseline in the same run, the way format v1 (and most simulators)
  did it: gather every leaf to one host array (``jd.sharding.gather``), SHA-256 over
  the bytes, write the host arrays with the same orbax handler; restore reads the host
  arrays, re-hashes them and places them back with the sharding.

Reported: seconds (best of ``--repeats``) and the ratio gather / jaxdec, plus the
bytes a process receives from the others to write a checkpoint (0 for jaxdec; for
``gather`` under P processes, (P - 1) / P of the state per process).

    python experiments/bench_checkpoint.py [--sizes 1024 8192 32768] [--devices 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "bench_checkpoint"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def measure(sizes, repeats: int) -> list[dict]:
    """All sizes on this process's devices (``jax_num_cpu_devices`` set before)."""
    rows = []
    for n in sizes:
        rows.append(_one_size(n, repeats))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _one_size(n: int, repeats: int) -> dict:
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    import jaxdec as jd
    from jaxdec import checkpoint as jckpt

    mesh = jd.sharding.worker_mesh()
    ds = jd.data.load_digits(seed=0)
    model = jd.models.MLP(hidden=(64,), num_classes=10)
    params = jd.models.init_workers(model, jax.random.key(0), n, ds.x_train[:1])
    loss = jd.models.classification_loss(model)
    # gradient tracking with Adam: params, tracker, last gradient, two moments
    mix = jd.gossip.random_matching(n)  # no n x n matrix at n = 65536
    algo = jd.algorithms.gradient_tracking(loss, optax.adam(1e-3), mix)
    state = jd.sharding.shard_workers(algo.init(params), mesh)
    tree = {"state": state, "key": jax.random.key(1)}
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    tmp = Path(tempfile.mkdtemp(prefix="jaxdec-ckbench-"))
    step = iter(range(1, 10**6))
    leaves = jax.tree.leaves(tree)
    keyed = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]

    def save_v2():
        jckpt.save(tmp / "v2", next(step), tree, max_to_keep=1)

    def restore_v2():
        jax.block_until_ready(jckpt.restore(tmp / "v2", tree).tree)

    def host_leaves(t):
        return [
            np.asarray(jax.random.key_data(x) if k else x)
            for x, k in zip(jax.tree.leaves(t), keyed, strict=True)
        ]

    def sha(arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save_gather():
        data = [jax.random.key_data(x) if k else x
                for x, k in zip(leaves, keyed, strict=True)]  # fmt: skip
        arrays = [np.asarray(a) for a in jd.sharding.gather(data)]
        digest = sha(arrays)
        d = tmp / "gather"
        shutil.rmtree(d, ignore_errors=True)
        with ocp.StandardCheckpointer() as w:
            w.save(d, {f"{i:05d}": a for i, a in enumerate(arrays)})
        (tmp / "gather.sha").write_text(digest)

    def restore_gather():
        target = {f"{i:05d}": np.zeros(a.shape, a.dtype)
                  for i, a in enumerate(host_leaves(tree))}  # fmt: skip
        with ocp.StandardCheckpointer() as r:
            got = r.restore(tmp / "gather", target)
        arrays = [np.asarray(got[k]) for k in sorted(got)]
        assert sha(arrays) == (tmp / "gather.sha").read_text()
        out = []
        for a, leaf, k in zip(arrays, leaves, keyed, strict=True):
            ref = jax.random.key_data(leaf) if k else leaf
            x = jax.make_array_from_callback(
                a.shape, ref.sharding, lambda idx, a=a: a[idx]
            )
            out.append(jax.random.wrap_key_data(x) if k else x)
        jax.block_until_ready(out)

    for f in (save_v2, restore_v2, save_gather, restore_gather):  # warm-up
        f()
    row = {
        "n": n,
        "devices": len(jax.devices()),
        "state_MiB": nbytes / 2**20,
        "jaxdec_save_s": _best(save_v2, repeats),
        "jaxdec_restore_s": _best(restore_v2, repeats),
        "gather_save_s": _best(save_gather, repeats),
        "gather_restore_s": _best(restore_gather, repeats),
    }
    # the restored tree is the saved one, bit for bit, in the saved sharding
    got = jckpt.restore(tmp / "v2", tree).tree
    row["restored_equal"] = all(
        bool(np.array_equal(a, b))
        for a, b in zip(host_leaves(got), host_leaves(tree), strict=True)
    ) and all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(got), leaves, strict=True)
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Checkpoint save / restore of a sharded algorithm state",
        "",
        f"{meta['machine']}; jax {meta['jax']}; MLP 64-64-10 gradient-tracking "
        "state with Adam (parameters, tracker, last gradient, two moments) + run key, "
        "worker axis sharded over D CPU devices. Best of "
        f"{meta['repeats']}. `jaxdec` = `jd.checkpoint` (per-shard writes, "
        "on-device fingerprints, orbax's CheckpointManager with a JSON metadata item "
        "and keep-last-k); `gather` = gather to the host + SHA-256 + orbax's plain "
        "StandardCheckpointer (format v1's way without the manager and metadata, so "
        "its fixed cost per checkpoint is lower).",
        "",
        "| n | D | state MiB | jaxdec save s | gather save s | gather / jaxdec "
        "| jaxdec restore s | gather restore s | gather / jaxdec "
        "| restored bit-exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['devices']} | {r['state_MiB']:.1f} "
            f"| {r['jaxdec_save_s']:.3f} | {r['gather_save_s']:.3f} "
            f"| {r['gather_save_s'] / r['jaxdec_save_s']:.2f}x "
            f"| {r['jaxdec_restore_s']:.3f} | {r['gather_restore_s']:.3f} "
            f"| {r['gather_restore_s'] / r['jaxdec_restore_s']:.2f}x "
            f"| {r['restored_equal']} |"
        )
    lines += [
        "",
        "Bytes a process receives from the others to write one checkpoint under P "
        "processes: 0 for `jaxdec` (each writes its own shards; "
        "`tests/test_multihost.py` checks that no global array is gathered), "
        "(P - 1) / P of the state for `gather` (every process gathers the whole "
        "state).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _args(argv)
    if args.one is not None:  # child: one device count
        import jax

        jax.config.update("jax_num_cpu_devices", args.one)
        measure(args.sizes, args.repeats)
        return 0
    rows = []
    for d in args.devices:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, __file__, "--one", str(d), "--repeats",
               str(args.repeats), "--sizes", *map(str, args.sizes)]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr[-3000:])
            return res.returncode
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                r = rows[-1]
                print(
                    f"n={r['n']:6d} D={d}: save {r['jaxdec_save_s']:.3f} s "
                    f"(gather {r['gather_save_s']:.3f} s), restore "
                    f"{r['jaxdec_restore_s']:.3f} s (gather "
                    f"{r['gather_restore_s']:.3f} s)",
                    flush=True,
                )
    import jax

    meta = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_checkpoint.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    (args.out / "bench_checkpoint.md").write_text(_markdown(rows, meta))
    print(f"wrote {args.out}/bench_checkpoint.{{json,md}}")
    return 0 if all(r["restored_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
