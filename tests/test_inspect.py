"""Crack maps of whole photos: the window grid, the truth scores, bad photos, and ``runner.inspect`` on a trained run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image, ImageOps

import forked
import runner.inspect as inspect_command
import services
from crack_runner.datasets import photos
from crack_runner.datasets.folder import viewer_rgb
from crack_runner.datasets.synthetic import render_photo
from runner.inspection.crack_map import TRUTH_MIN_SHARE, CrackMap
from runner.inspection.windows import Window, grid, starts


@pytest.mark.parametrize(
    "length, patch, stride, expected",
    [
        (10, 4, 2, [0, 2, 4, 6]),  # the last window ends at the edge
        (11, 4, 2, [0, 2, 4, 6, 7]),  # one more, flush with the edge, so nothing is left uncovered
        (4, 4, 2, [0]),
        (3, 4, 2, [0]),  # shorter than a patch: one window over all of it
        (9, 4, 10, [0, 5]),  # a stride over the patch leaves gaps between windows, never at the edges
    ],
)
def test_windows_start_every_stride_and_cover_both_edges(length, patch, stride, expected):
    assert starts(length, patch, stride) == expected


def test_the_grid_covers_every_pixel_and_a_small_photo_gets_one_window():
    for width, height, patch, stride in ((500, 301, 227, 113), (1000, 700, 64, 64), (65, 64, 64, 32)):
        covered = np.zeros((height, width), bool)
        for w in grid(width, height, patch, stride):
            assert w.width == w.height == patch and 0 <= w.x <= width - patch and 0 <= w.y <= height - patch
            covered[w.y : w.y + w.height, w.x : w.x + w.width] = True
        assert covered.all()
    assert grid(100, 50, 227, 113) == [Window(0, 0, 100, 50)]
    assert grid(300, 50, 227, 113) == [Window(0, 0, 227, 50), Window(73, 0, 227, 50)]
    with pytest.raises(ValueError):
        starts(10, 4, 0)


def test_truth_scores_count_patches_and_the_iou_of_their_areas():
    truth = np.zeros((100, 200), bool)
    truth[10:12, 0:100] = True  # a crack along the top of the left half
    windows = grid(200, 100, 50, 50)  # 4 x 2 windows
    assert len(windows) == 8
    p = np.zeros(8)
    p[[0, 1, 3]] = 0.9  # two of the two cracked windows found, and one false alarm
    scores = CrackMap(Path("x.jpg"), 200, 100, windows, p, 0.5).score(truth)
    assert scores["true_cracked_patches"] == 2
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == 1.0 and scores["f1"] == pytest.approx(0.8)
    assert scores["iou"] == pytest.approx(2 / 3)  # cracked area: 2 windows; found: 3 windows over it
    nothing = CrackMap(Path("x.jpg"), 200, 100, windows, np.zeros(8), 0.5).score(truth)
    assert nothing["precision"] == 0.0 and nothing["recall"] == 0.0 and nothing["iou"] == 0.0
    clean = CrackMap(Path("x.jpg"), 200, 100, windows, np.zeros(8), 0.5).score(np.zeros((100, 200), bool))
    assert clean["precision"] == clean["recall"] == clean["f1"] == clean["iou"] == 1.0  # a clean photo called clean
    grazing = np.zeros((100, 200), bool)
    grazing[0, 0] = True  # one pixel of crack in a window is not a cracked window
    assert TRUTH_MIN_SHARE * 2500 > 1 and CrackMap(Path("x"), 200, 100, windows, p, 0.5).score(grazing)["true_cracked_patches"] == 0


def test_generated_photos_repeat_and_their_truth_marks_the_cracks(tmp_path):
    image, truth = render_photo(3, 600, 400, cracks=2)
    again, same = render_photo(3, 600, 400, cracks=2)
    assert image.size == (600, 400) and truth.shape == (400, 600)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and np.array_equal(truth, same)
    assert 0 < truth.mean() < 0.05
    pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels[truth].mean() < pixels[~truth].mean() - 20  # cracks are darker than the surface around them
    photo, mask = photos.write_photo(tmp_path / "p.jpg", image, truth)
    assert photos.truth_beside(photo) == mask and np.array_equal(photos.read_truth(mask, image.size), truth)


def test_a_photo_over_the_limit_or_unreadable_is_one_clear_error(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(photos.DataError, match=r"300 x 200 = 60,000 pixels, over the limit of 50,000"):
        photos.open_photo(big, max_pixels=50_000)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(photos.DataError, match="notes.jpg: cannot be read as an image"):
        photos.open_photo(text)


def test_exif_orientation_alpha_and_16_bit_photos_are_read_as_a_viewer_shows_them(tmp_path):
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10] = 255  # a white band at the top
    sideways = Image.fromarray(np.rot90(upright, 1).copy())  # stored turned, with the tag that turns it back
    exif = sideways.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view
    sideways.save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    photo = photos.open_photo(tmp_path / "turned.jpg")
    assert photo.size == (60, 40) and photo.rows(0, 5).mean() > 200 and photo.rows(30, 40).mean() < 50
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert photos.open_photo(tmp_path / "clear.png").rows(0, 20).min() == 255  # transparent: white
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "wide.png")
    assert photos.open_photo(tmp_path / "wide.png").rows(0, 20).min() == 255


def test_a_plain_photo_streams_in_strips_with_the_pixels_pil_decodes_and_others_are_decoded_whole(tmp_path, monkeypatch):
    pytest.importorskip("pyvips")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (700, 500, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wall.jpg", quality=90)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    for name in ("wall.jpg", "turned.jpg", "gray.jpg"):
        with Image.open(tmp_path / name) as img:
            expected = np.asarray(viewer_rgb(ImageOps.exif_transpose(img)))
        photo = photos.open_photo(tmp_path / name)
        assert isinstance(photo, photos.StreamedPhoto) and photo.size == expected.shape[1::-1], name
        height, patch = expected.shape[0], 227
        for top in [*range(0, height - patch, 113), height - patch]:  # the windows' strips: overlapping, top to bottom
            np.testing.assert_array_equal(photo.rows(top, top + patch), expected[top : top + patch], err_msg=name)
            assert len(photo._held) <= patch + photos.STRIP_ROWS  # what it holds: the strip asked for and the rest of one decoded
        with pytest.raises(ValueError, match="top to bottom"):
            photo.rows(0, 10)
        assert photo.preview((50, 70) if name != "turned.jpg" else (70, 50)).size == ((50, 70) if name != "turned.jpg" else (70, 50))
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert isinstance(photos.open_photo(tmp_path / "clear.png"), photos.DecodedPhoto)  # alpha: as predict reads it
    # An orientation only in XMP: PIL turns the photo, libvips would not, so PIL decodes it.
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' \
          b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    Image.fromarray(pixels).save(tmp_path / "xmp.jpg", quality=90, xmp=xmp)
    with Image.open(tmp_path / "xmp.jpg") as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    photo = photos.open_photo(tmp_path / "xmp.jpg")
    assert photo.size == expected.shape[1::-1]
    np.testing.assert_array_equal(photo.rows(0, 50), expected[:50])
    monkeypatch.setitem(sys.modules, "pyvips", None)  # without the inspect extra: PIL decodes every photo whole
    assert isinstance(photos.open_photo(tmp_path / "wall.jpg"), photos.DecodedPhoto)


def test_a_photo_cut_short_fails_while_streaming_and_is_named(tmp_path):
    pytest.importorskip("pyvips")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (900, 600, 3), np.uint8)).save(tmp_path / "cut.jpg", quality=90)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(photos.DataError, match="cut.jpg: cannot be read as an image"):
        photo = photos.open_photo(tmp_path / "cut.jpg")
        photo.rows(0, photo.size[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """One short linear run at 32 px, shared by the command-line tests below: its store and run id."""
    folder = tmp_path_factory.mktemp("inspect-run")
    env = services.runner_env(f"sqlite:///{folder / 'mlflow.db'}", folder / "data")
    args = ["dataset.samples_per_class=40", "dataset.source_size=64", "dataset.image_size=32", "trainer.epochs=3",
            "trainer.progress=false", f"tracking.artifact_root={folder / 'mlruns'}"]
    done = services.run_in_process(args, folder, env)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    return {"uri": env["MLFLOW_TRACKING_URI"], "run_id": run.info.run_id, "folder": str(folder)}


def inspect_cli(trained: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return services.run_in_process(list(args), cwd, services.runner_env(trained["uri"]), "runner.inspect")


def test_inspect_maps_photos_writes_overlay_table_and_summary_and_skips_bad_ones(trained, tmp_path):
    image, truth = render_photo(1, 300, 200, cracks=2)
    photos.write_photo(tmp_path / "wall" / "a.jpg", image, truth)
    Image.fromarray(np.full((20, 25, 3), 128, np.uint8)).save(tmp_path / "wall" / "tiny.png")  # smaller than a window
    (tmp_path / "wall" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    done = inspect_cli(trained, tmp_path, trained["run_id"], str(tmp_path / "wall"), "--out", str(tmp_path / "out"), "--threshold", "0.6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "broken.jpg" in done.stderr and "skipped" in done.stderr and "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "vs truth: precision" in lines[0] and "tiny.png" in lines[1]

    summary = json.loads((tmp_path / "out" / "a" / "summary.json").read_text())
    windows = grid(300, 200, 32, 16)
    assert summary["patches"] == len(windows) and summary["patch"] == 32 and summary["stride"] == 16
    assert summary["runtime"] == "onnx"  # the fastest the model has: a linear run exports ONNX when it ends
    assert summary["threshold"] == 0.6 and summary["model_uri"] == f"runs:/{trained['run_id']}/model"
    assert set(summary["truth"]) >= {"precision", "recall", "f1", "iou"}
    rows = (tmp_path / "out" / "a" / "patches.csv").read_text().splitlines()
    assert rows[0] == "x,y,width,height,p_crack" and len(rows) == len(windows) + 1
    p = np.array([float(r.split(",")[4]) for r in rows[1:]])
    assert 0 <= p.min() and p.max() <= 1 and summary["cracked_patches"] == int((p >= 0.6).sum())
    with Image.open(tmp_path / "out" / "a" / "overlay.png") as overlay:
        assert overlay.size == (300, 200)
    tiny = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert tiny["patches"] == 1

    nothing = inspect_cli(trained, tmp_path, trained["run_id"], str(tmp_path / "wall" / "broken.jpg"), "--out", str(tmp_path / "o2"))
    assert nothing.returncode == 2 and "no photo could be inspected" in nothing.stderr
    missing = inspect_cli(trained, tmp_path, trained["run_id"], str(tmp_path / "wall" / "a.jpg"), "--runtime", "onnx-int8")
    assert missing.returncode == 2 and "has no onnx-int8 export" in missing.stderr and "python -m runner.export" in missing.stderr


def test_inspect_log_records_a_run_and_a_kill_leaves_it_killed(trained, tmp_path):
    image, truth = render_photo(2, 400, 300, cracks=1)
    photos.write_photo(tmp_path / "p" / "one.jpg", image, truth)
    done = inspect_cli(trained, tmp_path, trained["run_id"], str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--log")
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(trained["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("inspections").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["runtime"] == "onnx" and run.data.metrics["photos"] == 1
    assert run.data.tags["model_run_id"] == trained["run_id"] and "truth_f1" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "one")} == {"one/overlay.png", "one/patches.csv", "one/summary.json"}
    assert run.inputs.dataset_inputs[0].dataset.name == "photos"

    for n in range(10):  # enough photos that a SIGTERM sent when the first is done finds it mid-way (it once came after the last of six)
        photos.write_photo(tmp_path / "many" / f"{n}.jpg", *render_photo(10 + n, 1200, 900, cracks=1))
    env = services.runner_env(trained["uri"])
    # Small batches: seconds a photo, so the signal lands mid-way.
    args = [trained["run_id"], str(tmp_path / "many"), "--out", str(tmp_path / "o"), "--log", "--batch-size", "4"]
    proc = forked.start("runner.inspect", args, tmp_path, env)
    deadline = time.monotonic() + 300
    while not (tmp_path / "o" / "0" / "summary.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("inspections").experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "KILLED" and "marked KILLED" in err and "Traceback" not in err

    # Killed outright, no handler runs: the run stays RUNNING until runner.doctor finds its process gone.
    shutil.rmtree(tmp_path / "o")
    proc = forked.start("runner.inspect", args, tmp_path, env)
    while not (tmp_path / "o" / "0" / "summary.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline + 300, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    runs = client.search_runs([client.get_experiment_by_name("inspections").experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "RUNNING"
    fixed = services.run_in_process(["--tracking-uri", trained["uri"], "--fix"], tmp_path, env, "runner.doctor")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_a_stop_while_the_model_loads_opens_no_inspection_run(trained, tmp_path, monkeypatch):
    """SIGTERM during the model's load: exit 130 before the first photo, no run opened only to be closed KILLED."""
    image, truth = render_photo(3, 300, 200, cracks=1)
    photos.write_photo(tmp_path / "p" / "one.jpg", image, truth)
    client = mlflow.MlflowClient(trained["uri"])

    def inspection_runs() -> int:
        inspections = client.get_experiment_by_name("inspections")
        return len(client.search_runs([inspections.experiment_id])) if inspections else 0

    load = inspect_command.runtimes.load

    def load_then_signalled(*args, **kwargs):
        loaded = load(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # through the handler the command installed, as a `kill` would
        return loaded

    monkeypatch.setattr(inspect_command.runtimes, "load", load_then_signalled)
    before = inspection_runs()
    done = inspect_cli(trained, tmp_path, trained["run_id"], str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--log")
    assert done.returncode == 130 and "nothing was inspected" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists() and inspection_runs() == before
