"""The ``jaxdec`` command and the config-driven experiment it runs.

``jaxdec quickstart``   D-SGD on digits over several topologies (the README's job).
``jaxdec run CONFIG``   one experiment from a JSON file of :class:`ExperimentConfig`
                        fields (flags override file values).
``jaxdec topologies``   the graph constructors with degree and spectral gap.

Everything here composes the public API: data -> partition -> model -> topology ->
mixing function -> algorithm -> :func:`jaxdec.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxdec import algorithms, data, gossip, metrics, models, topology
from jaxdec import tree as jtree
from jaxdec.run import History, run

__all__ = ["ExperimentConfig", "build", "run_experiment", "quickstart", "main"]

ALGORITHMS = ("dsgd", "gradient_tracking")
DATASETS = ("digits", "fashion_mnist", "mnist")


@dataclasses.dataclass
class ExperimentConfig:
    """A decentralized classification experiment.

    Attributes:
      dataset: ``"digits"`` (bundled), ``"fashion_mnist"`` or ``"mnist"``.
      data_path: folder with IDX files (MNIST / Fashion-MNIST); default Debian's.
      n_workers: number of workers.
      partition: ``"dirichlet"``, ``"iid"`` or ``"shards"``.
      alpha: Dirichlet concentration (smaller = more heterogeneous).
      topology: a name in ``jaxdec.topology.TOPOLOGIES``.
      rule: mixing rule for :func:`jaxdec.topology.mixing_matrix`.
      gossip: ``"sparse"`` or ``"dense"``.
      local_steps: ``H``; gossip every ``H`` steps (local SGD when ``H > 1``).
      algorithm: ``"dsgd"`` or ``"gradient_tracking"``.
      lr: learning rate; momentum: heavy-ball momentum (0 = plain SGD).
      batch_size: per-worker minibatch size.
      steps: number of steps; eval_every: evaluation period.
      model: ``"mlp"`` or ``"lenet5"``; hidden: MLP hidden widths.
      seed: seeds the partition, the initialization and the run.
    """

    dataset: str = "digits"
    data_path: str | None = None
    n_workers: int = 16
    partition: str = "dirichlet"
    alpha: float = 0.5
    topology: str = "ring"
    rule: str = "metropolis"
    gossip: str = "sparse"
    local_steps: int = 1
    algorithm: str = "dsgd"
    lr: float = 0.05
    momentum: float = 0.0
    batch_size: int = 32
    steps: int = 1000
    eval_every: int = 50
    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    seed: int = 0
    label: str | None = None

    def name(self) -> str:
        """Label used in tables and plots."""
        if self.label:
            return self.label
        algo = "D-SGD" if self.algorithm == "dsgd" else "GT"
        return f"{algo} {self.topology}"

    def validate(self) -> None:
        """Raise ``ValueError`` for an unknown choice, before anything is built."""
        choices = {
            "dataset": DATASETS,
            "partition": ("dirichlet", "iid", "shards"),
            "gossip": ("sparse", "dense"),
            "algorithm": ALGORITHMS,
            "model": ("mlp", "lenet5"),
            "topology": tuple(topology.TOPOLOGIES),
            "rule": topology.MIXING_RULES,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"config.{field}={getattr(self, field)!r} is not one of {allowed}."
                )


def load_dataset(cfg: ExperimentConfig) -> data.Dataset:
    """Load the configured dataset (NumPy, once)."""
    if cfg.dataset == "digits":
        return data.load_digits(seed=cfg.seed)
    if cfg.dataset == "fashion_mnist":
        return data.load_fashion_mnist(cfg.data_path)
    if cfg.data_path is None:
        raise ValueError("dataset='mnist' needs data_path=<folder of MNIST IDX files>.")
    return data.load_mnist(cfg.data_path)


def build(cfg: ExperimentConfig, ds: data.Dataset | None = None) -> dict[str, Any]:
    """Build everything a run needs from a config.

    Returns:
      ``{"algo", "state", "sampler", "eval_fn", "W", "mix", "dataset", "params"}``.
    """
    cfg.validate()
    ds = load_dataset(cfg) if ds is None else ds
    n = cfg.n_workers
    if cfg.partition == "dirichlet":
        parts = data.dirichlet(ds.y_train, n, cfg.alpha, seed=cfg.seed)
    elif cfg.partition == "iid":
        parts = data.iid(ds.y_train, n, seed=cfg.seed)
    else:
        parts = data.shards(ds.y_train, n, 2, seed=cfg.seed)
    wd = data.stack(ds.x_train, ds.y_train, parts)
    sampler = data.make_sampler(wd, cfg.batch_size)

    if cfg.model == "mlp":
        model = models.MLP(hidden=tuple(cfg.hidden), num_classes=ds.num_classes)
    else:
        model = models.LeNet5(num_classes=ds.num_classes)
    key = jax.random.key(cfg.seed)
    params = models.init_workers(model, key, n, ds.x_train[:1])

    G = topology.by_name(cfg.topology, n)
    W = topology.mixing_matrix(G, cfg.rule)
    base = (gossip.sparse if cfg.gossip == "sparse" else gossip.dense)(
        W, doubly_stochastic=cfg.rule != "uniform"
    )
    mix = base if cfg.local_steps == 1 else gossip.every(cfg.local_steps, base)
    opt = optax.sgd(cfg.lr, momentum=cfg.momentum or None)
    factory = getattr(algorithms, cfg.algorithm)
    algo = factory(models.classification_loss(model), opt, mix)
    ev = metrics.evaluator(models.apply_fn(model), ds.x_test, ds.y_test)
    return {
        "algo": algo,
        "state": algo.init(params),
        "sampler": sampler,
        "eval_fn": ev,
        "W": W,
        "mix": mix,
        "dataset": ds,
        "params": params,
    }


def run_experiment(
    cfg: ExperimentConfig,
    *,
    ds: data.Dataset | None = None,
    progress: bool = True,
    jsonl: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
) -> tuple[Any, History, dict[str, Any]]:
    """Build and run one experiment.

    With ``checkpoint_dir`` the run is checkpointed every ``checkpoint_every``
    evaluation periods (see :func:`jaxdec.run`); ``resume=True`` continues from the
    newest checkpoint there, bit-identically to an uninterrupted run.

    Returns:
      ``(final_state, history, summary)`` where ``summary`` holds the final
      metrics, the spectral gap of ``W`` and the floats each worker sent.
    """
    b = build(cfg, ds)
    state, hist = run(
        b["algo"],
        b["state"],
        b["sampler"],
        jax.random.key(cfg.seed + 1),
        cfg.steps,
        eval_every=cfg.eval_every,
        eval_fn=b["eval_fn"],
        progress=progress,
        desc=cfg.name(),
        jsonl=jsonl,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    final = {k: float(v[-1]) for k, v in hist.eval.items()}
    summary = {
        "run": cfg.name(),
        **final,
        "spectral_gap": topology.spectral_gap(b["W"]),
        "floats_sent_per_worker": float(np.sum(hist.train["floats_sent"])),
        "params_per_worker": jtree.num_params(b["params"]),
        "steps": hist.num_steps,
        "seconds": float(np.sum(hist.wall_time)),
        "config": dataclasses.asdict(cfg),
    }
    return state, hist, summary


QUICKSTART_RUNS = (
    {"topology": "ring"},
    {"topology": "exponential"},
    {"topology": "complete"},
    {"topology": "ring", "algorithm": "gradient_tracking"},
)


def quickstart(
    out_dir: str | Path = "experiments/results/quickstart",
    *,
    steps: int = 1500,
    n_workers: int = 16,
    alpha: float = 0.5,
    progress: bool = True,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """D-SGD on digits over ring / exponential / complete (+ gradient tracking on
    the ring); prints a table and writes ``metrics.jsonl``, ``summary.json`` and
    ``plot.png`` to ``out_dir``. With ``checkpoint_dir`` each run checkpoints into
    its own subfolder ``<k>`` and ``resume=True`` picks every run up where it
    stopped (finished runs are read back from their final checkpoint)."""
    from jaxdec.plotting import plot_runs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = ExperimentConfig(n_workers=n_workers, alpha=alpha, steps=steps, seed=seed)
    ds = load_dataset(base)
    histories, summaries = {}, []
    with open(out / "metrics.jsonl", "w") as f:
        for k, overrides in enumerate(QUICKSTART_RUNS):
            cfg = dataclasses.replace(base, **overrides)
            ck = None if checkpoint_dir is None else Path(checkpoint_dir) / str(k)
            _, hist, summary = run_experiment(
                cfg, ds=ds, progress=progress, checkpoint_dir=ck, resume=resume
            )
            histories[cfg.name()] = hist
            summaries.append(summary)
            for rec in hist.records():
                f.write(json.dumps({"run": cfg.name(), **rec}) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plot_runs(
        histories,
        out / "plot.png",
        title=f"{n_workers} workers on digits, Dirichlet alpha={alpha}",
    )
    print(format_table(summaries))
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {out / 'plot.png'}")
    return summaries


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Final metrics as a fixed-width text table."""
    head = (
        f"{'run':<18}{'gap':>7}{'avg-model acc':>15}{'mean local acc':>16}"
        f"{'consensus':>12}{'floats/worker':>15}"
    )
    rows = [head, "-" * len(head)]
    for s in summaries:
        rows.append(
            f"{s['run']:<18}{s['spectral_gap']:>7.3f}{s['avg_model_acc']:>15.4f}"
            f"{s['local_acc_mean']:>16.4f}{s['consensus_distance']:>12.3e}"
            f"{s['floats_sent_per_worker']:>15.3e}"
        )
    return "\n".join(rows)


def topology_table(n: int) -> str:
    """Degree range and spectral gap of every named topology for ``n`` workers."""
    rows = [f"{'topology':<16}{'edges':>7}{'degree':>10}{'gap (metropolis)':>18}"]
    for name in topology.TOPOLOGIES:
        try:
            G = topology.by_name(name, n)
        except ValueError as e:
            rows.append(f"{name:<16}  n/a: {e}")
            continue
        degs = [d for _, d in G.degree()]
        gap = topology.spectral_gap(topology.mixing_matrix(G))
        deg = f"{min(degs)}-{max(degs)}" if min(degs) != max(degs) else str(degs[0])
        rows.append(f"{name:<16}{G.number_of_edges():>7}{deg:>10}{gap:>18.4f}")
    return "\n".join(rows)


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    for f in dataclasses.fields(ExperimentConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    unknown = set(values) - {f.name for f in dataclasses.fields(ExperimentConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}.")
    if "hidden" in values:
        values["hidden"] = tuple(values["hidden"])
    return ExperimentConfig(**values)


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-dir",
        help="write checkpoints (state, key, step, history) into this folder",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxdec`` console script."""
    p = argparse.ArgumentParser(prog="jaxdec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quickstart", help="D-SGD on digits over several topologies")
    q.add_argument("--out", default="experiments/results/quickstart")
    q.add_argument("--steps", type=int, default=1500)
    q.add_argument("--workers", type=int, default=16)
    q.add_argument("--alpha", type=float, default=0.5)
    q.add_argument("--no-progress", action="store_true")
    _checkpoint_flags(q)
    r = sub.add_parser("run", help="one experiment from a JSON config and/or flags")
    r.add_argument("config", nargs="?", help="JSON file of ExperimentConfig fields")
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "hidden":
            r.add_argument("--hidden", type=int, nargs="+")
            continue
        typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        r.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ)
    r.add_argument("--out", help="folder for metrics.jsonl and summary.json")
    r.add_argument("--no-progress", action="store_true")
    _checkpoint_flags(r)
    r.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="checkpoint period in evaluation periods (default 1)",
    )
    t = sub.add_parser("topologies", help="list topologies with spectral gaps")
    t.add_argument("-n", type=int, default=16)
    args = p.parse_args(argv)
    if getattr(args, "resume", False) and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    try:
        if args.cmd == "quickstart":
            quickstart(
                args.out,
                steps=args.steps,
                n_workers=args.workers,
                alpha=args.alpha,
                progress=not args.no_progress,
                checkpoint_dir=args.checkpoint_dir,
                resume=args.resume,
            )
        elif args.cmd == "run":
            cfg = _config_from_args(args)
            out = Path(args.out) if args.out else None
            if out:
                out.mkdir(parents=True, exist_ok=True)
            _, _, summary = run_experiment(
                cfg,
                jsonl=out / "metrics.jsonl" if out else None,
                progress=not args.no_progress,
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every,
                resume=args.resume,
            )
            print(format_table([summary]))
            if out:
                (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        else:
            print(topology_table(args.n))
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxdec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
