"""The synthetic generator must be reproducible, laid out like the real set, and cacheable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from crack_runner.datasets import synthetic
from crack_runner.datasets.errors import DataError
from crack_runner.datasets.synthetic import CLASS_NAMES, MARKER_NAME, generate

SIZE = 64
PER_CLASS = 6


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data set generated serially, shared by the tests that only read it."""
    return generate(tmp_path_factory.mktemp("ref") / "data", PER_CLASS, SIZE, seed=3, workers=1)


def test_layout(reference: Path) -> None:
    assert sorted(p.name for p in reference.iterdir() if p.is_dir()) == sorted(CLASS_NAMES)
    for name in CLASS_NAMES:
        files = sorted((reference / name).iterdir())
        assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(1, PER_CLASS + 1)]
        for f in files:
            with Image.open(f) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (SIZE, SIZE)


def test_same_seed_is_byte_identical_whatever_the_workers(reference: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", PER_CLASS, SIZE, seed=3, workers=2)
    assert _contents(again) == _contents(reference)


def test_different_seed_differs(reference: Path, tmp_path: Path) -> None:
    other = _contents(generate(tmp_path / "other", PER_CLASS, SIZE, seed=4, workers=1))
    ref = _contents(reference)
    assert other.keys() == ref.keys()
    assert all(other[k] != ref[k] for k in ref)


def test_classes_and_images_differ(reference: Path) -> None:
    contents = _contents(reference)
    assert len(set(contents.values())) == len(contents)


def test_marker_makes_second_call_a_no_op(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, 2, SIZE, seed=0, workers=1)
    assert json.loads((root / MARKER_NAME).read_text())["samples_per_class"] == 2
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate(root, 2, SIZE, seed=0, workers=2) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == [root]  # no staging folder left behind


def test_other_parameters_replace_a_generated_set(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, 2, SIZE, seed=0, workers=1)
    generate(root, 3, SIZE, seed=0, workers=1)
    assert len(list((root / "Positive").glob("*.jpg"))) == 3
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == [root]


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not a synthetic data set made by this runner: generated images never go into it"):
        generate(root, 2, SIZE, workers=1)
    assert (root / "mine.txt").read_text() == "keep"
    assert list(tmp_path.iterdir()) == [root]


def test_an_interrupted_generation_leaves_no_set_and_the_next_call_renders_only_the_rest(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    render_job, made = synthetic._render_job, []

    def stop_after_three(job: object) -> None:
        if len(made) == 3:
            raise KeyboardInterrupt  # Ctrl-C
        render_job(job)
        made.append(job)

    monkeypatch.setattr(synthetic, "_render_job", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", PER_CLASS, SIZE, seed=3, workers=1)
    assert not (tmp_path / "data").exists()  # never a half-filled set
    (partial,) = tmp_path.glob(".data.*.partial")
    assert len(list(partial.rglob("*.jpg"))) == 3 and not list(partial.rglob("*.tmp"))

    rendered: list[object] = []
    monkeypatch.setattr(synthetic, "_render_job", lambda job: (rendered.append(job), render_job(job)))
    root = generate(tmp_path / "data", PER_CLASS, SIZE, seed=3, workers=1)
    assert len(rendered) == 2 * PER_CLASS - 3
    assert _contents(root) == _contents(reference)  # the same set as one never interrupted
    assert not partial.exists()
