"""Archives from strangers: a zip bomb, links, paths out of the folder, bad CRCs, false sizes and a full disk.

Each is refused with one DataError naming the archive and the member, and no extracted file stays.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from crack_runner.datasets import archive, concrete_cracks
from runner.errors import DataError

TOP = "concrete"  # the real archive's layout: one top folder holding Positive/ and Negative/


def crack_zip(path: Path, extra: tuple[tuple[zipfile.ZipInfo | str, bytes], ...] = (), images: int = 2, size: int = 2000) -> Path:
    """A small archive laid out like the real one (stored, as jpgs barely compress), then the ``extra`` members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("Negative", "Positive"):
            for i in range(images):
                zf.writestr(f"{TOP}/{name}/{i:05d}.jpg", os.urandom(size))
        for member, data in extra:
            zf.writestr(member, data)
    return path


def extract(path: Path, cache: Path) -> Path:
    return concrete_cracks.prepare(str(path), "unused", cache, progress=False)


def left_in(cache: Path) -> list[str]:
    """What an extraction left in the cache, besides its lock."""
    folder = cache / "concrete_cracks"
    return sorted(str(p.relative_to(cache)) for p in folder.rglob("*") if p.suffix != ".lock") if folder.exists() else []


def test_an_ordinary_archive_with_folder_entries_is_extracted(tmp_path: Path) -> None:
    path = crack_zip(tmp_path / "cracks.zip", extra=((f"{TOP}/Positive/", b""), (f"{TOP}/readme/", b"")))
    root = extract(path, tmp_path / "cache")
    assert sorted(p.name for p in root.iterdir()) == ["Negative", "Positive", "readme"]
    with zipfile.ZipFile(path) as zf:
        assert (root / "Positive" / "00001.jpg").read_bytes() == zf.read(f"{TOP}/Positive/00001.jpg")


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = crack_zip(tmp_path / "cracks.zip")
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open(f"{TOP}/Positive/bomb.jpg", "w") as member:
        zeros = bytes(2**20)
        for _ in range(300):  # 300 MiB of zeros, about 300 KB compressed
            member.write(zeros)
    assert path.stat().st_size < 2**20
    with pytest.raises(DataError) as caught:
        extract(path, tmp_path / "cache")
    message = str(caught.value)
    assert str(path) in message and f"'{TOP}/Positive/bomb.jpg'" in message
    assert f"{archive.MAX_RATIO}:1" in message and "dataset.path" in message
    assert left_in(tmp_path / "cache") == []


def test_a_total_past_the_limit_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 5 * 2**20)  # two and a half of the images
    path = crack_zip(tmp_path / "cracks.zip", size=2 * 2**20)
    with pytest.raises(DataError, match=rf"member '{TOP}/Positive/00000.jpg' .* limit of 5.0 MiB") as caught:
        extract(path, tmp_path / "cache")
    assert str(path) in str(caught.value)
    assert left_in(tmp_path / "cache") == []


def test_too_little_free_disk_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(archive.shutil, "disk_usage", lambda folder: usage(2**30, 2**30 - 2**20, 2**20))
    path = crack_zip(tmp_path / "cracks.zip")
    with pytest.raises(DataError) as caught:
        extract(path, tmp_path / "cache")
    message = str(caught.value)
    assert str(tmp_path / "cache" / "concrete_cracks") in message and "1.0 MiB free" in message
    assert "256.0 MiB to spare" in message and "dataset.cache_dir" in message
    assert left_in(tmp_path / "cache") == []


def test_a_full_disk_while_writing_names_the_folder_and_the_space_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    opened: list[str] = []

    def open_until_full(path: Path, mode: str) -> io.IOBase:
        opened.append(str(path))
        return open(path, mode) if len(opened) == 1 else FullDisk()

    monkeypatch.setattr(archive, "open", open_until_full, raising=False)
    path = crack_zip(tmp_path / "cracks.zip", size=2**20)
    with pytest.raises(DataError) as caught:
        extract(path, tmp_path / "cache")
    message = str(caught.value)
    needed = 4 * (2**20 + archive.FILE_OVERHEAD_BYTES)
    assert f"no space left in {tmp_path / 'cache' / 'concrete_cracks'} for the files of cracks.zip" in message
    assert f"it needs {needed / 2**20:.1f} MiB" in message and "dataset.cache_dir" in message
    assert len(opened) == 2 and left_in(tmp_path / "cache") == []  # the first file was written, and removed


def test_a_symbolic_link_is_refused_with_what_writes_through_it(tmp_path: Path) -> None:
    link = zipfile.ZipInfo(f"{TOP}/Positive/more")
    link.create_system = 3  # Unix, so external_attr holds the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = crack_zip(tmp_path / "cracks.zip", extra=((link, b"/etc"), (f"{TOP}/Positive/more/passwd", b"x")))
    with pytest.raises(DataError, match=rf"member '{TOP}/Positive/more' is a symbolic link") as caught:
        extract(path, tmp_path / "cache")
    assert str(path) in str(caught.value)
    assert left_in(tmp_path / "cache") == []


@pytest.mark.parametrize("name", ["../evil.jpg", f"{TOP}/../../evil.jpg", "/tmp/evil.jpg"])
def test_a_path_out_of_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    path = crack_zip(tmp_path / "cracks.zip", extra=((name, b"x"),))
    with pytest.raises(DataError, match=rf"member '{name}' has a path outside the folder"):
        extract(path, tmp_path / "cache")
    assert left_in(tmp_path / "cache") == [] and not list(tmp_path.rglob("evil.jpg"))


def test_a_bad_crc_is_refused_and_the_partial_folder_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = crack_zip(tmp_path / "cracks.zip", extra=((f"{TOP}/Positive/broken.jpg", b"crack" * 1000),))
    data = path.read_bytes()
    spot = data.index(b"crack" * 1000) + 2500
    path.write_bytes(data[:spot] + b"X" + data[spot + 1 :])  # one byte changed inside the stored member
    written: list[str] = []
    write = archive._write
    monkeypatch.setattr(archive, "_write", lambda zf, member, into: (written.append(member.filename), write(zf, member, into)))
    with pytest.raises(DataError, match=rf"cracks.zip is damaged: Bad CRC-32 for file '{TOP}/Positive/broken.jpg'"):
        extract(path, tmp_path / "cache")
    assert len(written) == 5  # four files were extracted before it, and removed
    assert left_in(tmp_path / "cache") == []


def test_a_member_larger_than_it_declares_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = crack_zip(tmp_path / "cracks.zip")
    # As if a reader trusted the data over the central directory: more bytes come out than declared.
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, member, *args, **kwargs: io.BytesIO(bytes(member.file_size + 1)))
    with pytest.raises(DataError, match=rf"member '{TOP}/Negative/00000.jpg' expands past its declared") as caught:
        extract(path, tmp_path / "cache")
    assert str(path) in str(caught.value)
    assert left_in(tmp_path / "cache") == []


@pytest.mark.parametrize(("offset", "value", "said"), [(8, 1, "is encrypted"), (10, 9, "is compressed with method 9")])
def test_an_encrypted_or_unreadable_member_is_refused(tmp_path: Path, offset: int, value: int, said: str) -> None:
    path = crack_zip(tmp_path / "cracks.zip", images=0, extra=((f"{TOP}/Positive/00000.jpg", b"x"),))
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, data.index(b"PK\x01\x02") + offset, value)  # the central directory's flags or method
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"member '{TOP}/Positive/00000.jpg' {said}"):
        extract(path, tmp_path / "cache")
    assert left_in(tmp_path / "cache") == []
