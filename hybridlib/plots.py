"""Figures of a run: loss/accuracy curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from hybridlib.errors import RunError
from hybridlib.files import CONFUSION_FILE, CURVES_FILE, LOG_FILE, METRICS_FILE, atomic_write
from hybridlib.runs import read_history, read_metrics


def save_figure(fig, path: str | Path | None):
    """``fig``, laid out; with ``path``, also written as a PNG atomically (a refused or full disk: a RunError)."""
    fig.tight_layout()
    if path:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return fig


def plot_curves(history: list[dict[str, float]], path: str | Path | None = None, title: str = ""):
    """Train/validation loss and accuracy per epoch (the best epoch marked)."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="validation")
        if key == "accuracy" and history:
            best = max(history, key=lambda r: r["val_accuracy"])
            ax.axvline(best["epoch"], color="grey", ls="--", lw=1, label=f"best (epoch {int(best['epoch'])})")
        ax.set(xlabel="epoch", ylabel=key, title=key.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(cm: list[list[int]], label_names: list[str], path: str | Path | None = None, title: str = ""):
    """Confusion matrix as a seaborn heatmap: counts annotated, colour by row-normalised rate."""
    cm = np.asarray(cm)
    rates = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    size = max(4.5, 0.9 * len(label_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    sns.heatmap(
        rates, annot=cm, fmt="d", cmap="Blues", vmin=0, vmax=1, square=True,
        xticklabels=label_names, yticklabels=label_names, cbar_kws={"label": "fraction of true class"}, ax=ax,
    )
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix (test)")
    return save_figure(fig, path)


def plot_length_distribution(lengths, max_length: int, path: str | Path | None = None):
    """Histogram of token counts (before truncation) with the max_length cut marked."""
    lengths = np.asarray(lengths)
    cut = float((lengths > max_length).mean())
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.histplot(lengths, bins=60, ax=ax)
    ax.axvline(max_length, color="red", ls="--", label=f"max_length={max_length} ({cut:.1%} truncated)")
    ax.set(xlabel="tokens per text", ylabel="texts", title="Token length distribution (train)")
    ax.legend()
    return save_figure(fig, path)


def save_run_plots(run_dir: str | Path) -> tuple[list[Path], dict | None]:
    """Write loss_acc_curves.png (and confusion_matrix.png once metrics.json exists) for a run."""
    run_dir = Path(run_dir)
    if not (run_dir / LOG_FILE).is_file():
        raise RunError(f"{run_dir} has no {LOG_FILE}: it is not a trained run (or training has not finished an epoch).")
    written = [run_dir / CURVES_FILE]
    plot_curves(read_history(run_dir), written[0], title=run_dir.name)
    metrics = None
    if (run_dir / METRICS_FILE).is_file():
        metrics = read_metrics(run_dir, ("confusion_matrix", "label_names", "test_accuracy", "test_macro_f1",
                                             "best_val_accuracy", "best_epoch"))
        written.append(run_dir / CONFUSION_FILE)
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["label_names"], written[1],
                              title=f"Confusion matrix (test, accuracy {metrics['test_accuracy']:.2%})")
    plt.close("all")
    return written, metrics
