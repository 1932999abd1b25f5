"""Pictures of a run, drawn without a display."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def learning_curves(history: list[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, train and val; a dashed line where a new training phase starts."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            ax.plot(steps, [h.get(key, np.nan) for h in history], style, label=split, markersize=4)
        for prev, cur in zip(history, history[1:]):
            if cur["phase"] != prev["phase"]:
                ax.axvline(cur["step"] - 0.5, color="grey", linestyle="--")
                ax.text(cur["step"] - 0.5, ax.get_ylim()[1], f" {cur['phase']}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str]) -> Figure:
    """Counts per true/predicted class, annotated in each cell."""
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(classes), 3.5 + 0.4 * len(classes)))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
