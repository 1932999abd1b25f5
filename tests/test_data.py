"""The folder and zip loaders, the split, the fingerprint: on real image files made here."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_runner.datasets import concrete_cracks, folder
from crack_runner.datasets.split import stratified_split
from runner.errors import DataError


def write_tree(root: Path, counts: dict[str, int], size: int = 20) -> Path:
    """A class-per-folder tree of small distinct JPEGs."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


# --- split -------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    labels = np.array([0] * 60 + [1] * 40)
    a = stratified_split(labels, 0.2, 0.2, seed=3)
    b = stratified_split(labels, 0.2, 0.2, seed=3)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(x, y)
    together = np.concatenate([a.train, a.val, a.test])
    assert sorted(together) == list(range(100))
    assert not np.array_equal(stratified_split(labels, 0.2, 0.2, seed=4).test, a.test)


def test_split_keeps_class_proportions():
    labels = np.array([0] * 300 + [1] * 100)
    split = stratified_split(labels, 0.15, 0.25, seed=0)
    for part, expected in ((split.train, 0.6 * 400), (split.val, 0.15 * 400), (split.test, 0.25 * 400)):
        assert abs(len(part) - expected) <= 1
        assert abs(labels[part].mean() - 0.25) < 0.02  # same share of class 1 everywhere


def test_split_of_too_few_images_says_what_to_do():
    with pytest.raises(DataError, match="needs at least"):
        stratified_split(np.array([0, 0, 1, 1]), 0.15, 0.15, seed=0)


# --- folder loader -----------------------------------------------------------------------


def test_scan_lists_classes_sorted_and_labels(tmp_path):
    images = folder.scan(write_tree(tmp_path, {"Positive": 3, "Negative": 4}))
    assert images.classes == ["Negative", "Positive"]
    assert list(images.labels) == [0] * 4 + [1] * 3
    assert all(p.suffix == ".jpg" for p in images.paths)


def test_decode_resizes_to_uint8_rgb(tmp_path):
    images = folder.scan(write_tree(tmp_path, {"a": 2, "b": 2}, size=40))
    pixels, ok, skipped = folder.decode_images(images.paths, 16, workers=2, progress=False)
    assert pixels.shape == (4, 16, 16, 3) and pixels.dtype == np.uint8
    assert list(ok) == [0, 1, 2, 3] and skipped == []


def test_corrupt_and_truncated_images_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    root = write_tree(tmp_path, {"Negative": 3, "Positive": 3})
    garbage = root / "Positive" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    good = (root / "Negative" / "000.jpg").read_bytes()
    truncated = root / "Negative" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    images = folder.scan(root)
    with caplog.at_level(logging.WARNING):
        pixels, ok, skipped = folder.decode_images(images.paths, 16, progress=False)
    assert len(pixels) == 6 and len(skipped) == 2
    assert "garbage.jpg" in caplog.text and "truncated.jpg" in caplog.text
    assert {Path(s.split(" (")[0]).name for s in skipped} == {"garbage.jpg", "truncated.jpg"}


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = write_tree(tmp_path, {"Negative": 3})
    (root / "Positive").mkdir()
    (root / "Positive" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"Positive.*holds no image files"):
        folder.scan(root)


def test_single_class_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        folder.scan(write_tree(tmp_path / "one", {"Negative": 3}))
    with pytest.raises(DataError, match="does not exist"):
        folder.scan(tmp_path / "nowhere")


def test_limit_caps_each_class_with_a_seeded_sample(tmp_path):
    images = folder.scan(write_tree(tmp_path, {"Negative": 10, "Positive": 6}))
    capped = folder.limit_per_class(images, 4, seed=1)
    assert np.bincount(capped.labels).tolist() == [4, 4]
    assert capped.paths == folder.limit_per_class(images, 4, seed=1).paths
    assert folder.limit_per_class(images, None, seed=1) is images


def test_fingerprint_changes_with_the_files(tmp_path):
    root = write_tree(tmp_path, {"Negative": 3, "Positive": 3})
    first = folder.fingerprint(folder.scan(root))
    assert first == folder.fingerprint(folder.scan(root))
    (root / "Positive" / "000.jpg").unlink()
    assert folder.fingerprint(folder.scan(root)) != first


# --- the concrete-crack archive ----------------------------------------------------------


@pytest.fixture
def crack_zip(tmp_path: Path) -> Path:
    """A small archive laid out like the real one: one top folder holding Positive/ and Negative/."""
    tree = write_tree(tmp_path / "src" / "concrete", {"Positive": 4, "Negative": 4})
    archive = tmp_path / "concrete_crack_images_for_classification.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.jpg")):
            zf.write(path, path.relative_to(tree.parent))
    return archive


def test_download_from_url_extracts_once(tmp_path, crack_zip):
    cache = tmp_path / "cache"
    root = concrete_cracks.prepare(None, crack_zip.as_uri(), cache, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["Negative", "Positive"]
    assert len(folder.scan(root).paths) == 8
    crack_zip.unlink()  # a second run must neither download nor extract again
    assert concrete_cracks.prepare(None, crack_zip.as_uri(), cache, progress=False) == root
    assert not list(cache.glob("*.part"))


def test_download_checks_the_sha256(tmp_path, crack_zip):
    good = hashlib.sha256(crack_zip.read_bytes()).hexdigest()
    assert concrete_cracks.prepare(None, crack_zip.as_uri(), tmp_path / "ok", sha256=good, progress=False).is_dir()
    with pytest.raises(DataError, match="sha256"):
        concrete_cracks.prepare(None, crack_zip.as_uri(), tmp_path / "bad", sha256="0" * 64, progress=False)


def test_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not download dataset.url"):
        concrete_cracks.prepare(None, (tmp_path / "missing.zip").as_uri(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("missing.zip")) + list((tmp_path / "cache").glob("*.part"))


def test_local_zip_and_folder_paths(tmp_path, crack_zip):
    root = concrete_cracks.prepare(str(crack_zip), "unused", tmp_path / "cache", progress=False)
    assert (root / "Positive").is_dir()
    assert concrete_cracks.prepare(str(root), "unused", tmp_path / "cache") == root
    with pytest.raises(DataError, match="does not exist"):
        concrete_cracks.prepare(str(tmp_path / "nope.zip"), "unused", tmp_path / "cache")


# --- the decoded-pixel cache -------------------------------------------------------------


def test_decoded_cache_is_made_once_and_equals_a_fresh_decode(tmp_path, caplog):
    from crack_runner.datasets.decoded import load_decoded

    root = write_tree(tmp_path / "tree", {"Negative": 4, "Positive": 4}, size=30)
    (root / "Positive" / "bad.jpg").write_bytes(b"garbage")
    images = folder.scan(root)
    key = folder.fingerprint(images)
    pixels, ok, skipped = load_decoded(images, 16, tmp_path / "cache", key, workers=2, progress=False)
    fresh, fresh_ok, _ = folder.decode_images(images.paths, 16, progress=False)
    assert pixels.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(pixels, fresh)
    np.testing.assert_array_equal(ok, fresh_ok)
    assert len(skipped) == 1 and "bad.jpg" in skipped[0]

    cached = next((tmp_path / "cache" / "decoded").glob("*-16px"))
    mtime = (cached / "pixels.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again, _, skipped_again = load_decoded(images, 16, tmp_path / "cache", key, workers=2, progress=False)
    assert (cached / "pixels.npy").stat().st_mtime_ns == mtime and "reusing" in caplog.text
    assert "bad.jpg" in caplog.text and skipped_again == skipped  # still reported on reuse
    np.testing.assert_array_equal(again, pixels)
    assert not list((tmp_path / "cache" / "decoded").glob("*.partial"))


def test_a_partial_decode_is_never_taken_for_the_cache(tmp_path):
    from crack_runner.datasets.decoded import load_decoded

    images = folder.scan(write_tree(tmp_path / "tree", {"Negative": 3, "Positive": 3}))
    key = folder.fingerprint(images)
    partial = tmp_path / "cache" / "decoded" / f"{key}-16px.partial"
    partial.mkdir(parents=True)
    (partial / "pixels.npy").write_bytes(b"killed mid-write")
    pixels, _, _ = load_decoded(images, 16, tmp_path / "cache", key, workers=1, progress=False)
    assert pixels.shape == (6, 16, 16, 3) and not partial.exists()


def test_a_cache_of_an_older_layout_is_decoded_anew(tmp_path, caplog):
    from crack_runner.datasets.decoded import MARKER, load_decoded

    root = write_tree(tmp_path / "tree", {"Negative": 3, "Positive": 3})
    (root / "Negative" / "bad.jpg").write_bytes(b"garbage")  # row 0 in file order: the layouts differ
    images = folder.scan(root)
    key = folder.fingerprint(images)
    load_decoded(images, 16, tmp_path / "cache", key, workers=1, progress=False)
    marker = next((tmp_path / "cache" / "decoded").glob("*-16px")) / MARKER
    marker.write_text(json.dumps({"skipped": []}))  # what the first layout (packed rows) wrote
    with caplog.at_level(logging.INFO):
        pixels, ok, skipped = load_decoded(images, 16, tmp_path / "cache", key, workers=1, progress=False)
    assert "older layout" in caplog.text and len(skipped) == 1
    fresh, fresh_ok, _ = folder.decode_images(images.paths, 16, progress=False)
    np.testing.assert_array_equal(pixels, fresh)
    np.testing.assert_array_equal(ok, fresh_ok)
    assert json.loads(marker.read_text())["format"] > 1


@pytest.mark.parametrize("unreadable", [False, True])
@pytest.mark.parametrize("in_memory_gb", ["null", "0"])
def test_splits_equal_a_fresh_decode_with_or_without_the_cache(make_cfg, tmp_path, unreadable, in_memory_gb):
    from crack_runner import datasets
    from runner.config.schema import to_run_config

    root = write_tree(tmp_path / "tree", {"Negative": 10, "Positive": 10}, size=30)
    if unreadable:
        (root / "Positive" / "bad.jpg").write_bytes(b"garbage")
    loaded = []
    for cache in ("false", "true", "true"):  # no cache, then the run that writes it, then one that reads it
        overrides = ["dataset=image_folder", f"dataset.path={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
                     f"dataset.decode_cache={cache}", "dataset.image_size=16", f"dataset.in_memory_gb={in_memory_gb}"]
        loaded.append(datasets.load(to_run_config(make_cfg(*overrides, tiny=False)).dataset, seed=3, progress=False))
    for data in loaded:
        splits = (data.train, data.val, data.test)
        assert sum(len(split) for split in splits) == 20 and len(data.skipped) == unreadable
        for split in splits:
            fresh, _, _ = folder.decode_images(split.paths, 16, progress=False)
            np.testing.assert_array_equal(split.images, fresh)
            assert split.labels.tolist() == [data.classes.index(path.parent.name) for path in split.paths]
        assert [split.paths for split in splits] == [split.paths for split in (loaded[0].train, loaded[0].val, loaded[0].test)]
    # The splits are consecutive slices of one array (no copy of the pixels per split). Over
    # dataset.in_memory_gb, with the cache on, it is a memory-mapped file of the rows in split order.
    mapped = in_memory_gb == "0"
    for data, cache in zip(loaded, (False, True, True)):
        starts = [split.images.__array_interface__["data"][0] for split in (data.train, data.val, data.test)]
        assert starts[1] == starts[0] + data.train.images.nbytes and starts[2] == starts[1] + data.val.images.nbytes
        assert isinstance(data.train.images, np.memmap) == (mapped and cache)
    if mapped:
        assert loaded[1].train.images.filename == loaded[2].train.images.filename
        assert len(list((tmp_path / "cache" / "decoded").glob("*/rows-*.npy"))) == 1
