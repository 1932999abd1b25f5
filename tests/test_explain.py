"""The pictures a reviewer looks at beside the scores: precision-recall and reliability curves (both
frameworks), the linear model's weights, and Keras models' Grad-CAM heatmaps. Real runs log them
(a Keras run's: the ResNet50 command-line run of tests/test_keras.py, checked by :func:`logged_pictures`);
copies go to ``tests/artifacts/pictures/<framework>/`` for a look."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import mlflow
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from conftest import ARTIFACTS
from runner.app import run
from runner.report import plots
from runner.report.explain import pick_examples

# Per framework: the pictures each run logs (least width, height), and those it must not log.
PICTURES = {
    "linear": ({"pr_curve": (400, 400), "calibration": (400, 500), "linear_weights": (500, 450)}, {"grad_cam"}),
    "keras": ({"pr_curve": (400, 400), "calibration": (400, 500), "grad_cam": (500, 300)}, {"linear_weights"}),
}


def logged_pictures(client: mlflow.MlflowClient, framework: str) -> tuple[mlflow.entities.Run, Path]:
    """The one run's plots folder, checked against PICTURES and copied to tests/artifacts for a look."""
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=found.info.run_id, artifact_path="plots"))
    wanted, unwanted = PICTURES[framework]
    look = ARTIFACTS / "pictures" / framework
    look.mkdir(parents=True, exist_ok=True)
    for name, (min_width, min_height) in wanted.items():
        with Image.open(folder / f"{name}.png") as image:
            image.verify()
            width, height = image.size
        assert width >= min_width and height >= min_height, f"{name} is only {width}x{height}"
        shutil.copy(folder / f"{name}.png", look / f"{name}.png")
        print(f"picture: {look / name}.png")
    assert not {f"{name}.png" for name in unwanted} & {p.name for p in folder.iterdir()}
    return found, folder


def test_a_linear_run_logs_pr_calibration_and_its_weights(make_cfg, client):
    run(make_cfg("tracking.pictures=true"))
    found, _ = logged_pictures(client, "linear")
    curves = mlflow.artifacts.load_dict(f"{found.info.artifact_uri}/curves.json")
    (positive,) = curves["classes"]  # binary: the positive class only
    assert positive["name"] == "Positive"
    assert positive["roc"]["auc"] == pytest.approx(found.data.metrics["test_roc_auc"])
    assert sum(positive["calibration"]["count"]) == int(found.data.params["num_test"])


def test_curves_of_perfect_calibrated_and_one_sided_predictions():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 500)
    perfect = plots.test_curves(labels, np.eye(2)[labels], ["Negative", "Positive"])["classes"][0]
    assert perfect["roc"]["auc"] == 1.0 and perfect["pr"]["ap"] == 1.0 and perfect["calibration"]["ece"] == 0.0
    # probabilities drawn, then labels drawn with those probabilities: calibrated, up to sampling noise
    p = rng.uniform(size=20_000)
    calibrated = plots.test_curves((rng.uniform(size=p.size) < p).astype(int), np.stack([1 - p, p], 1), ["Negative", "Positive"])
    assert calibrated["classes"][0]["calibration"]["ece"] < 0.02
    one_sided = plots.test_curves(np.ones(4, int), np.full((4, 2), 0.5), ["Negative", "Positive"])
    assert one_sided["classes"][0]["undefined"] == "only Positive test images" and "roc" not in one_sided["classes"][0]
    for figure in (plots.roc_figure(one_sided), plots.pr_figure(one_sided), plots.calibration_figure(one_sided)):
        plots.close(figure)  # drawn without error
    three = plots.test_curves(np.arange(6) % 3, np.eye(3)[np.arange(6) % 3], ["a", "b", "c"])
    assert three["basis"] == "one class vs the rest" and [c["name"] for c in three["classes"]] == ["a", "b", "c"]
    json.dumps(three)  # what curves.json holds


def test_grad_cam_examples_take_each_class_in_turn_then_the_surest_mistakes():
    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.3, 0.8, 0.9, 0.6, 0.2])  # images 2 and 5 are wrong
    picked = pick_examples(labels, np.stack([1 - positive, positive], 1), per_kind=3)
    assert picked.tolist() == [0, 3, 1, 2, 5]  # correct: class 0, class 1, class 0 (surest first); wrong: 0.8, then 0.2


def test_a_grid_keeps_long_titles_and_file_names_apart_and_inside_the_picture():
    """Texts sized to their cells: long class names widen the cells, a long file name is shortened in the middle."""
    classes = ["Uncracked_concrete_surface_of_a_bridge", "Cracked_concrete_surface_of_a_bridge"]
    names = ["a" * 150 + ".jpg", "short.jpg", "b/" * 40 + "c.jpg"]
    images = np.zeros((3, 20, 40, 3), np.uint8)  # wider than high
    for figure in (plots.misclassified_grid(images, np.array([0, 0, 1]), np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]]), classes, names),
                   plots.misclassified_grid(images[:1], np.array([0]), np.array([[0.1, 0.9]]), classes, names[:1])):  # one picture
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        texts = [text for text in figure.axes[0].texts + figure.texts if text.get_text()]
        boxes = [text.get_window_extent(canvas.get_renderer()) for text in texts]
        outside = [text.get_text()[:40] for text, box in zip(texts, boxes)
                   if not (figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1)]
        assert not outside
        assert not [(a.get_text()[:30], b.get_text()[:30]) for (a, ba), (b, bb) in combinations(zip(texts, boxes), 2) if ba.overlaps(bb)]
        assert any("…" in text.get_text() for text in texts)
        plots.close(figure)
