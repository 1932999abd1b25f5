"""Extracting a data set's zip, which may come from a stranger: checked before anything is written.

Why: dataset.url and dataset.path may name any zip, and ``ZipFile.extractall`` trusts it. A member
that expands a thousandfold fills the disk (3 MiB into 3 GiB), a link can point a later write
outside the folder, and a damaged member is a traceback after half the files are written. Here
the central directory is checked first (names, kinds, sizes, ratios, the free disk), the bytes
actually written are counted (declared sizes can lie), and each refusal is one DataError naming
the archive, the member and the limit. The caller extracts into a new folder and removes it on
any error, so nothing half-extracted stays.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from crack_runner.datasets import stopping
from crack_runner.datasets.errors import DataError
from crack_runner.datasets.integrity import is_full, size_text, write_failure

# The real set (40,000 jpgs) expands to about 250 MB: a data set 250 times larger is still
# accepted, while a bomb of many members that each stay under the ratio limit is not.
MAX_TOTAL_BYTES = 64 * 2**30
# jpg and png barely compress (about 1:1) and text or csv reaches about 10:1, while a run of
# zeros deflates at about 1000:1: a member this compressed is no image.
MAX_RATIO = 200
# Below this size a member does no harm whatever its ratio (a blank image, a small text file).
RATIO_FLOOR_BYTES = 4 * 2**20
# Left free after extracting, so the disk is not filled to the brim (the runs write there next).
SPARE_BYTES = 256 * 2**20
# A file takes whole blocks on disk: up to one block more than its size.
FILE_OVERHEAD_BYTES = 4096
CHUNK_BYTES = 2**20
# The compression methods Python's zipfile reads (deflate64, used by some Windows tools, is not one).
READABLE_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})

FIX = ("If you trust the archive, extract it yourself and set dataset.path to the folder; "
       "otherwise use the data set's original archive.")


def extract_zip(archive: Path, into: Path) -> None:
    """Extract ``archive`` into the new, empty folder ``into``, or raise DataError before writing if it is unsafe.

    The caller removes ``into`` when this raises: a refusal while writing (a false size, a bad
    CRC, a full disk) leaves a partial tree there.
    """
    if not zipfile.is_zipfile(archive):
        raise DataError(f"{archive} is not a zip archive. Delete it to download again, or fix dataset.path.")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            needed = _check(archive, members, into.parent)
            try:
                for member in members:  # one by one, so a stop request ends it between files
                    stopping.check()
                    _write(zf, member, into)
            except OSError as err:
                if not is_full(err):
                    raise
                raise DataError(
                    f"{write_failure(err, into.parent, f'the files of {archive.name}', needed)}. "
                    "Free space there, or set dataset.cache_dir to a disk with room."
                ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a bad CRC-32, a cut-short or garbled member
        raise DataError(
            f"{archive} is damaged: {err}. Delete it to download it again, or replace the file at dataset.path."
        ) from None


def _check(archive: Path, members: list[zipfile.ZipInfo], folder: Path) -> int:
    """Refuse an unsafe member or a total past the limits or the free disk; returns the bytes the files need on disk."""
    total = 0
    for member in members:
        name = member.filename
        problem = _unsafe(member)
        if problem is not None:
            raise DataError(f"{archive}: member {name!r} {problem}, so the archive is refused. {FIX}")
        if member.file_size > RATIO_FLOOR_BYTES and member.file_size > MAX_RATIO * member.compress_size:
            raise DataError(
                f"{archive}: member {name!r} expands from {size_text(member.compress_size)} to {size_text(member.file_size)}, "
                f"past the limit of {MAX_RATIO}:1 for members over {size_text(RATIO_FLOOR_BYTES)} (images barely "
                f"compress; this looks like a zip bomb), so the archive is refused. {FIX}"
            )
        total += member.file_size
        if total > MAX_TOTAL_BYTES:
            raise DataError(
                f"{archive}: with member {name!r} it expands to more than the limit of {size_text(MAX_TOTAL_BYTES)} "
                f"for a data set, so the archive is refused. {FIX}"
            )
    needed = total + len(members) * FILE_OVERHEAD_BYTES
    free = shutil.disk_usage(folder).free
    if needed + SPARE_BYTES > free:
        raise DataError(
            f"{archive} expands to {size_text(needed)} in {len(members)} members; with {size_text(SPARE_BYTES)} to spare "
            f"it needs {size_text(needed + SPARE_BYTES)} in {folder}, which has {size_text(free)} free. "
            "Free space there, or set dataset.cache_dir to a disk with room."
        )
    return needed


def _unsafe(member: zipfile.ZipInfo) -> str | None:
    """Why ``member`` cannot be extracted as a plain file or folder inside the target, or None."""
    path = PurePosixPath(member.filename)
    if path.is_absolute() or ".." in path.parts:
        return "has a path outside the folder it is extracted into"
    kind = stat.S_IFMT(member.external_attr >> 16)  # from the Unix mode; 0 where the maker left it out
    if kind == stat.S_IFLNK:
        return "is a symbolic link (it could point a later write outside the folder)"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is neither a file nor a folder"
    if member.flag_bits & 0x1:
        return "is encrypted"
    if member.compress_type not in READABLE_METHODS:
        return f"is compressed with method {member.compress_type}, which Python's zipfile cannot read"
    return None


def _write(zf: zipfile.ZipFile, member: zipfile.ZipInfo, into: Path) -> None:
    """Write one member under ``into``, refusing it once it expands past its declared size."""
    dest = into / member.filename
    try:
        if member.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(member) as src, open(dest, "xb") as out:  # "x": never through an existing file or link
            while chunk := src.read(CHUNK_BYTES):
                written += len(chunk)
                if written > member.file_size:
                    raise DataError(
                        f"{zf.filename}: member {member.filename!r} expands past its declared "
                        f"{size_text(member.file_size)} (the archive's sizes are false), so the archive is refused. {FIX}"
                    )
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise DataError(
            f"{zf.filename}: member {member.filename!r} clashes with another member (the same path twice, or a file "
            f"where a folder is), so the archive is refused. {FIX}"
        ) from None
