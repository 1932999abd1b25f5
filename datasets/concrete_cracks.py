"""The capstone's concrete-crack archive: download once, verify, extract once.

The archive holds ``Positive/`` and ``Negative/`` folders (possibly under one top folder);
:func:`prepare` returns the folder that contains them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from filelock import FileLock
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential
from tqdm import tqdm

from crack_runner.datasets import stopping
from crack_runner.datasets.archive import extract_zip
from crack_runner.datasets.errors import DataError

log = logging.getLogger(__name__)

CLASS_FOLDERS = ("Negative", "Positive")


def prepare(path: str | None, url: str, cache_dir: Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Return the folder holding Positive/ and Negative/, from ``path`` (folder or zip) or by downloading ``url``."""
    cache_dir = Path(cache_dir).expanduser()
    if path is not None:
        local = Path(path).expanduser()
        if local.is_dir():
            return class_root(local)
        if not local.is_file():
            raise DataError(
                f"dataset.path {str(local)!r} does not exist. Point it at the extracted folder or the zip, "
                "or set dataset.path=null to download dataset.url."
            )
        return _extract_once(local, cache_dir / "concrete_cracks" / local.stem)
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / Path(urllib.parse.urlparse(url).path).name
    with FileLock(str(archive) + ".lock"):
        if not archive.exists():
            _download(url, archive, progress)
        if sha256 is not None:
            _verify(archive, sha256)
    return _extract_once(archive, cache_dir / "concrete_cracks" / archive.stem)


def class_root(folder: Path) -> Path:
    """The folder holding the class folders: ``folder`` itself or its single sub-folder."""
    if all((folder / name).is_dir() for name in CLASS_FOLDERS):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1 and all((subdirs[0] / name).is_dir() for name in CLASS_FOLDERS):
        return subdirs[0]
    raise DataError(
        f"{str(folder)!r} holds no {' and '.join(CLASS_FOLDERS)} folders. The concrete-crack data set is laid out "
        "as Positive/*.jpg and Negative/*.jpg; for other trees use dataset=image_folder."
    )


@retry(
    retry=retry_if_exception_type((urllib.error.URLError, TimeoutError, ConnectionError)),
    stop=stop_after_attempt(3),
    wait=wait_exponential(min=1, max=10),
    sleep=stopping.sleep,  # Ctrl-C during a back-off stops it, not after it
    reraise=True,
)
def _fetch(url: str, part: Path, progress: bool) -> None:
    """Stream ``url`` into ``part``; a stop request ends it between reads (read1: what arrived, not a full MiB)."""
    with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
            while chunk := response.read1(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
                stopping.check()


def _download(url: str, archive: Path, progress: bool) -> None:
    """Stream ``url`` to a .part file and rename it when complete, so a broken download is never used."""
    log.info("downloading %s -> %s", url, archive)
    part = archive.with_name(archive.name + ".part")
    try:
        _fetch(url, part, progress)
    except KeyboardInterrupt:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise DataError(
            f"could not download dataset.url={url!r}: {err}. Check the address and the network, or download the "
            "zip yourself and pass dataset.path=/path/to/archive.zip."
        ) from None
    part.replace(archive)


def _verify(archive: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            stopping.check()
    if digest.hexdigest() != sha256.lower():
        raise DataError(
            f"{archive} has sha256 {digest.hexdigest()}, expected dataset.sha256={sha256}. The download is corrupt or "
            "the archive changed: delete the file to download it again, or correct dataset.sha256."
        )


def _extract_once(archive: Path, target: Path) -> Path:
    """Extract into a temporary sibling and rename it, so an interrupted or refused extraction is never used."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            log.info("extracting %s -> %s", archive, target)
            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
            try:
                extract_zip(archive, tmp)  # checked first: an archive may come from anyone
                tmp.replace(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return class_root(target)
