"""Plots of run histories (matplotlib, headless-safe)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxdec.loop import History

__all__ = ["plot_runs"]


def plot_runs(
    histories: Mapping[str, History],
    path: str | Path,
    *,
    panels: Sequence[tuple[str, str, bool]] = (
        ("1-avg_model_acc", "test error of the averaged model", True),
        ("1-local_acc_mean", "mean local test error", True),
        ("consensus_distance", "consensus distance", True),
        ("train_loss", "training loss (mean over workers)", True),
    ),
    title: str | None = None,
) -> Path:
    """Plot several runs side by side, one panel per metric, and save a PNG.

    Args:
      histories: ``{run label: History}``.
      path: output file (``.png``).
      panels: ``(metric, y label, log scale)`` triples. A metric is an ``eval`` key
        (plotted at ``eval_steps``) or ``train_<name>`` for a per-step training
        metric (smoothed with a moving average over 1% of the run).
      title: figure title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (metric, label, log) in zip(axes, panels, strict=True):
        complement = metric.startswith("1-")
        key = metric[2:] if complement else metric
        for name, h in histories.items():
            if key.startswith("train_") and metric[6:] in h.train:
                y = np.asarray(h.train[metric[6:]], dtype=float)
                w = max(1, len(y) // 100)
                y = np.convolve(y, np.ones(w) / w, mode="valid")
                x = np.arange(len(y)) + w
            elif key in h.eval:
                x, y = h.eval_steps, np.asarray(h.eval[key], dtype=float)
            else:
                continue
            if complement:
                y = 1.0 - y
            if log:
                keep = y > 0
                x, y = x[keep], y[keep]
            ax.plot(x, y, label=name, lw=1.6)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
