"""Single global merging: sparse gossip + one final merge vs server-based training.

Reproduces the small-scale experiment of the single-merge spec sheet, section 5
(Zhu et al., arXiv:2507.06542): m = 16 agents, MLP 784-200-200-10, Fashion-MNIST with
the label-resampling protocol (agent k draws q_k ~ Dir(alpha) once and every step b = 64
labels from q_k, each with a random training example of that class), H = 20 local steps
per round, 150 rounds, SGD lr 0.01 with momentum 0.9 and weight decay 5e-4, shared init.

Runs per (alpha, seed): server-based (complete averaging every round), R 0.2 / R 1
random pairing gossip + final merge, ring / exponential + final merge, local-only +
final merge, and the dense-window sweep (complete averaging inside one of 10 windows,
R 0.2 elsewhere, no final merge). Every finished run is appended to
``runs.jsonl``; a rerun skips runs already there, so the script resumes.

    python experiments/single_merge.py                     # Fashion-MNIST, full
    python experiments/single_merge.py --quick             # digits smoke run
    python experiments/single_merge.py --alphas 0.1 --seeds 0 --no-windows
    python experiments/single_merge.py --norm batch --alphas 0.1 --seeds 0 \
        --no-windows --runs server R0.2+merge local+merge   # BatchNorm MLP

With ``--norm batch`` the MLP has BatchNorm after each hidden layer (results in
``results/single_merge/batchnorm``): training normalizes with minibatch statistics,
and every evaluated model gets statistics re-estimated on 32 pooled training batches
(``jd.merge.batch_statistics``); the merged model's are recomputed, never averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _data  # experiments/_data.py: the digits / Fashion-MNIST switch
import jax
import numpy as np
import optax

import jaxdec as jd
from jaxdec import gossip as G

OUT = Path(__file__).parent / "results" / "single_merge"


@dataclasses.dataclass
class Setup:
    dataset: str = "fashion_mnist"
    m: int = 16
    H: int = 20
    rounds: int = 150
    batch: int = 64
    lr: float = 0.01
    hidden: tuple[int, ...] = (200, 200)
    eval_rounds: int = 30
    mode: str = "pairing"
    norm: str | None = None

    @property
    def steps(self) -> int:
        return self.H * self.rounds


def schedules(s: Setup, seed: int, windows: bool) -> dict[str, G.Mixer]:
    """name -> mixing function of the step (gossip every H steps)."""
    m, T, H = s.m, s.steps, s.H
    last = m - 1
    kw = {"max_steps": T, "H": H, "seed": seed, "mode": s.mode}
    ring = jd.topology.mixing_matrix(jd.topology.ring(m))
    expo = jd.topology.mixing_matrix(jd.topology.exponential(m))
    out = {
        "server": G.every(H, G.complete(m)),
        "R0.2+merge": G.truncate(m, 0.2, last, 0.997, **kw),
        "R1+merge": G.truncate(m, 1.0, last, 0.997, **kw),
        "ring+merge": G.every(
            H, G.schedule([s.rounds - 1], [G.sparse(ring), G.complete(m)])
        ),
        "exp+merge": G.every(
            H, G.schedule([s.rounds - 1], [G.sparse(expo), G.complete(m)])
        ),
        "local+merge": G.truncate(m, 0.0, last, 0.997, **kw),
    }
    if windows:
        for w in range(10):
            out[f"window{w}"] = G.dense_window(
                m, w / 10, 0.1, r_sparse=0.2, r_dense=last, **kw
            )
    return out


def load(s: Setup):
    return _data.load(s.dataset, seed=0)


def bn_evaluator(model, ev, xb):
    """Evaluator for a BatchNorm model: statistics re-estimated on pooled batches
    ``xb`` for every local model and, separately, for the merged model."""

    def f(ev, xb, state):
        params = getattr(state, "params", state)
        stats = jax.vmap(lambda p: jd.merge.batch_statistics(model, p, xb))(params)
        out = dict(ev({"params": params, **stats}))
        merged = jd.merge.evaluate_merged(ev, state, model=model, calibration=xb)
        out["avg_model_acc"] = merged["local_acc_mean"]
        out["avg_model_loss"] = merged["local_loss_mean"]
        out["mergeability_gap"] = out["avg_model_acc"] - out["local_acc_mean"]
        return out

    return jax.tree_util.Partial(f, ev, xb)


def run_one(s: Setup, ds, alpha: float, seed: int, name: str, mix) -> dict:
    q = jd.data.dirichlet_proportions(s.m, ds.num_classes, alpha, seed)
    sampler = jd.data.label_resample_sampler(ds.x_train, ds.y_train, q, s.batch)
    model = jd.models.MLP(hidden=s.hidden, num_classes=ds.num_classes, norm=s.norm)
    params = jd.models.init_workers(
        model, jax.random.key(seed), s.m, ds.x_train[:1], with_stats=s.norm is not None
    )
    if s.norm is not None:
        params = params[0]
    opt = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(s.lr, momentum=0.9))
    algo = jd.algorithms.dsgd(jd.models.classification_loss(model), opt, mix)
    ev = jd.metrics.evaluator(jd.models.apply_fn(model), ds.x_test, ds.y_test)
    if s.norm is not None:
        k = min(32, len(ds.y_train) // s.batch)  # 32 batches, fewer on tiny sets
        pick = np.random.default_rng(seed).permutation(len(ds.y_train))[: k * s.batch]
        xb = ds.x_train[pick].reshape(k, s.batch, *ds.x_train.shape[1:])
        ev = bn_evaluator(model, ev, jax.numpy.asarray(xb))
    tic = time.perf_counter()
    key = jax.random.key(1000 + seed)
    # all rounds but the last, then the last round (whose gossip is the final merge
    # of the '+merge' schedules) separately, so the models are evaluated right
    # before it; the trajectory is the same as one uninterrupted run
    state, hist = jd.run(
        algo,
        algo.init(params),
        sampler,
        key,
        s.steps - s.H,
        eval_every=s.eval_rounds * s.H,
        eval_fn=ev,
        desc=f"a={alpha} s={seed} {name}",
    )
    pre = {k: float(v) for k, v in jax.jit(lambda e, st: e(st))(ev, state).items()}
    state, last = jd.run(
        algo,
        state,
        sampler,
        key,
        s.H,
        eval_fn=ev,
        progress=False,
        start_step=s.steps - s.H,
    )
    steps = np.concatenate([hist.eval_steps, last.eval_steps[1:]])
    curves = {k: np.concatenate([hist.eval[k], last.eval[k][1:]]) for k in hist.eval}
    budget = G.communication_budget(mix, s.steps, s.m, params)
    rec = {
        "alpha": alpha,
        "seed": seed,
        "run": name,
        "final_local_acc": float(curves["local_acc_mean"][-1]),
        "final_merged_acc": float(curves["avg_model_acc"][-1]),
        "best_local_acc": float(np.max(curves["local_acc_mean"])),
        "pre_merge_local_acc": pre["local_acc_mean"],
        "pre_merge_merged_acc": pre["avg_model_acc"],
        "pre_merge_step": s.steps - s.H,
        "eval_steps": steps.tolist(),
        "local_acc": curves["local_acc_mean"].tolist(),
        "merged_acc": curves["avg_model_acc"].tolist(),
        "consensus": curves["consensus_distance"].tolist(),
        "exchanges_per_agent": budget["realized_exchanges_per_worker"],
        "floats_per_agent": budget["floats_sent_per_worker"],
        "seconds": time.perf_counter() - tic,
    }
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-windows", action="store_true")
    p.add_argument("--mode", default="pairing", choices=["pairing", "pull"])
    p.add_argument("--quick", action="store_true", help="digits, 30 rounds, 1 seed")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--norm", default=None, choices=["batch"])
    p.add_argument("--runs", nargs="+", default=None, help="subset of schedules")
    args = p.parse_args()
    s = Setup(mode=args.mode, norm=args.norm)
    out = Path(args.out)
    if args.norm:
        out = out / "batchnorm"
    if args.quick:
        s = dataclasses.replace(
            s, dataset="digits", rounds=30, eval_rounds=10, hidden=(64,), lr=0.05
        )
        args.seeds = args.seeds[:1]
        out = out / "quick"
    out.mkdir(parents=True, exist_ok=True)
    ds = load(s)
    path = out / "runs.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["alpha"], r["seed"], r["run"]))
    for alpha in args.alphas:
        for seed in args.seeds:
            for name, mix in schedules(s, seed, not args.no_windows).items():
                if (alpha, seed, name) in done or (args.runs and name not in args.runs):
                    continue
                rec = run_one(s, ds, alpha, seed, name, mix)
                rec["setup"] = dataclasses.asdict(s)
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(
                    f"alpha={alpha} seed={seed} {name:12s} merged "
                    f"{rec['final_merged_acc']:.4f} local {rec['final_local_acc']:.4f} "
                    f"pre-merge local {rec['pre_merge_local_acc']:.4f} "
                    f"({rec['seconds']:.0f}s)",
                    flush=True,
                )
    report(path, out)


def report(path: Path, out: Path) -> None:
    """Tables (markdown), claim checks and plots from ``runs.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in path.read_text().splitlines()]
    alphas = sorted({r["alpha"] for r in recs})
    runs = list(dict.fromkeys(x["run"] for x in recs))

    def mean(alpha, run, key):
        v = [r[key] for r in recs if r["alpha"] == alpha and r["run"] == run]
        return (float(np.mean(v)), len(v)) if v else (float("nan"), 0)

    lines = [
        "| alpha | run | seeds | merged acc | local acc | pre-merge local | "
        "pre-merge merged | gap to server | exchanges / agent | floats / agent |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    claims = []
    for a in alphas:
        server, _ = mean(a, "server", "final_merged_acc")
        for run in runs:
            acc, k = mean(a, run, "final_merged_acc")
            if not k:
                continue
            lines.append(
                f"| {a} | {run} | {k} | {acc:.4f} | "
                f"{mean(a, run, 'final_local_acc')[0]:.4f} | "
                f"{mean(a, run, 'pre_merge_local_acc')[0]:.4f} | "
                f"{mean(a, run, 'pre_merge_merged_acc')[0]:.4f} | "
                f"{100 * (acc - server):+.1f} pts | "
                f"{mean(a, run, 'exchanges_per_agent')[0]:.1f} | "
                f"{mean(a, run, 'floats_per_agent')[0]:.3g} |"
            )
        r02, _ = mean(a, "R0.2+merge", "final_merged_acc")
        loc, _ = mean(a, "local+merge", "final_merged_acc")
        pre_l, _ = mean(a, "R0.2+merge", "pre_merge_local_acc")
        pre_m, _ = mean(a, "R0.2+merge", "pre_merge_merged_acc")
        tol = 4.0 if a <= 0.1 else 1.5
        claims.append(
            f"alpha={a}: R0.2+merge {100 * r02:.1f} vs server "
            f"{100 * server:.1f}: gap {100 * (server - r02):.1f} pts "
            f"(target <= {tol}) -> {'OK' if server - r02 <= tol / 100 else 'NO'}"
        )
        if a <= 0.1:
            claims.append(
                f"alpha={a}: mergeability before merge: merged {100 * pre_m:.1f}"
                f" vs mean local {100 * pre_l:.1f} (target >= +10 pts) -> "
                f"{'OK' if pre_m - pre_l >= 0.10 else 'NO'}"
            )
            claims.append(
                f"alpha={a}: local+merge {100 * loc:.1f} vs R0.2+merge "
                f"{100 * r02:.1f} (target <= -5 pts) -> "
                f"{'OK' if loc <= r02 - 0.05 else 'NO'}"
            )
            w_last, kl = mean(a, "window9", "final_local_acc")
            w_first, kf = mean(a, "window0", "final_local_acc")
            if kl and kf:
                claims.append(
                    f"alpha={a}: window last {100 * w_last:.1f} vs first "
                    f"{100 * w_first:.1f} (target >= +10 pts) -> "
                    f"{'OK' if w_last - w_first >= 0.10 else 'NO'}"
                )
    md = [
        "# Single global merging: results",
        "",
        *lines,
        "",
        "## Claims (spec section 5)",
        "",
        *(f"- {c}" for c in claims),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(lines))
    print("\n".join(claims))

    # curves: local vs merged accuracy per schedule (first seed of each alpha)
    fig, axes = plt.subplots(
        1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False
    )
    for ax, a in zip(axes[0], alphas, strict=True):
        for run in ("server", "R0.2+merge", "R1+merge", "ring+merge", "local+merge"):
            rr = [r for r in recs if r["alpha"] == a and r["run"] == run]
            if not rr:
                continue
            r = rr[0]
            (line,) = ax.plot(r["eval_steps"], r["merged_acc"], label=f"{run} merged")
            ax.plot(
                r["eval_steps"],
                r["local_acc"],
                "--",
                color=line.get_color(),
                label=f"{run} local",
            )
        ax.set_title(f"alpha = {a}")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    wins = [f"window{w}" for w in range(10)]
    if any(r["run"] in wins for r in recs):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(alphas)
        for j, a in enumerate(alphas):
            fin = [mean(a, w, "final_local_acc")[0] for w in wins]
            ax.bar(np.arange(10) + j * width, fin, width, label=f"alpha={a} final")
        ax.set_xticks(np.arange(10) + 0.4 - width / 2)
        ax.set_xticklabels([f"{w / 10:.1f}" for w in range(10)])
        ax.set_xlabel("start of the dense window (fraction of training)")
        ax.set_ylabel("final mean local accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "windows.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in alphas:
        for run in runs:
            acc, k = mean(a, run, "final_merged_acc")
            if k and not run.startswith("window"):
                fl = mean(a, run, "floats_per_agent")[0]
                ax.scatter(fl, acc, label=f"a={a} {run}")
    ax.set_xscale("symlog")
    ax.set_xlabel("floats sent per agent")
    ax.set_ylabel("final merged accuracy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "comm_vs_acc.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
