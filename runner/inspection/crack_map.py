"""A photo's crack map: each window's crack probability, drawn over the photo, tabled, summed up and scored against a truth.

Why one module: the overlay, the CSV, the JSON summary and the scores all read the same
windows and probabilities; none of them needs the model or the runtime that made them.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from crack_runner.datasets.photos import Photo
from runner.inspection.windows import Window

OVERLAY_SIDE = 2048  # the overlay's longer side at most: readable, and megabytes rather than a photo's hundreds
RASTER_SIDE = 4096  # areas (cracked share, IoU) are measured on a raster with at most this many cells a side
TRUTH_MIN_SHARE = 0.0025  # a window is cracked in truth when crack pixels cover this share of it (a 1 px line across half of it)


@dataclass
class CrackMap:
    """The windows of one photo and the probability of a crack in each."""

    photo: Path
    width: int
    height: int
    windows: list[Window]
    p_crack: np.ndarray
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)  # the model, runtime and timing, for the summary

    @property
    def cracked(self) -> np.ndarray:
        return self.p_crack >= self.threshold

    @functools.cached_property
    def summary(self) -> dict[str, Any]:
        """What the JSON file holds: counts, the share of the photo's area in cracked windows, the highest probability.

        Computed once: the file, the command's line and the MLflow run all read it.
        """
        return {
            "photo": str(self.photo),
            "width": self.width,
            "height": self.height,
            "patches": len(self.windows),
            "cracked_patches": int(self.cracked.sum()),
            "cracked_area_share": round(float(self._area(self.cracked).mean()), 6),
            "max_p_crack": round(float(self.p_crack.max()), 6) if len(self.p_crack) else 0.0,
            "threshold": self.threshold,
            **self.extra,
        }

    def _area(self, chosen: np.ndarray) -> np.ndarray:
        """A bool raster of the photo (at most RASTER_SIDE a side): True under any chosen window."""
        scale = max(1, math.ceil(max(self.width, self.height) / RASTER_SIDE))
        raster = np.zeros((math.ceil(self.height / scale), math.ceil(self.width / scale)), bool)
        for window, on in zip(self.windows, chosen):
            if on:
                raster[window.y // scale : math.ceil((window.y + window.height) / scale),
                       window.x // scale : math.ceil((window.x + window.width) / scale)] = True
        return raster

    def score(self, truth: np.ndarray) -> dict[str, float]:
        """Patch-level precision, recall and F1 against a truth mask of the photo, and the IoU of the cracked areas.

        A window is cracked in truth when crack pixels cover at least TRUTH_MIN_SHARE of it;
        the IoU compares the area under the windows the map calls cracked with the area under
        the windows the truth does.
        """
        true = np.array([truth[w.y : w.y + w.height, w.x : w.x + w.width].mean() >= TRUTH_MIN_SHARE for w in self.windows], bool)
        found = self.cracked
        tp, fp, fn = int((true & found).sum()), int((~true & found).sum()), int((true & ~found).sum())
        if tp + fp + fn == 0:  # a clean photo called clean: nothing missed, no false alarm
            precision = recall = f1 = 1.0
        else:
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        predicted, actual = self._area(found), self._area(true)
        union = int((predicted | actual).sum())
        iou = int((predicted & actual).sum()) / union if union else 1.0
        return {"precision": precision, "recall": recall, "f1": f1, "iou": iou, "true_cracked_patches": int(true.sum())}

    def overlay(self, photo: Photo, truth: np.ndarray | None = None) -> Image.Image:
        """The photo (downscaled to OVERLAY_SIDE) with the crack probability as a red heat map, cracked windows outlined
        in yellow and, given a truth mask, its crack pixels in cyan."""
        scale = min(1.0, OVERLAY_SIDE / max(self.width, self.height))
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        base = np.asarray(photo.preview(size), np.float32)
        heat = np.zeros((size[1], size[0]), np.float32)  # per pixel, the highest probability of the windows over it
        for window, p in zip(self.windows, self.p_crack):
            rows = slice(int(window.y * scale), math.ceil((window.y + window.height) * scale))
            cols = slice(int(window.x * scale), math.ceil((window.x + window.width) * scale))
            np.maximum(heat[rows, cols], p, out=heat[rows, cols])
        alpha = (0.6 * heat)[..., None]
        red = np.array([255.0, 0.0, 0.0], np.float32)
        blended = base * (1 - alpha) + red * alpha
        if truth is not None:  # any crack pixel under an overlay pixel marks it
            marked = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.BOX)) > 0
            blended[marked] = (0.0, 255.0, 255.0)
        out = Image.fromarray(blended.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(out)
        for window in (w for w, on in zip(self.windows, self.cracked) if on):
            box = [window.x * scale, window.y * scale, (window.x + window.width) * scale - 1, (window.y + window.height) * scale - 1]
            draw.rectangle(box, outline=(255, 220, 0), width=max(1, round(2 * max(scale, 0.5))))
        return out

    def write(self, folder: Path, photo: Photo, truth: np.ndarray | None = None) -> tuple[dict[str, Path], dict[str, float] | None]:
        """overlay.png, patches.csv and summary.json in ``folder``: their paths, and the scores against ``truth`` (None without)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"overlay": folder / "overlay.png", "patches": folder / "patches.csv", "summary": folder / "summary.json"}
        scores = self.score(truth) if truth is not None else None
        self.overlay(photo, truth).save(paths["overlay"], compress_level=3)  # a third of the default's time for a tenth more bytes
        with paths["patches"].open("w", newline="") as out:
            rows = csv.writer(out)
            rows.writerow(["x", "y", "width", "height", "p_crack"])
            rows.writerows([w.x, w.y, w.width, w.height, f"{p:.6f}"] for w, p in zip(self.windows, self.p_crack))
        paths["summary"].write_text(json.dumps({**self.summary, **({"truth": scores} if scores else {})}, indent=2))
        return paths, scores
