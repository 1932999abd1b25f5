"""Class-per-folder image trees: list the files, decode them once, skip the unreadable ones."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from crack_runner.datasets import stopping
from crack_runner.datasets.errors import DataError
from crack_runner.datasets.integrity import content_digests

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageList:
    """The image files of a tree, their integer labels and the class names (sorted folder names)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray


def scan(root: Path) -> ImageList:
    """List ``root/<class>/<image>`` files in a stable order; every class folder must hold images."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset path {str(root)!r} does not exist or is not a folder. Set dataset.path to a folder of class sub-folders.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"dataset path {str(root)!r} has {len(class_dirs)} class folder(s) "
            f"({', '.join(p.name for p in class_dirs) or 'none'}); a classifier needs at least 2, "
            "laid out as <path>/<class name>/<image files> (e.g. Positive/ and Negative/)."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(
                f"class folder {str(class_dir)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                "Add images to it or remove the folder."
            )
        paths += files
        labels += [label] * len(files)
    return ImageList(root, [p.name for p in class_dirs], paths, np.asarray(labels, dtype=np.int64))


def limit_per_class(images: ImageList, limit: int | None, seed: int) -> ImageList:
    """Keep at most ``limit`` images per class, a seeded random sample so quick runs stay representative."""
    if limit is None:
        return images
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in range(len(images.classes)):
        members = np.flatnonzero(images.labels == label)
        if len(members) > limit:
            members = np.sort(rng.choice(members, size=limit, replace=False))
        keep += members.tolist()
    return ImageList(images.root, images.classes, [images.paths[i] for i in keep], images.labels[keep])


def fingerprint(images: ImageList, index: Path | None = None) -> str:
    """A short hash of the file names, labels and contents: equal data sets give equal fingerprints, on any machine.

    It keys the decode cache, so an image edited in place (even to the same size) gets new
    pixels, never the old ones. ``index``: a file that remembers each file's digest while the
    file is unchanged, so a later run reads no image (see :func:`content_digests`).
    """
    digest = hashlib.sha256()
    for path, label, content in zip(images.paths, images.labels, content_digests(images.paths, index)):
        digest.update(f"{path.relative_to(images.root).as_posix()}\0{content}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def decode_image(path: Path, size: int, budget: MemoryBudget | None = None) -> np.ndarray | str:
    """One RGB image at size x size as uint8, as an image viewer shows it, or the reason it could not be read.

    Training and ``runner.predict`` both decode through here, so a file looks the same to both.
    The EXIF orientation is applied (photos stored sideways are seen upright). Other modes
    become 8-bit RGB by :func:`viewer_rgb`: transparency is composited over white, 16-bit,
    32-bit integer and float pixels are scaled to 0..255 rather than clipped (which turned
    16-bit PNGs white). A file over PIL's ``Image.MAX_IMAGE_PIXELS`` guard is refused with a
    reason that says so (PIL itself only warns below twice the guard, and decodes); callers
    prefix the path. ``budget``: the pixels are decoded only once it grants what they take
    (:func:`decode_bytes`, from the header that opening reads), so parallel decodes of huge
    files stay within it.
    """
    try:
        with Image.open(path) as img:
            _refuse_bomb(img)
            img.draft("RGB", (size, size))  # JPEG: the decoder downscales while loading, much faster
            with budget.hold(decode_bytes(img, size)) if budget is not None else nullcontext():
                try:
                    ImageOps.exif_transpose(img, in_place=True)  # loads (drafted) pixels, then turns them upright
                    rgb = viewer_rgb(img)
                    if rgb.size != (size, size):
                        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                    return np.asarray(rgb, dtype=np.uint8)
                finally:
                    img.close()  # its pixels freed before the budget is given back
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _refuse_bomb(img: Image.Image) -> None:
    """Raise DecompressionBombError for a file over ``Image.MAX_IMAGE_PIXELS`` (PIL raises only over twice that)."""
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{img.width} x {img.height} = {pixels} pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels "
            "(Image.MAX_IMAGE_PIXELS) for a possible decompression bomb; downscale the file, or leave it out"
        )


_STORED_RGB = 4  # bytes per pixel of PIL's own storage of RGB, RGBA and every other multi-band mode


def decode_bytes(img: Image.Image, size: int) -> int:
    """What decoding ``img`` (opened, not loaded) holds at its peak: an estimate from its header.

    Its pixels as stored, plus the conversion's: the 8-bit RGB copy; an RGBA copy too when it
    has transparency; for 16-bit, 32-bit and float gray, :func:`_gray8`'s float64 arrays. An
    EXIF turn's copy of the stored pixels never takes more than the conversion. Plus the image
    at size x size.
    """
    pixels = img.width * img.height
    mode = ImageMode.getmode(img.mode)
    stored = _STORED_RGB if len(mode.bands) > 1 else np.dtype(mode.typestr).itemsize  # 1-band: 1, 2 (I;16) or 4 (I, F)
    if _wide_gray(img):
        work = 3 * np.dtype(np.float64).itemsize
    elif _has_alpha(img):
        work = 2 * _STORED_RGB
    else:
        work = _STORED_RGB
    return pixels * (stored + work) + size * size * (_STORED_RGB + 3)


DECODE_MEMORY_SHARE = 0.25  # of the memory available when decoding starts, for the decoding threads together


def decode_memory_budget() -> int:
    """Bytes the decoding threads may hold at once: a share of the available memory, not a count of cores.

    A 9,000 x 9,000 PNG of a few hundred KB holds over 600 MiB while it decodes; threads by the
    core count, each on such a file, would take more memory than the machine has.
    """
    return int(psutil.virtual_memory().available * DECODE_MEMORY_SHARE)


class BudgetClosed(Exception):
    """A request to a :class:`MemoryBudget` after it was closed: the decode it was for is abandoned."""


class MemoryBudget:
    """Bytes that decoding threads hold at once, never more than ``limit`` together.

    A request waits until it fits; one larger than the whole budget waits until nothing is
    held, then runs alone. Requests are served in their order of arrival, so a large one is
    not passed over forever by small ones that fit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._changed = threading.Condition()
        self._issued = 0  # tickets given out
        self._serving = 0  # the ticket whose turn it is
        self._closed = False

    def close(self) -> None:
        """Refuse every request from now on, those waiting included (BudgetClosed): a stopped decode
        does not wait for its threads' huge files one at a time."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            ticket = self._issued
            self._issued += 1
            while not self._closed and (ticket != self._serving or (self.held and self.held + nbytes > self.limit)):
                self._changed.wait()
            if self._closed:
                raise BudgetClosed
            self._serving += 1
            self.held += nbytes
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self.held -= nbytes
                self._changed.notify_all()


_WHITE = (255, 255, 255)


def viewer_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB pixels that look like ``img`` does in a viewer.

    Alpha (RGBA, LA, PA, a palette or gray/RGB ``transparency`` entry) is composited over a
    white background: a decoded array has no alpha, and white is how viewers and browsers
    show a transparent page. High-bit-depth gray becomes 8-bit by :func:`_gray8`. CMYK, 1-bit,
    palette and YCbCr go through PIL's own conversion.
    """
    if _wide_gray(img):
        img = Image.fromarray(_gray8(img), "L")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba)  # out = pixel * alpha + white * (1 - alpha)
        return rgb
    return img if img.mode == "RGB" else img.convert("RGB")  # already RGB: no copy (a photo's pixels are hundreds of MB)


def _wide_gray(img: Image.Image) -> bool:
    """Gray pixels wider than 8 bits: 16-bit, 32-bit integer or float."""
    return img.mode in ("I", "F") or img.mode.startswith("I;16")


def _has_alpha(img: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA, premultiplied) or a palette or gray/RGB ``transparency`` entry."""
    return "A" in img.mode or "a" in img.mode or "transparency" in img.info


def _gray8(img: Image.Image) -> np.ndarray:
    """Gray pixels wider than 8 bits scaled into 0..255 (PIL's convert clips them at 255 instead).

    16-bit (I;16*) spans 0..65535, the file's own range. 32-bit integer (I) and float (F)
    files carry no range, so theirs is the smallest conventional one that holds the
    brightest pixel: 0..1 (float only), 0..255, 0..65535, 0..2**31-1. Negative values and
    NaN are black.
    """
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:
        peak = float(values.max(initial=0.0))
        ranges = ((1.0,) if img.mode == "F" else ()) + (255.0, 65535.0, 2.0**31 - 1)
        full = next((r for r in ranges if peak <= r), peak)
    return np.rint(np.clip(values, 0.0, full) * (255.0 / full)).astype(np.uint8)


CHUNK = 16  # images per task of the decoding threads


def decode_into(
    paths: list[Path],
    size: int,
    out: np.ndarray,
    workers: int | None = None,
    progress: bool = True,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths[i]`` into ``out[i]`` in parallel threads (PIL releases the GIL while decoding).

    ``out``: (len(paths), size, size, 3) uint8, in memory or a memory-mapped file; the row of
    a file that cannot be read is left as it was. ``sink(index, row)``, if given, is called in
    the decoding thread with each decoded row (the decode cache writes it to its file there).
    The threads together hold no more than :func:`decode_memory_budget` bytes of pixels being
    decoded (a file larger than that is decoded alone), whatever their number. Returns the
    indices of ``paths`` that decoded and one warning line per skipped file, each naming it.
    A stop request (:mod:`runner.track.interrupt`) raises KeyboardInterrupt within a
    second, once no thread writes to ``out`` or calls ``sink`` any more.
    """
    errors: dict[int, str] = {}
    budget = MemoryBudget(decode_memory_budget())
    leaving = threading.Event()  # set when this call returns or raises: the chunks under way stop early

    def decode_chunk(start: int) -> int:
        stop = min(start + CHUNK, len(paths))
        for i in range(start, stop):
            if leaving.is_set():
                break
            result = decode_image(paths[i], size, budget)
            if isinstance(result, str):
                errors[i] = result
                continue
            out[i] = result
            if sink is not None:
                sink(i, out[i])
        return stop - start

    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        with tqdm(total=len(paths), desc="decode", unit="img", disable=not progress) as bar:
            for done in stopping.completed([pool.submit(decode_chunk, start) for start in range(0, len(paths), CHUNK)]):
                bar.update(done)
    finally:
        leaving.set()
        budget.close()  # a thread waiting for its share gives up at once
        # Pending chunks are dropped; those under way end after their current image. Waiting for them
        # matters: the caller may close the file that ``sink`` writes to as soon as this returns.
        pool.shutdown(wait=True, cancel_futures=True)
    skipped = []
    for i in sorted(errors):
        skipped.append(f"{paths[i]} ({errors[i]})")
        log.warning("skipped unreadable image %s: %s", paths[i], errors[i])
    return np.setdiff1d(np.arange(len(paths)), sorted(errors)), skipped


def decode_images(
    paths: list[Path],
    size: int,
    workers: int | None = None,
    progress: bool = True,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`decode_into` a new array, packed: returns the images of the files that decoded
    (N, size, size, 3) uint8 in the order of ``paths`` (a copy, only when files were skipped),
    their indices in ``paths`` and the skipped files' warning lines."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok, skipped = decode_into(paths, size, out, workers, progress, sink)
    return (out if len(ok) == len(paths) else out[ok]), ok, skipped
