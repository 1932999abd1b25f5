"""Pictures of a run, drawn without a display, so a run is judged at a glance in the MLflow UI."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from runner.metrics import positive_index  # noqa: E402

PHASE_SHADES = ("#f2f2f2", "#fff4e0")


def _phases(history: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Consecutive training phases as (name, first step, last step)."""
    phases: list[tuple[str, int, int]] = []
    for entry in history:
        if phases and phases[-1][0] == entry["phase"]:
            phases[-1] = (entry["phase"], phases[-1][1], entry["step"])
        else:
            phases.append((entry["phase"], entry["step"], entry["step"]))
    return phases


def learning_curves(history: list[dict[str, Any]], selected: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train and val; with several phases (head, fine-tune) each is shaded and named.

    ``selected``: the epoch whose model the run kept (trainer.select), marked by a dotted line.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [h["step"] for h in history]
    phases = _phases(history)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            ax.plot(steps, [h.get(key, np.nan) for h in history], style, label=split, markersize=4)
        if len(phases) > 1:
            for i, (name, first, last) in enumerate(phases):
                ax.axvspan(first - 0.5, last + 0.5, color=PHASE_SHADES[i % 2], zorder=0)
                if i:
                    ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=1)
                ax.text((first + last) / 2, 1.01, name.replace("_", "-"), transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=9, color="dimgrey")
        if selected is not None:
            ax.axvline(selected, color="seagreen", linestyle=":", linewidth=1.5, label=f"kept: epoch {selected}")
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)  # the same scale in every run, so runs compare at a glance
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric, pad=16 if len(phases) > 1 else 6)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str]) -> Figure:
    """Counts per true/predicted class with the share of the true class, coloured by that share."""
    fig, ax = plt.subplots(figsize=(4.5 + 0.4 * len(classes), 3.8 + 0.4 * len(classes)))
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({matrix.sum()} images)")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, f"{count}\n{shares[i, j]:.0%}", ha="center", va="center",
                color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Figure:
    """ROC of the positive class (binary) or one-vs-rest per class, AUC in the legend."""
    if len(classes) == 2:
        pos = positive_index(classes)
        curves = [(classes[pos], labels == pos, probs[:, pos])]
        title = f"test ROC curve (positive class: {classes[pos]})"
    else:
        curves = [(name, labels == i, probs[:, i]) for i, name in enumerate(classes)]
        title = "test ROC curves (one class vs the rest)"
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for name, truth, score in curves:
        if truth.all() or not truth.any():  # one kind of image only in the test split: ROC undefined
            ax.plot([], [], " ", label=f"{name}: undefined ({'only' if truth.all() else 'no'} {name} test images)")
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def misclassified_grid(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str], names: list[str], limit: int = 16
) -> Figure:
    """The test images the model got wrong, most confident mistakes first, each with true and predicted label."""
    preds = probs.argmax(axis=1)
    confidence = probs[np.arange(len(preds)), preds]
    wrong = np.flatnonzero(preds != labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    if not len(shown):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified test images:\nall {len(labels)} predicted correctly.",
                ha="center", va="center", fontsize=14)
        return fig
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.8 * cols, 5.6), 3.1 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"true: {classes[labels[i]]} / pred: {classes[preds[i]]} ({confidence[i]:.2f})", fontsize=9,
                     color="firebrick")
        ax.set_xlabel(names[i], fontsize=8, color="dimgrey")
    more = f", the {len(shown)} most confident shown" if len(wrong) > len(shown) else ""
    fig.suptitle(f"misclassified test images: {len(wrong)} of {len(labels)}{more}")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
