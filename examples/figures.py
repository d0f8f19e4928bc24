"""The two pictures of the demo and the benchmark (the paper's Figures 2 and 3), drawn with matplotlib.

matplotlib is an optional extra (`pip install "keras-snapshot[plots]"`); `matplotlib_missing()` says why
plotting is off, and the callers skip the pictures with that message instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keras_snapshot import snapshot_learning_rate, snapshot_steps

__all__ = ["matplotlib_missing", "plot_ensemble_size", "plot_lr_schedule"]

SNAPSHOT_COLOR = "tab:red"
SINGLE_COLOR = "tab:blue"
NOCYCLE_COLOR = "tab:gray"


def matplotlib_missing() -> str | None:
    """None when matplotlib can be used, else a message saying how to get the pictures."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return 'matplotlib is not installed: skipping the pictures (pip install "keras-snapshot[plots]").'
    return None


def plot_lr_schedule(
    path,
    *,
    epochs: int,
    steps_per_epoch: int,
    cycles: int,
    alpha0: float,
    single_alpha0: float,
    single_rate,
    losses: dict | None = None,
    title: str = "",
) -> Path:
    """The learning rate per iteration of both schedules, snapshots marked (paper, Figure 2).

    Args:
        single_rate: a function of the 1-based iteration array giving the single model's rate.
        losses: optional {label: per-epoch training losses}, drawn in a second panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = epochs * steps_per_epoch
    t = np.arange(1, total + 1)
    x = t / steps_per_epoch
    snapshot_rate = snapshot_learning_rate(t, initial_learning_rate=alpha0, total_steps=total, cycles=cycles)
    ends = np.asarray(snapshot_steps(total, cycles))

    panels = 2 if losses else 1
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), sharex=True, squeeze=False)
    top = axes[0, 0]
    top.plot(
        x, single_rate(t), color=SINGLE_COLOR, label=f"single model: step schedule (alpha0={single_alpha0:g})"
    )
    top.plot(
        x,
        snapshot_rate,
        color=SNAPSHOT_COLOR,
        label=f"snapshot ensemble: M={cycles} cosine cycles (alpha0={alpha0:g})",
    )
    for end in ends:
        top.axvline(end / steps_per_epoch, color=SNAPSHOT_COLOR, alpha=0.25, linestyle="--", linewidth=0.8)
    top.scatter(
        ends / steps_per_epoch,
        np.full(len(ends), alpha0 * 1.04),
        marker="v",
        color=SNAPSHOT_COLOR,
        zorder=3,
        label="snapshot taken",
    )
    top.set_ylabel("learning rate")
    top.set_ylim(0, max(alpha0, single_alpha0) * 1.5)
    top.legend(loc="upper center", ncol=2, fontsize=8, framealpha=0.9)
    top.set_title(title or "Learning rate over training, snapshots marked", fontsize=11)
    if losses:
        bottom = axes[1, 0]
        for label, values in losses.items():
            color = SNAPSHOT_COLOR if "snapshot" in label.lower() else SINGLE_COLOR
            bottom.plot(np.arange(1, len(values) + 1), values, marker=".", color=color, label=label)
        for end in ends:
            bottom.axvline(
                end / steps_per_epoch, color=SNAPSHOT_COLOR, alpha=0.25, linestyle="--", linewidth=0.8
            )
        bottom.set_yscale("log")
        bottom.set_ylabel("training loss (epoch mean)")
        bottom.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("epoch")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_ensemble_size(
    path,
    curves: dict,
    *,
    baselines: dict | None = None,
    title: str = "",
    ylabel: str = "test error (%)",
) -> Path:
    """Error of the ensemble of the last m snapshots against m (paper, Figure 3).

    Args:
        curves: {label: (mean per m, std per m or None)}; m = 1..len(mean).
        baselines: {label: (mean, std or None)} drawn as horizontal lines (e.g. the single model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    colors = iter(["tab:red", "tab:orange", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:olive"])
    largest = 1
    for label, (mean, std) in curves.items():
        mean = np.asarray(mean, dtype=float)
        m = np.arange(1, len(mean) + 1)
        largest = max(largest, len(mean))
        color = NOCYCLE_COLOR if "nocycle" in label.lower() else next(colors)
        axis.plot(m, mean, marker="o", color=color, label=label)
        if std is not None:
            std = np.asarray(std, dtype=float)
            axis.fill_between(m, mean - std, mean + std, color=color, alpha=0.15)
    for label, (mean, std) in (baselines or {}).items():
        axis.axhline(mean, color=SINGLE_COLOR, linestyle="--", label=label)
        if std:
            axis.axhspan(mean - std, mean + std, color=SINGLE_COLOR, alpha=0.1)
    axis.set_xticks(range(1, largest + 1))
    axis.set_xlabel("number of models in the ensemble (the last m snapshots)")
    axis.set_ylabel(ylabel)
    axis.set_title(title or "Ensemble size vs error", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
