"""The caches prove what they hold before a run trains on it, and follow the images' content.

Real files damaged in place, as a disk or a stray write would: bytes overwritten in the
middle of the decode cache's pixel file, of a split-ordered rows file or of a frozen-feature
entry; files cut short or missing. Each is rebuilt with a warning that names it and the run
gets the right pixels, never a traceback. An image edited in place to the same byte size (a
BMP), even with its modification time put back, gets a new fingerprint and new pixels.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_runner import datasets
from crack_runner.datasets import folder, integrity, synthetic
from runner.config.schema import to_run_config

SIZE = 16  # decoded image size: small, the checks are the same at any size


def synthetic_tree(root: Path) -> Path:
    """A small real class-per-folder tree of JPEGs (the embedded generator)."""
    return synthetic.generate(root, samples_per_class=12, image_size=32, seed=0, workers=1)


def load(make_cfg, root: Path, cache: Path, in_memory_gb: str = "null", seed: int = 3, size: int = SIZE) -> datasets.DataSplits:
    """``datasets.load`` as a run calls it; ``in_memory_gb=0`` memory-maps the pixels from the decode cache."""
    overrides = ["dataset=image_folder", f"dataset.path={root}", f"dataset.cache_dir={cache}",
                 f"dataset.image_size={size}", f"dataset.in_memory_gb={in_memory_gb}"]
    return datasets.load(to_run_config(make_cfg(*overrides, tiny=False)).dataset, seed=seed, progress=False)


def assert_freshly_decoded(data: datasets.DataSplits) -> None:
    """Every split holds exactly what decoding its files now gives."""
    size = data.image_shape[0]
    for split in (data.train, data.val, data.test):
        fresh, _, _ = folder.decode_images(split.paths, size, progress=False)
        np.testing.assert_array_equal(split.images, fresh)


def cache_entry(cache: Path) -> Path:
    (entry,) = (cache / "decoded").glob("*px")
    return entry


def overwrite_middle(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of the file, keeping its size."""
    middle = path.stat().st_size // 2
    with open(path, "r+b") as file:
        file.seek(middle)
        old = file.read(count)
        file.seek(middle)
        file.write(bytes(255 - b for b in old))


def cut_short(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def rewrite_marker(path: Path) -> None:
    """A marker changed into other valid JSON."""
    path.write_text(path.read_text().replace('"skipped": []', '"skipped": ["a file"]'))


# --- the decode cache ----------------------------------------------------------------------


@pytest.mark.parametrize("in_memory_gb", ["null", "0"])
def test_pixels_overwritten_in_the_middle_are_decoded_anew_with_a_warning(make_cfg, tmp_path, caplog, in_memory_gb):
    root, cache = synthetic_tree(tmp_path / "tree"), tmp_path / "cache"
    load(make_cfg, root, cache, in_memory_gb)
    pixels = cache_entry(cache) / "pixels.npy"
    overwrite_middle(pixels)
    # Memory-mapped, a run reads a split-ordered copy of the rows made from the pixel file: a new
    # seed makes a new copy, from the damaged file.
    with caplog.at_level(logging.WARNING):
        data = load(make_cfg, root, cache, in_memory_gb, seed=4)
    assert f"{pixels}: " in caplog.text and "of 24 rows differ from their checksums; making it anew" in caplog.text
    assert_freshly_decoded(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert_freshly_decoded(load(make_cfg, root, cache, in_memory_gb, seed=4))
    assert caplog.text == ""  # rebuilt once, then reused
    assert not list(cache.rglob("*.partial"))


@pytest.mark.parametrize("damage", [overwrite_middle, cut_short])
def test_a_damaged_rows_file_is_made_anew(make_cfg, tmp_path, caplog, damage):
    root, cache = synthetic_tree(tmp_path / "tree"), tmp_path / "cache"
    load(make_cfg, root, cache, "0")
    (rows,) = cache_entry(cache).glob("rows-*.npy")
    damage(rows)
    with caplog.at_level(logging.WARNING):
        data = load(make_cfg, root, cache, "0")
    assert str(rows) in caplog.text and "making it anew" in caplog.text
    assert Path(data.train.images.filename) == rows
    assert_freshly_decoded(data)


@pytest.mark.parametrize(
    "name, damage, in_memory_gb, why",
    [
        ("pixels.npy", cut_short, "null", "damaged or cut short"),
        ("pixels.npy", cut_short, "0", "damaged or cut short"),
        ("complete.json", cut_short, "null", "damaged or cut short"),
        ("complete.json", overwrite_middle, "0", "damaged or cut short"),
        ("complete.json", rewrite_marker, "null", "differs from its checksum"),
        ("decoded.npy", cut_short, "null", "differs from its checksum"),
        ("checksums.npy", cut_short, "0", "differs from its checksum"),
        ("checksums.npy", Path.unlink, "null", "is incomplete (checksums.npy is missing)"),
    ],
)
def test_a_cut_short_or_incomplete_cache_is_decoded_anew(make_cfg, tmp_path, caplog, name, damage, in_memory_gb, why):
    root, cache = synthetic_tree(tmp_path / "tree"), tmp_path / "cache"
    first = load(make_cfg, root, cache, in_memory_gb)
    entry = cache_entry(cache)
    damage(entry / name)
    with caplog.at_level(logging.WARNING):
        data = load(make_cfg, root, cache, in_memory_gb)
    assert str(entry) in caplog.text and why in caplog.text and "making it anew" in caplog.text
    assert_freshly_decoded(data)
    assert [split.paths for split in (data.train, data.val, data.test)] == [split.paths for split in (first.train, first.val, first.test)]


# --- the fingerprint follows the content ---------------------------------------------------


def bmp_tree(root: Path) -> Path:
    """Uncompressed BMPs: an edit of their pixels keeps the file's size."""
    rng = np.random.default_rng(0)
    for name in ("Negative", "Positive"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.bmp")
    return root


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_image_edited_in_place_to_the_same_size_gets_new_pixels(make_cfg, tmp_path, monkeypatch, keep_mtime):
    # Files written a moment ago are not recorded in the digest index (their timestamps could
    # still miss an edit); here they are, as a data set's older files are, so the edit must be
    # seen through the index.
    monkeypatch.setattr(integrity, "RACY_NS", 0)
    root, cache = bmp_tree(tmp_path / "tree"), tmp_path / "cache"
    first = load(make_cfg, root, cache)
    assert integrity.digest_index(cache, root).exists()
    edited = root / "Positive" / "003.bmp"
    before = edited.stat()
    with open(edited, "r+b") as file:  # the last 20 pixels (BMP rows are stored bottom-up: the top row)
        file.seek(-60, os.SEEK_END)
        file.write(bytes(60))
    if keep_mtime:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = edited.stat()
    assert after.st_size == before.st_size and after.st_ino == before.st_ino
    assert (after.st_mtime_ns == before.st_mtime_ns) == keep_mtime
    data = load(make_cfg, root, cache)
    assert data.fingerprint != first.fingerprint  # also the run's dataset_fingerprint tag
    assert len(list((cache / "decoded").glob("*px"))) == 2
    assert_freshly_decoded(data)
    split = next(s for s in (data.train, data.val, data.test) if edited in s.paths)
    old_split = next(s for s in (first.train, first.val, first.test) if edited in s.paths)
    assert not np.array_equal(split.images[split.paths.index(edited)], old_split.images[old_split.paths.index(edited)])


def test_the_fingerprint_is_the_same_for_the_same_bytes_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "RACY_NS", 0)  # the files are recorded in the index at once
    root = bmp_tree(tmp_path / "tree")
    index = integrity.digest_index(tmp_path / "cache", root)
    first = folder.fingerprint(folder.scan(root), index)
    copy = shutil.copytree(root, tmp_path / "elsewhere")  # other inodes and times: another machine
    assert folder.fingerprint(folder.scan(copy)) == first
    cut_short(index)  # a damaged index only costs reading the files again
    assert folder.fingerprint(folder.scan(root), index) == first
    assert len(integrity.read_json(index)["files"]) == 20


# --- the frozen-feature store --------------------------------------------------------------


def feature_store_module():
    """runner.train.frozen.store, with Keras on TensorFlow: imported on first use, as only these tests need TensorFlow."""
    from runner.train import keras_trainer  # noqa: F401, I001  (first: it puts Keras on TensorFlow before keras is imported)
    from runner.train.frozen import store as frozen_features

    return frozen_features


def tiny_model(units: int = 5):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    return keras.Model(inputs, keras.layers.Dense(units)(keras.layers.Flatten()(inputs)))


@pytest.mark.parametrize("damage", [overwrite_middle, cut_short])
def test_a_damaged_feature_entry_is_computed_anew_with_a_warning(tmp_path, caplog, monkeypatch, damage):
    frozen_features = feature_store_module()
    model, images = tiny_model(), np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    expected = np.array(frozen_features.FeatureStore(tmp_path, 1, 8, False).features(model, images, "train"))
    (entry,) = tmp_path.glob("*/*.npy")
    damage(entry)
    computed: list[str] = []
    compute = frozen_features.compute
    monkeypatch.setattr(frozen_features, "compute", lambda *args: computed.append(args[4]) or compute(*args))
    with caplog.at_level(logging.WARNING):
        again = frozen_features.FeatureStore(tmp_path, 1, 8, False).features(model, images, "train")  # the next run
    assert f"{entry} is damaged" in caplog.text and computed == ["frozen layers: train"]
    np.testing.assert_array_equal(again, expected)
    assert [p.name for p in tmp_path.glob("*/*.npy")] == [entry.name]  # the same bytes: the same checksum in the name
    computed.clear()
    np.testing.assert_array_equal(frozen_features.FeatureStore(tmp_path, 1, 8, False).features(model, images, "train"), expected)
    assert computed == []

