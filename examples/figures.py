"""The pictures of the demo and the benchmark, drawn with matplotlib: the paper's Figures 2 and 3 (learning
rate, ensemble size) and two about the ensemble's probabilities (a reliability diagram, a selective-prediction
curve, out-of-distribution score histograms).

matplotlib is an optional extra (`pip install "keras-snapshot[plots]"`); `matplotlib_missing()` says why
plotting is off, and the callers skip the pictures with that message instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keras_snapshot import snapshot_learning_rate, snapshot_steps

__all__ = [
    "matplotlib_missing",
    "plot_ensemble_size",
    "plot_lr_schedule",
    "plot_ood_histograms",
    "plot_reliability",
    "plot_selective",
]

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


def _save(figure, path, rect=None) -> Path:
    """Lays out (within `rect` if given), writes (creating the folder) and closes a figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout(**({"rect": rect} if rect else {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
    return _save(figure, path)


def plot_ensemble_size(
    path,
    curves: dict,
    *,
    baselines: dict | None = None,
    title: str = "",
    ylabel: str = "test error (%)",
    note: str = "",
    min_span: float = 0.0,
) -> Path:
    """Error of the ensemble of the last m snapshots against m (paper, Figure 3).

    Args:
        curves: {label: (mean per m, std per m or None)}; m = 1..len(mean).
        baselines: {label: (mean, std or None)} drawn as horizontal lines (e.g. the single model).
        note: a line printed under the axes (e.g. "one seed: ...").
        min_span: the y-axis spans at least this many units around the data, so that differences of a
            few tenths of a point do not fill the picture; the span is stated in the axis label.
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
    low, high = axis.get_ylim()
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
        axis.set_ylim(low, high)
    axis.set_ylabel(f"{ylabel}\n(axis from {low:.1f} to {high:.1f})")
    axis.set_title(title or "Ensemble size vs error", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if note:
        figure.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, style="italic")
    return _save(figure, path, rect=(0, 0.05 if note else 0, 1, 1))


def plot_reliability(path, diagrams: dict, *, title: str = "") -> Path:
    """A reliability diagram: accuracy against top-1 confidence per equal-width confidence bin.

    Args:
        diagrams: {label: (bins, ece)}, `bins` as made by training.reliability_bins (summed over seeds if
            wanted: counts, summed confidences, summed correct), `ece` the model's ECE (in [0, 1]).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="perfect calibration")
    colors = iter([SINGLE_COLOR, SNAPSHOT_COLOR, NOCYCLE_COLOR, "tab:green", "tab:purple"])
    for label, (bins, ece_value) in diagrams.items():
        color = next(colors)
        count = np.asarray(bins["count"], dtype=float)
        edges = np.linspace(0, 1, len(count) + 1)
        filled = count > 0
        confidence = np.asarray(bins["confidence"])[filled] / count[filled]
        accuracy = np.asarray(bins["correct"])[filled] / count[filled]
        top.plot(confidence, accuracy, marker="o", color=color, label=f"{label} (ECE {100 * ece_value:.2f}%)")
        bottom.bar(
            (edges[:-1] + edges[1:]) / 2,
            count / count.sum(),
            width=(edges[1] - edges[0]) * 0.9,
            color=color,
            alpha=0.45,
            label=label,
        )
    top.set_ylabel("accuracy in the bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title or "Reliability diagram", fontsize=10)
    bottom.set_yscale("log")
    bottom.set_ylabel("share of examples")
    bottom.set_xlabel("top-1 confidence (15 equal-width bins); below the diagonal = overconfident")
    return _save(figure, path)


def plot_selective(
    path, coverages, curves: dict, *, title: str = "", mark: float = 0.8, styles: dict | None = None
) -> Path:
    """Selective prediction: error (%) of the examples kept against the fraction kept (the most certain first).

    Args:
        coverages: the fractions kept (x axis).
        curves: {label: (errors per coverage, std per coverage or None)}.
        mark: a coverage to mark with a vertical line (the benchmark reports this one).
        styles: optional {label: (color, linestyle)}; labels not in it take the default sequence.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    coverages = np.asarray(coverages, dtype=float)
    chosen = styles
    styles = iter(
        [
            (SNAPSHOT_COLOR, "-"),
            (SNAPSHOT_COLOR, "--"),
            (SINGLE_COLOR, "-"),
            (NOCYCLE_COLOR, "-"),
            ("tab:green", "-"),
        ]
    )
    for label, (errors, std) in curves.items():
        color, style = (chosen or {}).get(label) or next(styles)
        errors = np.asarray(errors, dtype=float)
        axis.plot(100 * coverages, errors, color=color, linestyle=style, marker=".", label=label)
        if std is not None:
            std = np.asarray(std, dtype=float)
            axis.fill_between(100 * coverages, errors - std, errors + std, color=color, alpha=0.12)
    if mark:
        axis.axvline(100 * mark, color="black", alpha=0.3, linestyle=":", linewidth=1)
    axis.set_xlabel("examples kept (%), the most certain first")
    axis.set_ylabel("test error of the kept examples (%)")
    axis.set_ylim(bottom=0)
    axis.set_title(title or "Selective prediction", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


OOD_COLORS = ("tab:blue", "tab:orange", "tab:red")


def plot_ood_histograms(path, panels: list, *, title: str = "") -> Path:
    """Histograms of an uncertainty score on in-distribution and out-of-distribution inputs, one panel per score.

    Args:
        panels: a list of {"title": str, "edges": bin edges (B + 1,), "counts": {label: counts (B,)},
            "xlabel": str}; each set is drawn as a density (its counts divided by its total), so sets of
            different sizes compare. The first set is the in-distribution one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        edges = np.asarray(panel["edges"], dtype=float)
        for color, (label, counts) in zip(OOD_COLORS, panel["counts"].items(), strict=False):
            counts = np.asarray(counts, dtype=float)
            share = counts / max(counts.sum(), 1.0)
            axis.stairs(share, edges, color=color, linewidth=1.6, label=f"{label} ({int(counts.sum())})")
            axis.stairs(share, edges, color=color, alpha=0.12, fill=True)
        filled = np.flatnonzero(np.sum([np.asarray(c) for c in panel["counts"].values()], axis=0))
        if filled.size:  # no empty tail
            axis.set_xlim(edges[0], edges[min(filled[-1] + 2, len(edges) - 1)])
        axis.set_title(panel.get("title", ""), fontsize=9)
        axis.set_xlabel(panel.get("xlabel", "uncertainty score"), fontsize=8)
        axis.set_ylabel("share of the set's rows")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper center")
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)
