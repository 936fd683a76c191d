"""Gradient-based hyperparameter studies on real digits (issue 8).

16 workers, Dirichlet(alpha=0.5) label skew over scikit-learn's digits (20% of the
training split held out as a validation set), an MLP(32) per worker, D-SGD.

(a) Learning-rate schedule: a 4-phase piecewise-constant schedule tuned by
    hypergradient descent (Adam on log learning rates, gradient of the validation
    loss of the averaged model through the whole unrolled training run) vs. a grid
    search over constant learning rates with the same number of training runs.
(b) Learned mixing: on a ring, a torus and an Erdos-Renyi graph, the
    parametrized doubly-stochastic W tuned (i) for consensus speed and (ii) for
    validation loss through training, vs. Metropolis-Hastings weights: spectral
    gap and accuracy.
(c) One vmapped program over learning rate x topology (heat map), a 16 learning
    rates x 64 workers sweep checked against separate runs, and the memory of a
    1k-step hypergradient with and without jax.checkpoint.

Writes ``experiments/results/hyper/{summary.json,results.md,*.png}``.

    python experiments/hyper.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdec as jd
from jaxdec import hyper, topology

OUT = Path(__file__).parent / "results" / "hyper"


def setup(n: int, alpha: float, batch: int, iid: bool = False):
    ds = jd.data.load_digits()
    r = np.random.default_rng(0)
    perm = r.permutation(len(ds.y_train))
    nv = len(perm) // 5
    xv, yv = ds.x_train[perm[:nv]], ds.y_train[perm[:nv]]
    xtr, ytr = ds.x_train[perm[nv:]], ds.y_train[perm[nv:]]
    if iid:
        parts = jd.data.iid(ytr, n, seed=0)
    else:
        parts = jd.data.dirichlet(ytr, n, alpha=alpha, seed=0)
    sampler = jd.data.make_sampler(jd.data.stack(xtr, ytr, parts), batch)
    model = jd.models.MLP(hidden=(32,), num_classes=10)
    loss = jd.models.classification_loss(model)
    apply = jd.models.apply_fn(model)
    ev_val = jd.metrics.evaluator(apply, xv, yv)
    ev_test = jd.metrics.evaluator(apply, ds.x_test, ds.y_test)
    params0 = jd.models.init_workers(model, jax.random.key(0), n, xtr[:1])
    return sampler, loss, ev_val, ev_test, params0


def dsgd_factory(loss):
    def make(lr, W):
        return jd.algorithms.dsgd(loss, optax.sgd(lr), hyper.traced_dense(W))

    return make


def graphs(n: int) -> dict:
    return {
        "ring": topology.ring(n),
        "torus": topology.torus(n),
        "erdos_renyi": topology.erdos_renyi(n, 0.25, seed=0),
    }


def metrics_of(ev, state) -> dict:
    m = ev(state)
    return {
        k: float(m[k])
        for k in (
            "avg_model_acc",
            "avg_model_loss",
            "local_acc_mean",
            "consensus_distance",
        )
    }


# ----------------------------------------------------------------------------- (a)


def lr_schedule_study(cfg, sampler, loss, ev_val, ev_test, params0, out):
    T, K, S = cfg["steps"], 4, cfg["budget"]
    n = cfg["workers"]
    W = jnp.asarray(topology.mixing_matrix(topology.ring(n)), jnp.float32)
    make = dsgd_factory(loss)
    key = jax.random.key(1)

    def train(lr_or_sched, k, smp):
        s, _ = hyper.unroll(lambda h: make(h, W), lr_or_sched, params0, smp, k, T)
        return s

    def sched_objective(log_lr, k, smp, ev):
        sched = hyper.piecewise_constant(jnp.exp(log_lr), T)
        return ev(train(sched, k, smp))["avg_model_loss"]

    # hypergradient descent on log learning rates, starting from a constant 0.05
    print(f"(a) hypergradient descent: {S} steps of a {T}-step unroll")
    tic = time.perf_counter()
    trace = []
    res = hyper.minimize(
        sched_objective,
        jnp.full((K,), np.log(0.05), jnp.float32),
        optax.adam(cfg["hyper_lr"]),
        S,
        sampler,
        ev_val,
        key=key,
        callback=lambda s, x, v: trace.append(
            {"step": s, "val_loss": v, "lrs": np.exp(np.asarray(x)).tolist()}
        ),
    )
    t_hyper = time.perf_counter() - tic
    for rec in trace[:: max(1, S // 8)]:
        lrs = ", ".join(f"{v:.3f}" for v in rec["lrs"])
        print(f"  step {rec['step']:3d} val loss {rec['val_loss']:.4f} lrs [{lrs}]")
    tuned = np.exp(np.asarray(res.best_x))

    # grid search over constant learning rates, same number of training runs,
    # one vmapped program; run g uses the same noise key as hypergradient step g
    lrs = np.logspace(-2.5, 0.3, S).astype(np.float32)

    def grid_point(h, smp, ev):
        s = train(h["lr"], jax.random.fold_in(key, h["s"]), smp)
        return ev(s)["avg_model_loss"]

    tic = time.perf_counter()
    flat = {"lr": jnp.asarray(lrs), "s": jnp.arange(S, dtype=jnp.int32)}
    grid_val = np.asarray(
        jax.jit(lambda h, smp, ev: hyper.sweep(grid_point, h, smp, ev))(
            flat, sampler, ev_val
        )
    )
    t_grid = time.perf_counter() - tic
    best_lr = float(
        lrs[np.nanargmin(np.where(np.isfinite(grid_val), grid_val, np.inf))]
    )
    print(
        f"  grid: best constant lr {best_lr:.4f} (val loss {np.nanmin(grid_val):.4f})"
    )

    # final comparison on fresh seeds
    final_train = jax.jit(
        lambda sched_vals, k, smp: train(
            hyper.piecewise_constant(sched_vals, T), k, smp
        )
    )
    finals = {"hypergradient schedule": [], "grid-search constant lr": []}
    for seed in range(cfg["seeds"]):
        k = jax.random.key(1000 + seed)
        for name, vals in (
            ("hypergradient schedule", tuned),
            ("grid-search constant lr", np.full(K, best_lr, np.float32)),
        ):
            s = final_train(jnp.asarray(vals, jnp.float32), k, sampler)
            m = metrics_of(ev_test, s)
            m["val_loss"] = float(ev_val(s)["avg_model_loss"])
            finals[name].append(m)
    summary = {
        "steps": T,
        "budget_runs": S,
        "phases": K,
        "tuned_lrs": tuned.tolist(),
        "best_grid_lr": best_lr,
        "grid_lrs": lrs.tolist(),
        "grid_val_loss": grid_val.tolist(),
        "hyper_trace": trace,
        "hyper_final_val_loss": float(res.values[-1]),
        "wall_s": {"hypergradient": t_hyper, "grid": t_grid},
        "final": {k: _mean_std(v) for k, v in finals.items()},
    }
    for name, v in summary["final"].items():
        print(
            f"  {name:26s} test acc {v['avg_model_acc'][0]:.4f} +- "
            f"{v['avg_model_acc'][1]:.4f}  val loss {v['val_loss'][0]:.4f}"
        )
    _plot_lr(summary, out / "lr_schedule.png")
    return summary


def _mean_std(rows: list[dict]) -> dict:
    return {
        k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))]
        for k in rows[0]
    }


def _plot_lr(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(
        summary["grid_lrs"], summary["grid_val_loss"], "o-", label="grid (const lr)"
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss after training")
    ax.axhline(
        summary["hyper_final_val_loss"],
        color="r",
        ls="--",
        label="hypergradient schedule",
    )
    ax.legend()
    ax = axes[1]
    vals = [r["val_loss"] for r in summary["hyper_trace"]]
    ax.plot(vals, label="hypergradient descent")
    ax.plot(np.minimum.accumulate(summary["grid_val_loss"]), label="grid, best so far")
    ax.set_xlabel("training runs used")
    ax.set_ylabel("validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- (b)


def mixing_study(cfg, sampler, loss, ev_val, ev_test, params0, lr, out):
    T, n = cfg["steps"], cfg["workers"]
    make = dsgd_factory(loss)
    key = jax.random.key(2)

    def val_objective(W, k, smp, ev):
        s, _ = hyper.unroll(lambda h: make(lr, h), W, params0, smp, k, T)
        return ev(s)["avg_model_loss"]

    final_train = jax.jit(
        lambda W, k, smp: hyper.unroll(lambda h: make(lr, h), W, params0, smp, k, T)[0]
    )
    results = {}
    for gname, G in graphs(n).items():
        Ws = {"metropolis": topology.mixing_matrix(G)}
        tic = time.perf_counter()
        rc = hyper.tune_mixing(
            G,
            "consensus",
            num_steps=cfg["mix_steps"],
            rounds=256,
            optimizer=optax.adam(0.1),
        )
        Ws["learned: consensus"] = np.asarray(
            hyper.parametrized_mixing(G, rc.best_x), np.float64
        )
        t_cons = time.perf_counter() - tic
        tic = time.perf_counter()
        rv = hyper.tune_mixing(
            G,
            val_objective,
            sampler,
            ev_val,
            key=key,
            num_steps=cfg["mix_val_steps"],
            optimizer=optax.adam(0.2),
        )
        Ws["learned: val loss"] = np.asarray(
            hyper.parametrized_mixing(G, rv.best_x), np.float64
        )
        t_val = time.perf_counter() - tic
        rows = {}
        for wname, W in Ws.items():
            per_seed = []
            for seed in range(cfg["seeds"]):
                s = final_train(
                    jnp.asarray(W, jnp.float32), jax.random.key(2000 + seed), sampler
                )
                m = metrics_of(ev_test, s)
                m["val_loss"] = float(ev_val(s)["avg_model_loss"])
                per_seed.append(m)
            rows[wname] = {
                "spectral_gap": topology.spectral_gap(W),
                "min_offdiag_weight": float(W[W > 0].min()),
                "self_weight_mean": float(np.mean(np.diag(W))),
                **_mean_std(per_seed),
            }
            print(
                f"(b) {gname:12s} {wname:20s} gap {rows[wname]['spectral_gap']:.4f}  "
                f"test acc {rows[wname]['avg_model_acc'][0]:.4f}  "
                f"val loss {rows[wname]['val_loss'][0]:.4f}"
            )
        results[gname] = {
            "edges": G.number_of_edges(),
            "weights": rows,
            "val_tuning_trace": rv.values.tolist(),
            "consensus_tuning_trace": rc.values[
                :: max(1, len(rc.values) // 50)
            ].tolist(),
            "wall_s": {"consensus": t_cons, "val_loss": t_val},
        }
    _plot_mixing(results, out / "mixing.png")
    return results


def _plot_mixing(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(results)
    wnames = list(next(iter(results.values()))["weights"])
    width = 0.8 / len(wnames)
    for a, (metric, label) in enumerate(
        (("spectral_gap", "spectral gap 1 - lambda"), ("avg_model_acc", "test acc"))
    ):
        ax = axes[a]
        for k, w in enumerate(wnames):
            vals = [results[g]["weights"][w][metric] for g in names]
            vals = [v[0] if isinstance(v, list) else v for v in vals]
            ax.bar(np.arange(len(names)) + k * width, vals, width, label=w)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_ylabel(label)
        if metric == "avg_model_acc":
            lo = min(results[g]["weights"][w][metric][0] for g in names for w in wnames)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- (c)


def heatmap_study(cfg, sampler, loss, ev_val, ev_test, params0, out):
    T, n = cfg["steps"], cfg["workers"]
    make = dsgd_factory(loss)
    tops = {
        "ring": topology.ring(n),
        "torus": topology.torus(n),
        "erdos_renyi": topology.erdos_renyi(n, 0.25, seed=0),
        "exponential": topology.exponential(n),
        "complete": topology.complete(n),
    }
    Ws = jnp.asarray(
        np.stack([topology.mixing_matrix(G) for G in tops.values()]), jnp.float32
    )
    lrs = np.logspace(-2, 0.3, cfg["heat_lrs"]).astype(np.float32)
    flat, shape = hyper.grid(W=Ws, lr=jnp.asarray(lrs))
    key = jax.random.key(3)

    def point(h, smp, ev):
        s, _ = hyper.unroll(lambda hh: make(hh["lr"], hh["W"]), h, params0, smp, key, T)
        m = ev(s)
        return {"acc": m["avg_model_acc"], "consensus": m["consensus_distance"]}

    tic = time.perf_counter()
    res = jax.jit(lambda h, smp, ev: hyper.sweep(point, h, smp, ev, shape=shape))(
        flat, sampler, ev_test
    )
    res = jax.tree.map(np.asarray, res)
    wall = time.perf_counter() - tic
    print(f"(c) {shape[0]} topologies x {shape[1]} lrs in one program: {wall:.1f} s")
    hyper.plot_sweep(
        res["acc"],
        out / "heatmap.png",
        x=[f"{v:.3g}" for v in lrs],
        y=list(tops),
        xlabel="learning rate",
        ylabel="topology (Metropolis W)",
        title=f"test accuracy of the averaged model after {T} D-SGD steps",
        fmt="{:.2f}",
    )
    return {
        "topologies": list(tops),
        "lrs": lrs.tolist(),
        "avg_model_acc": res["acc"].tolist(),
        "consensus_distance": res["consensus"].tolist(),
        "wall_s": wall,
        "runs": int(np.prod(shape)),
    }


def big_sweep_study(cfg):
    """16 learning rates x 64 workers in one program == 16 separate runs."""
    n, L, T = cfg["big_workers"], cfg["big_lrs"], cfg["big_steps"]
    sampler, loss, _, ev_test, params0 = setup(n, 0.5, 8, iid=True)
    make = dsgd_factory(loss)
    W = jnp.asarray(topology.mixing_matrix(topology.ring(n)), jnp.float32)
    lrs = jnp.asarray(np.logspace(-2, 0, L), jnp.float32)
    key = jax.random.key(4)

    def run_one(lr, smp):
        s, summ = hyper.unroll(
            lambda h: make(h, W), lr, params0, smp, key, T, checkpoint_every=None
        )
        return s.params, summ["loss"]

    swept = jax.jit(lambda h, smp: hyper.sweep(run_one, h, smp))
    jax.block_until_ready(swept(lrs, sampler))
    tic = time.perf_counter()
    p_sw, loss_sw = jax.block_until_ready(swept(lrs, sampler))
    t_sweep = time.perf_counter() - tic
    single = jax.jit(run_one)
    jax.block_until_ready(single(lrs[0], sampler))
    tic = time.perf_counter()
    outs = [jax.block_until_ready(single(lr, sampler)) for lr in lrs]
    t_loop = time.perf_counter() - tic
    diffs, bitwise = [], True
    for g, (p, lo) in enumerate(outs):
        d = 0.0
        for a, b in zip(
            jax.tree.leaves((p, lo)), jax.tree.leaves((p_sw, loss_sw)), strict=True
        ):
            a, b = np.asarray(a), np.asarray(b[g])
            bitwise &= bool(np.array_equal(a, b))
            d = max(d, float(np.max(np.abs(a - b))))
        diffs.append(d)
    diff = max(diffs)
    print(
        f"(c) {L} lrs x {n} workers x {T} steps: one vmapped program {t_sweep:.2f} s, "
        f"{L} separate runs {t_loop:.2f} s, max |diff| {diff:.2e}, bitwise {bitwise}"
    )
    for lr, d in zip(np.asarray(lrs), diffs, strict=True):
        print(f"    lr {lr:.4f}: max |sweep - separate| = {d:.2e}")
    return {
        "workers": n,
        "lrs": L,
        "steps": T,
        "sweep_s": t_sweep,
        "loop_s": t_loop,
        "max_abs_diff": diff,
        "lr_values": np.asarray(lrs).tolist(),
        "max_abs_diff_per_lr": diffs,
        "bitwise_identical": bitwise,
    }


def memory_study(cfg, sampler, loss, ev_val, params0):
    T, n = cfg["mem_steps"], cfg["workers"]
    make = dsgd_factory(loss)
    W = jnp.asarray(topology.mixing_matrix(topology.ring(n)), jnp.float32)
    key = jax.random.key(5)
    out = {"steps": T}
    for label, ck in (("plain", None), ("checkpointed", "auto")):

        def obj(lr, smp, ev, ck=ck):
            s, _ = hyper.unroll(
                lambda h: make(h, W), lr, params0, smp, key, T, checkpoint_every=ck
            )
            return ev(s)["avg_model_loss"]

        g = jax.grad(obj)
        mem = hyper.compiled_memory(g, jnp.float32(0.1), sampler, ev_val)
        f = jax.jit(g)
        jax.block_until_ready(f(jnp.float32(0.1), sampler, ev_val))
        tic = time.perf_counter()
        val = float(f(jnp.float32(0.1), sampler, ev_val))
        wall = time.perf_counter() - tic
        out[label] = {
            "memory": mem,
            "grad_s": wall,
            "hypergrad": val,
            "chunk": None if ck is None else hyper.auto_checkpoint(T),
        }
        tb = mem["temp_bytes"] / 2**20 if mem else float("nan")
        print(
            f"(c) {T}-step hypergradient, {label:12s}: temp {tb:8.2f} MiB, "
            f"{wall:.2f} s, d val/d lr = {val:.4g}"
        )
    return out


# --------------------------------------------------------------------------- main


def write_markdown(summary, path):
    a, b, c = summary["lr_schedule"], summary["mixing"], summary["heatmap"]
    L = []
    L.append(f"# Hyperparameter studies on digits ({summary['mode']} mode)\n")
    L.append(
        f"{summary['config']['workers']} workers, Dirichlet alpha=0.5, "
        f"MLP(32), D-SGD, {a['steps']} steps per training run; test metrics "
        f"are mean +- std over {summary['config']['seeds']} fresh seeds.\n"
    )
    L.append(
        "## (a) Learning-rate schedule: hypergradient vs grid "
        f"({a['budget_runs']} training runs each)\n"
    )
    L.append("| method | learning rates | val loss | test acc (avg model) | wall s |")
    L.append("|---|---|---|---|---|")
    fa = a["final"]
    lrs = ", ".join(f"{v:.3f}" for v in a["tuned_lrs"])
    for name, lrtxt, wall in (
        ("hypergradient schedule", f"[{lrs}]", a["wall_s"]["hypergradient"]),
        ("grid-search constant lr", f"{a['best_grid_lr']:.3f}", a["wall_s"]["grid"]),
    ):
        v = fa[name]
        L.append(
            f"| {name} | {lrtxt} | {v['val_loss'][0]:.4f} +- {v['val_loss'][1]:.4f}"
            f" | {v['avg_model_acc'][0]:.4f} +- {v['avg_model_acc'][1]:.4f} "
            f"| {wall:.1f} |"
        )
    L.append("\n## (b) Learned mixing weights\n")
    L.append(
        "| graph | W | spectral gap | test acc (avg model) | local acc | val loss |"
    )
    L.append("|---|---|---|---|---|---|")
    for g, r in b.items():
        for w, v in r["weights"].items():
            L.append(
                f"| {g} | {w} | {v['spectral_gap']:.4f} | "
                f"{v['avg_model_acc'][0]:.4f} +- {v['avg_model_acc'][1]:.4f} | "
                f"{v['local_acc_mean'][0]:.4f} | {v['val_loss'][0]:.4f} |"
            )
    L.append("\n## (c) One vmapped program: test acc, topology x learning rate\n")
    L.append("| topology | " + " | ".join(f"{x:.3g}" for x in c["lrs"]) + " |")
    L.append("|---|" + "---|" * len(c["lrs"]))
    for t, row in zip(c["topologies"], c["avg_model_acc"], strict=True):
        L.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    L.append(
        f"\n{c['runs']} runs in one program: {c['wall_s']:.1f} s (compile included).\n"
    )
    bs = summary["big_sweep"]
    d = np.asarray(bs["max_abs_diff_per_lr"])
    lv = np.asarray(bs["lr_values"])
    worst = int(np.argmax(d))
    rest = np.delete(d, worst)
    L.append(
        f"Sweep of {bs['lrs']} learning rates x {bs['workers']} workers x "
        f"{bs['steps']} steps as one vmapped program: {bs['sweep_s']:.2f} s vs "
        f"{bs['loop_s']:.2f} s for {bs['lrs']} separate jitted runs (after compile). "
        f"Max |sweep - separate| over params and losses: "
        f"{(rest.max() if len(rest) else d.max()):.2e} for every lr except "
        f"lr={lv[worst]:.3g} ({d[worst]:.2e}); bitwise identical: "
        f"{bs['bitwise_identical']} (batched float32 matmuls round differently; "
        "the largest learning rates amplify that rounding chaotically).\n"
    )
    m = summary["memory"]
    L.append(f"## Memory of a {m['steps']}-step hypergradient (XLA estimate)\n")
    L.append("| unroll | temp MiB | grad wall s |")
    L.append("|---|---|---|")
    for k in ("plain", "checkpointed"):
        mem = m[k]["memory"]
        tb = f"{mem['temp_bytes'] / 2**20:.2f}" if mem else "n/a"
        lab = k if m[k]["chunk"] is None else f"{k} (chunks of {m[k]['chunk']})"
        L.append(f"| {lab} | {tb} | {m[k]['grad_s']:.2f} |")
    path.write_text("\n".join(L) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke sizes")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        cfg = dict(
            workers=16,
            steps=20,
            budget=3,
            hyper_lr=0.2,
            seeds=1,
            mix_steps=20,
            mix_val_steps=2,
            heat_lrs=3,
            big_workers=8,
            big_lrs=4,
            big_steps=10,
            mem_steps=40,
        )
    else:
        cfg = dict(
            workers=16,
            steps=300,
            budget=24,
            hyper_lr=0.15,
            seeds=3,
            mix_steps=300,
            mix_val_steps=20,
            heat_lrs=8,
            big_workers=64,
            big_lrs=16,
            big_steps=100,
            mem_steps=1000,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    sampler, loss, ev_val, ev_test, params0 = setup(cfg["workers"], 0.5, 16)
    summary = {"mode": "quick" if args.quick else "full", "config": cfg}
    summary["lr_schedule"] = lr_schedule_study(
        cfg, sampler, loss, ev_val, ev_test, params0, out
    )
    lr = summary["lr_schedule"]["best_grid_lr"]
    summary["mixing"] = mixing_study(
        cfg, sampler, loss, ev_val, ev_test, params0, lr, out
    )
    summary["heatmap"] = heatmap_study(
        cfg, sampler, loss, ev_val, ev_test, params0, out
    )
    summary["big_sweep"] = big_sweep_study(cfg)
    summary["memory"] = memory_study(cfg, sampler, loss, ev_val, params0)
    summary["total_wall_s"] = time.perf_counter() - tic
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_markdown(summary, out / "results.md")
    print((out / "results.md").read_text())
    print(f"total {summary['total_wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
