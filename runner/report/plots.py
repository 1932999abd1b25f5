"""Pictures of a run, drawn without a display, so a run is judged at a glance in the MLflow UI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from runner.train.metrics import area_under, average_precision, positive_index, precision_recall_curve, roc_curve  # noqa: E402

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


CALIBRATION_BINS = 10
# Images in the grids are drawn near their own size: each pixel as it is (matplotlib's default
# smoothing filter costs about half a second a grid and softens the thin cracks they are about).
PIXELS = "nearest"


def _points(values: np.ndarray) -> list[float]:
    """Curve coordinates for JSON: 5 decimals are far below what a plot shows."""
    return np.round(values.astype(float), 5).tolist()


def scored_classes(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """(class, is that class, its probability) per class a curve is drawn for, and what that choice is called.

    Binary: the positive class only (the other is its mirror); more classes: each class vs the rest.
    """
    if len(classes) == 2:
        pos = positive_index(classes)
        return [(classes[pos], labels == pos, probs[:, pos])], f"positive class: {classes[pos]}"
    return [(name, labels == i, probs[:, i]) for i, name in enumerate(classes)], "one class vs the rest"


def _calibration(truth: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """Reliability in equal-width probability bins: mean predicted probability, observed frequency and count per
    non-empty bin; the Brier score and the expected calibration error (count-weighted gap)."""
    bins = np.minimum((score * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    count = np.bincount(bins, minlength=CALIBRATION_BINS)
    used = count > 0
    predicted = np.bincount(bins, weights=score, minlength=CALIBRATION_BINS)[used] / count[used]
    observed = np.bincount(bins, weights=truth.astype(float), minlength=CALIBRATION_BINS)[used] / count[used]
    return {
        "bin_lower": _points(np.flatnonzero(used) / CALIBRATION_BINS),
        "predicted": _points(predicted),
        "observed": _points(observed),
        "count": count[used].tolist(),
        "brier": float(np.mean((score - truth) ** 2)),
        "ece": float(np.sum(count[used] * np.abs(observed - predicted)) / len(score)),
    }


def test_curves(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The points of the ROC, precision-recall and reliability curves of the test split, as JSON-ready data.

    Logged with the run (``curves.json``), drawn by :func:`roc_figure`, :func:`pr_figure` and
    :func:`calibration_figure`, and overlaid across runs by ``runner.compare --curves``.
    ROC and precision-recall are undefined when the test split holds one kind of image only.
    """
    scored, basis = scored_classes(labels, probs, classes)
    out = []
    for name, truth, score in scored:
        entry: dict[str, Any] = {"name": name, "images": int(len(truth)), "positives": int(truth.sum()),
                                 "calibration": _calibration(truth, score)}
        if truth.all() or not truth.any():
            entry["undefined"] = f"{'only' if truth.all() else 'no'} {name} test images"
        else:
            fpr, tpr, _ = roc_curve(truth, score)
            precision, recall, _ = precision_recall_curve(truth, score)
            entry["roc"] = {"fpr": _points(fpr), "tpr": _points(tpr), "auc": area_under(fpr, tpr)}
            entry["pr"] = {"recall": _points(recall), "precision": _points(precision),
                           "ap": average_precision(precision, recall)}
        out.append(entry)
    return {"basis": basis, "classes": out}


def draw_roc(ax: Any, entry: dict[str, Any], label: str, **style: Any) -> None:
    """One class's ROC curve on ``ax``, its AUC in the legend."""
    if "roc" not in entry:
        ax.plot([], [], " ", label=f"{label}: undefined ({entry['undefined']})")
        return
    ax.plot(entry["roc"]["fpr"], entry["roc"]["tpr"], linewidth=2, label=f"{label} (AUC {entry['roc']['auc']:.3f})", **style)


def draw_pr(ax: Any, entry: dict[str, Any], label: str, **style: Any) -> None:
    """One class's precision-recall curve on ``ax``, its average precision in the legend."""
    if "pr" not in entry:
        ax.plot([], [], " ", label=f"{label}: undefined ({entry['undefined']})")
        return
    ax.step(entry["pr"]["recall"], entry["pr"]["precision"], where="post", linewidth=2,
            label=f"{label} (AP {entry['pr']['ap']:.3f})", **style)


def draw_calibration(ax: Any, entry: dict[str, Any], label: str, **style: Any) -> None:
    """One class's reliability curve on ``ax``: observed frequency against mean predicted probability per bin."""
    cal = entry["calibration"]
    ax.plot(cal["predicted"], cal["observed"], marker="o", markersize=4, linewidth=2,
            label=f"{label} (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})", **style)


def style_axes(ax: Any, kind: str) -> None:
    """Axes, reference line and labels of a ``roc``, ``pr`` or ``calibration`` plot."""
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    elif kind == "pr":
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    else:
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc={"roc": "lower right", "pr": "lower left"}.get(kind, "upper left"), fontsize=8)


def roc_figure(curves: dict[str, Any]) -> Figure:
    """ROC of the positive class (binary) or one-vs-rest per class, AUC in the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for entry in curves["classes"]:
        draw_roc(ax, entry, entry["name"])
    style_axes(ax, "roc")
    ax.set_title(f"test ROC curve ({curves['basis']})")
    fig.tight_layout()
    return fig


def pr_figure(curves: dict[str, Any]) -> Figure:
    """Precision against recall of the positive class (or each class vs the rest), average precision in the legend.

    Beside the ROC curve because with few positives a high ROC AUC can hide a low precision;
    the dotted line is a classifier that guesses (precision = the share of positives).
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for entry in curves["classes"]:
        draw_pr(ax, entry, entry["name"])
        ax.axhline(entry["positives"] / entry["images"], linestyle=":", color="grey", linewidth=1)
    style_axes(ax, "pr")
    ax.set_title(f"test precision-recall ({curves['basis']})")
    fig.tight_layout()
    return fig


def calibration_figure(curves: dict[str, Any]) -> Figure:
    """Whether the model's probabilities mean what they say: the reliability curve, and how many images each bin holds."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]})
    width = 1 / CALIBRATION_BINS
    for entry in curves["classes"]:
        draw_calibration(ax, entry, entry["name"])
        cal = entry["calibration"]
        counts.bar(cal["bin_lower"], cal["count"], width=width, align="edge", alpha=0.5, edgecolor="black", label=entry["name"])
    style_axes(ax, "calibration")
    ax.set_title(f"test reliability ({curves['basis']})")
    counts.set_xlim(-0.01, 1.01)
    counts.set_xlabel("predicted probability")
    counts.set_ylabel("test images")
    counts.grid(alpha=0.3)
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
    cells = [GridCell(images[i], f"true: {classes[labels[i]]} / pred: {classes[preds[i]]} ({confidence[i]:.2f})", "firebrick", names[i])
             for i in shown]
    more = f", the {len(shown)} most confident shown" if len(wrong) > len(shown) else ""
    rows = [cells[start:start + cols] for start in range(0, len(cells), cols)]
    return image_grid(rows, (max(2.8, 5.6 / cols), 3.1), f"misclassified test images: {len(wrong)} of {len(labels)}{more}", title_size=9)


@dataclass(frozen=True)
class GridCell:
    """One picture of an :func:`image_grid`: its pixels (H, W, 3: uint8, or floats in [0, 1]), a title in ``colour``, a file name under it."""

    pixels: np.ndarray
    title: str
    colour: str
    name: str


def image_grid(rows: list[list[GridCell]], cell: tuple[float, float], title: str, title_size: float, row_labels: list[str] | None = None,
               title_lines: int = 1) -> Figure:
    """Pictures in rows, each with its title above and its file name below, drawn on one axes in inches.

    One axes for the whole grid, not one per picture: an axes per picture, laid out by
    ``tight_layout``, costs more to build and draw than the pictures it holds, and every run draws a grid.
    ``cell``: the least (width, height) in inches a picture takes with its texts, widened to its
    longest title; a file name longer than its cell is shortened in the middle. ``title_size``:
    the pictures' titles' font size (their file names one point smaller); ``row_labels``: a word
    left of each row; ``title_lines``: the lines of the figure's ``title``.
    """
    def inches(text: str, size: float) -> float:  # about what the default font needs (0.6 em a character)
        return len(text) * 0.6 * size / 72

    width_of_cell = max(cell[0], *(inches(p.title, title_size) + 0.2 for row in rows for p in row))
    left = 0.45 if row_labels else 0.1
    top = 0.2 + 0.22 * title_lines
    title_size_pt = 12 if title_lines == 1 else 11
    width = max(left + width_of_cell * max(len(row) for row in rows) + 0.1,
                max(inches(line, title_size_pt) for line in title.splitlines()) + 0.4)
    height = top + cell[1] * len(rows)
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_autoscale_on(False)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # inches from the top left corner
    space_above, space_below = 0.3, 0.25  # for the title and the file name
    room = max(int((width_of_cell - 0.3) / (0.7 * (title_size - 1) / 72)), 5)  # characters of a file name that surely fit its cell
    side = min(width_of_cell - 0.15, cell[1] - space_above - space_below - 0.05)  # a picture's longer side
    for r, row in enumerate(rows):
        y = top + r * cell[1]
        if row_labels:
            ax.text(left / 2, y + cell[1] / 2, row_labels[r], rotation=90, ha="center", va="center", fontsize=11)
        for c, picture in enumerate(row):
            x = left + c * width_of_cell
            pixels = picture.pixels
            w, h = (side, side * pixels.shape[0] / pixels.shape[1]) if pixels.shape[1] >= pixels.shape[0] else \
                (side * pixels.shape[1] / pixels.shape[0], side)
            x0, y0 = x + (width_of_cell - w) / 2, y + space_above + (cell[1] - space_above - space_below - h) / 2
            ax.imshow(pixels, extent=(x0, x0 + w, y0 + h, y0), interpolation=PIXELS, aspect="auto")
            ax.add_patch(Rectangle((x0, y0), w, h, fill=False, linewidth=0.8, edgecolor="black"))
            name = picture.name if len(picture.name) <= room else f"{picture.name[:(room - 1) // 2]}…{picture.name[-(room // 2):]}"
            ax.text(x + width_of_cell / 2, y0 - 0.06, picture.title, ha="center", va="bottom", fontsize=title_size, color=picture.colour)
            ax.text(x + width_of_cell / 2, y0 + h + 0.06, name, ha="center", va="top", fontsize=title_size - 1, color="dimgrey")
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=title_size_pt)
    return fig


RUN_COLOURS = plt.get_cmap("tab10").colors


def runs_curves_figure(
    runs: list[tuple[str, dict[str, Any] | None, list[tuple[int, float]]]], epoch_metric: str, title: str
) -> Figure:
    """Several runs' curves overlaid, one colour per run: ``epoch_metric`` per epoch, ROC, precision-recall, reliability.

    ``runs``: (label, the run's curves.json or None if it has none, [(epoch, value)]), best run first.
    """
    fig, axes = plt.subplots(2, 2, figsize=(13, 12))
    history, roc, pr, calibration = axes.flat
    for n, (label, curves, epochs) in enumerate(runs):
        colour = RUN_COLOURS[n % len(RUN_COLOURS)]
        if epochs:
            history.plot(*zip(*epochs), "-o", markersize=3, color=colour, label=label)
        for k, entry in enumerate((curves or {}).get("classes", [])):
            name = label if len(curves["classes"]) == 1 else f"{label}: {entry['name']}"
            style = {"color": colour, "linestyle": ("-", "--", ":", "-.")[k % 4]}
            draw_roc(roc, entry, name, **style)
            draw_pr(pr, entry, name, **style)
            draw_calibration(calibration, entry, name, **style)
    history.set_xlabel("epoch")
    history.set_ylabel(epoch_metric)
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = [step for _, _, epochs in runs for step, _ in epochs]
    if steps:
        history.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    if epoch_metric.endswith("accuracy"):
        history.set_ylim(-0.02, 1.02)  # the scale of the runs' own learning curves
    history.grid(alpha=0.3)
    history.legend(loc="best", fontsize=8)
    history.set_title(f"{epoch_metric} per epoch")
    basis = next((c["basis"] for _, c, _ in runs if c), "")
    for ax, kind, what in ((roc, "roc", "test ROC"), (pr, "pr", "test precision-recall"), (calibration, "calibration", "test reliability")):
        style_axes(ax, kind)
        ax.set_title(f"{what} ({basis})" if basis else what)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def linear_weights_figure(weights: np.ndarray, classes: list[str]) -> Figure:
    """A linear model's weights per class as images (``weights``: (classes, H, W, 3), over the normalised pixels).

    Top row: each class's weights as colours (scaled together, grey = 0), the template the
    class's score matches; bottom row: summed over the channels, red where brightness raises
    the class's score, blue where it lowers it. A crack detector should show dark thin lines
    as evidence, not a border or a lighting gradient.
    """
    cols = len(classes)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols + 1.2, 6.6), squeeze=False, layout="constrained")
    limit = float(np.abs(weights).max()) or 1.0
    summed = weights.sum(axis=-1)
    summed_limit = float(np.abs(summed).max()) or 1.0
    for k, name in enumerate(classes):
        axes[0, k].imshow(np.clip(0.5 + weights[k] / (2 * limit), 0, 1), interpolation=PIXELS)
        axes[0, k].set_title(f"{name}: weights as RGB", fontsize=10)
        image = axes[1, k].imshow(summed[k], cmap="RdBu_r", vmin=-summed_limit, vmax=summed_limit, interpolation=PIXELS)
        axes[1, k].set_title(f"{name}: sum over channels", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label="weight (red: raises the score)")
    fig.suptitle("linear model: what each class responds to")
    return fig


def gradcam_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    names: list[str],
    layer: str,
) -> Figure:
    """Test images with the Grad-CAM heatmap of their predicted class over them: a row of correct, a row of wrong ones.

    ``images``: (N, H, W, 3), values 0..255 as the data sets hold them. ``heatmaps``: (N, H, W) in
    [0, 1], at the images' size. Red is where the evidence for the predicted class lies; on a
    crack image it should be the crack.
    """
    preds = probs.argmax(axis=1)
    shade = plt.get_cmap("jet")(heatmaps)[..., :3]  # the heatmap over the image at 45% opacity, as one picture
    rows, kinds = [], []
    for kind, right, colour in (("correct", True, "darkgreen"), ("wrong", False, "firebrick")):
        shown = np.flatnonzero((preds == labels) == right)
        if len(shown):
            kinds.append(kind)
            rows.append([GridCell(0.55 * np.asarray(images[i], dtype=np.float32) / 255 + 0.45 * shade[i],
                                  f"true {classes[labels[i]]} / pred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})", colour, names[i])
                         for i in shown])
    missing = "" if len(rows) == 2 else f" (no {'wrong' if kinds[0] == 'correct' else 'correct'} test predictions)"
    return image_grid(rows, (2.9, 3.2), f"Grad-CAM of the predicted class at layer {layer}{missing}\nred: where the evidence for it is",
                      title_size=8, row_labels=kinds, title_lines=2)


def trial_curves_figure(curves: list[tuple[str, list[int], list[float], bool]], monitor: str) -> Figure:
    """A sweep's trials (label, epochs, values, pruned) in one figure: a pruned trial's line is fainter and ends in a red cross."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, steps, values, pruned in curves:
        ax.plot(steps, values, marker=".", alpha=0.5 if pruned else 0.9, label=label + (" (pruned)" if pruned else ""))
        if pruned and steps:
            ax.plot(steps[-1], values[-1], marker="x", color="red", markersize=10, markeredgewidth=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor)
    ax.set_title(f"{monitor} of every trial by epoch (x: pruned there)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(curves) <= 20:
        ax.legend(fontsize="small", ncol=2)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
