"""Disk faults under the caches, made real: a full tmpfs, a read-only bind mount (root only).

A full disk while the decode cache is written (in memory and memory-mapped) is one clear
error naming the folder and the space needed, at once, with no partial file left; a stale
``.partial`` of a killed run never blocks the next. A complete cache on a read-only folder
is used as it is; a read-only folder without one is a clear error. The frozen-feature store
falls back to the layers on a full or read-only disk.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cache_integrity import (
    assert_freshly_decoded,
    cache_entry,
    feature_store_module,
    load,
    overwrite_middle,
    synthetic_tree,
    tiny_model,
)

from crack_runner import datasets
from crack_runner.datasets import folder
from runner.config.schema import to_run_config
from runner.errors import DataError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs or a read-only bind mount needs root")

ROW_227 = 227 * 227 * 3  # bytes of one decoded image at the real set's size


class Mounts:
    """Mounts made for one test, undone in its teardown."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def _mount(self, *args: str) -> None:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"mount {' '.join(args)} failed (no CAP_SYS_ADMIN here?): {result.stderr.strip()}")

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        self.made.append(path)
        return path

    def resize(self, path: Path, size: str) -> None:
        self._mount("-o", f"remount,size={size}", str(path))

    def read_only(self, path: Path) -> Path:
        self._mount("--bind", str(path), str(path))
        self.made.append(path)
        self._mount("-o", "remount,bind,ro", str(path))
        return path

    def undo(self) -> None:
        for path in reversed(self.made):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode:
                gc.collect()  # busy: a memory map of a file there may wait for the collector (seconds in a worker that holds Keras models)
                if subprocess.run(["umount", str(path)], capture_output=True).returncode:
                    subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    yield made
    made.undo()


# --- a full disk -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("in_memory_gb", ["null", "0"])
def test_a_full_disk_while_decoding_is_one_clear_error_and_leaves_nothing(make_cfg, cli, mounts, tmp_path, in_memory_gb):
    root = synthetic_tree(tmp_path / "tree")  # 24 images: 3.5 MiB of pixels at 227 px
    cache = mounts.tmpfs(tmp_path / "cache", "2m")
    result = cli("dataset=image_folder", f"dataset.path={root}", f"dataset.cache_dir={cache}", "dataset.image_size=227",
                 f"dataset.in_memory_gb={in_memory_gb}", tiny=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"no space left in {cache / 'decoded'} for the decode cache: it needs 3.5 MiB" in output
    assert "set dataset.cache_dir to another folder, or set dataset.decode_cache=false" in output
    assert "Traceback" not in output and "epoch 1" not in output  # stopped at the cache, before any training
    assert not list(cache.rglob("*.partial*"))
    mounts.resize(cache, "16m")  # space freed: the next run decodes into the cache
    assert_freshly_decoded(load(make_cfg, root, cache, in_memory_gb, size=227))


def test_a_full_disk_while_copying_the_rows_in_split_order_is_one_clear_error(make_cfg, mounts, tmp_path):
    root = synthetic_tree(tmp_path / "tree")
    cache = mounts.tmpfs(tmp_path / "cache", "5m")  # room for the pixel file (3.5 MiB), not for its split-ordered copy
    with pytest.raises(DataError) as raised:
        load(make_cfg, root, cache, "0", size=227)
    assert str(raised.value).startswith(f"no space left in {cache_entry(cache)} for the decode cache: it needs 3.5 MiB")
    assert not list(cache.rglob("*.partial*"))
    mounts.resize(cache, "16m")
    assert_freshly_decoded(load(make_cfg, root, cache, "0", size=227))


def test_a_stale_partial_of_a_killed_decode_is_cleared_by_the_next_run(make_cfg, mounts, tmp_path):
    root = synthetic_tree(tmp_path / "tree")
    cache = mounts.tmpfs(tmp_path / "cache", "6m")
    key = folder.fingerprint(folder.scan(root))
    stale = cache / "decoded" / f"{key}-227px.partial"
    stale.mkdir(parents=True)
    (stale / "pixels.npy").write_bytes(bytes(3 * 2**20))  # a killed decode: with it, the new one would not fit
    data = load(make_cfg, root, cache, size=227)
    assert_freshly_decoded(data)
    assert not stale.exists() and (cache_entry(cache) / "complete.json").exists()


# --- a read-only cache folder ------------------------------------------------------------


@pytest.mark.parametrize("in_memory_gb", ["null", "0"])
def test_a_complete_cache_on_a_read_only_folder_is_used_as_it_is(make_cfg, mounts, tmp_path, caplog, in_memory_gb):
    root, cache = synthetic_tree(tmp_path / "tree"), tmp_path / "cache"
    first = load(make_cfg, root, cache, in_memory_gb)
    mounts.read_only(cache)
    with caplog.at_level(logging.INFO):
        again = load(make_cfg, root, cache, in_memory_gb)
    assert "reusing" in caplog.text
    for old, new in zip((first.train, first.val, first.test), (again.train, again.val, again.test), strict=True):
        np.testing.assert_array_equal(old.images, new.images)
    if in_memory_gb == "0":  # another split order needs a rows file of its own, which cannot be written
        with pytest.raises(DataError, match=re.escape(f"could not write the decode cache in {cache_entry(cache)} (Read-only file system)")):
            load(make_cfg, root, cache, in_memory_gb, seed=4)


def test_a_damaged_cache_on_a_read_only_folder_is_a_clear_error(make_cfg, mounts, tmp_path):
    root, cache = synthetic_tree(tmp_path / "tree"), tmp_path / "cache"
    load(make_cfg, root, cache)
    pixels = cache_entry(cache) / "pixels.npy"
    overwrite_middle(pixels)
    mounts.read_only(cache)
    with pytest.raises(DataError) as raised:
        load(make_cfg, root, cache)
    message = str(raised.value)
    assert f"could not write the decode cache in {cache / 'decoded'} (Read-only file system)" in message
    assert f"the cache there is unusable: {pixels}: " in message and "rows differ from their checksums" in message
    assert message.endswith("Set dataset.cache_dir to a writable folder, or set dataset.decode_cache=false.")


def test_a_read_only_cache_folder_without_the_synthetic_set_is_a_clear_error(make_cfg, mounts, tmp_path):
    (tmp_path / "cache").mkdir()
    cache = mounts.read_only(tmp_path / "cache")
    with pytest.raises(DataError, match=re.escape(f"dataset.cache_dir '{cache}' is read-only and holds no complete synthetic set")):
        datasets.resolve_root(to_run_config(make_cfg(f"dataset.cache_dir={cache}")).dataset)


@pytest.mark.slow
def test_a_read_only_cache_folder_without_a_cache_is_a_clear_error(cli, mounts, tmp_path):
    root = synthetic_tree(tmp_path / "tree")
    (tmp_path / "cache").mkdir()
    cache = mounts.read_only(tmp_path / "cache")
    result = cli("dataset=image_folder", f"dataset.path={root}", f"dataset.cache_dir={cache}", tiny=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"could not write the decode cache in {cache / 'decoded'} (Read-only file system)" in output
    assert "Set dataset.cache_dir to a writable folder, or set dataset.decode_cache=false." in output and "Traceback" not in output


@pytest.mark.slow
def test_a_run_on_a_read_only_complete_cache_folder_trains(cli, mounts, tmp_path):
    """The default synthetic set: its images and decoded pixels both under dataset.cache_dir."""
    cache = tmp_path / "cache"
    first = cli(f"dataset.cache_dir={cache}")
    assert first.returncode == 0, first.stderr[-3000:]
    mounts.read_only(cache)
    again = cli(f"dataset.cache_dir={cache}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stderr + again.stdout


# --- the frozen-feature store ------------------------------------------------------------


def test_a_feature_store_that_fills_up_while_writing_falls_back_without_a_partial(mounts, tmp_path, monkeypatch, caplog):
    frozen_features = feature_store_module()
    store = mounts.tmpfs(tmp_path / "store", "2m")
    monkeypatch.setattr(frozen_features, "DISK_RESERVE", -2**40)  # the room check up front passes: the disk fills during the write
    images = np.zeros((200, 4, 4, 3), np.uint8)  # 200 x 5000 float32: 4 MB
    with caplog.at_level(logging.WARNING):
        assert frozen_features.FeatureStore(store, 1, 64, False, "float32").features(tiny_model(5000), images, "train") is None
    assert "could not store the train images' output" in caplog.text and "No space left on device" in caplog.text
    assert not list(store.rglob("*.npy"))


def test_a_read_only_feature_store_is_read_and_never_written(mounts, tmp_path, caplog):
    frozen_features = feature_store_module()
    model, images = tiny_model(), np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    store = tmp_path / "store"
    expected = np.array(frozen_features.FeatureStore(store, 1, 4, False).features(model, images, "train"))
    mounts.read_only(store)
    later = frozen_features.FeatureStore(store, 1, 4, False)
    np.testing.assert_array_equal(later.features(model, images, "train"), expected)  # no lock, no error marking it used
    with caplog.at_level(logging.WARNING):
        assert later.features(model, images[::-1].copy(), "val") is None
    assert "could not store the val images' output" in caplog.text and "Read-only file system" in caplog.text
