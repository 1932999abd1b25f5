"""Whole photos for an inspection: opened upright as 8-bit RGB within a size limit, and their truth masks.

Why apart from :mod:`folder`: a training image is shrunk to the model's size as it is decoded;
a photo is read at its own size, many patches wide, so its limit is the inspection's
(:data:`MAX_PHOTO_PIXELS`), not PIL's guard for small images. Its pixels are handed out a strip
of rows at a time, top to bottom (:meth:`StreamedPhoto.rows`). With libvips (pyvips, the
``inspect`` extra) an 8-bit RGB or gray JPEG or TIFF is decoded as the strips are asked for,
so memory stays a few strips whatever the photo's size (a baseline JPEG, what cameras write;
libjpeg holds a progressive one whole); the pixels are the ones PIL decodes. Other photos
(PNG, alpha, 16-bit, CMYK), or any without pyvips, are decoded whole by PIL as
:func:`folder.viewer_rgb` reads a training image.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crack_runner.datasets.errors import DataError
from crack_runner.datasets.folder import viewer_rgb

MAX_SIDE = 20_000
MAX_PHOTO_PIXELS = MAX_SIDE * MAX_SIDE  # 1.6 GB as PIL holds RGB (4 bytes a pixel): the largest photo inspected
TRUTH_SUFFIX = ".truth.png"  # the truth mask beside a photo: white where it is cracked (the generator writes it)
STRIP_ROWS = 256  # rows libvips decodes at a time
# Formats whose EXIF orientation PIL and libvips both read from the header. A PNG's may follow its pixels (eXIf after
# IDAT), where only PIL finds it, after decoding the whole photo: PIL reads PNGs.
STREAMED_FORMATS = ("JPEG", "TIFF")
ORIENTATION = 0x0112  # the EXIF tag


class Photo(Protocol):
    """A photo being inspected: upright, 8-bit RGB, read a strip of rows at a time."""

    size: tuple[int, int]

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``top`` to ``bottom`` as a (rows, width, 3) uint8 array; ``top`` never goes back up between calls."""

    def preview(self, size: tuple[int, int]) -> Image.Image:
        """The whole photo as an RGB image of ``size`` (the overlay's): shrunk, not cropped."""

    def close(self) -> None: ...


class DecodedPhoto:
    """A photo PIL has decoded whole."""

    def __init__(self, image: Image.Image) -> None:
        self.image, self.size = image, image.size

    def rows(self, top: int, bottom: int) -> np.ndarray:
        return np.asarray(self.image.crop((0, top, self.image.width, bottom)), dtype=np.uint8)

    def preview(self, size: tuple[int, int]) -> Image.Image:
        return self.image if size == self.size else self.image.resize(size, Image.Resampling.BOX)

    def close(self) -> None:
        self.image.close()


class StreamedPhoto:
    """A photo libvips decodes as its strips are asked for: the rows of the strips asked for since the last ``top`` are held."""

    def __init__(self, path: Path, image: Any) -> None:  # image: a pyvips.Image, upright, 8-bit sRGB
        self.path, self._image, self.size = path, image, (image.width, image.height)
        self._held = np.empty((0, image.width, 3), np.uint8)
        self._top = 0  # the photo's row at self._held[0]

    def rows(self, top: int, bottom: int) -> np.ndarray:
        import pyvips

        if top < self._top:
            raise ValueError(f"rows are read top to bottom: {top} is above row {self._top}, already let go")
        self._held, self._top = self._held[top - self._top :], top
        while self._top + len(self._held) < bottom:
            start = self._top + len(self._held)
            try:
                strip = self._image.crop(0, start, self.size[0], min(STRIP_ROWS, self.size[1] - start)).numpy()
            except pyvips.Error as err:
                raise unreadable(self.path, _said(err)) from None
            self._held = np.concatenate([self._held, strip.reshape(len(strip), self.size[0], -1)[..., :3]])
        return self._held[: bottom - top]

    def preview(self, size: tuple[int, int]) -> Image.Image:
        import pyvips

        try:  # a second, shrink-on-load decode of the file, as upright as the strips
            small = pyvips.Image.thumbnail(str(self.path), size[0], height=size[1], size="force")
        except pyvips.Error as err:
            raise unreadable(self.path, _said(err)) from None
        pixels = small.numpy().reshape(small.height, small.width, -1)
        return Image.fromarray(np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3], "RGB")

    def close(self) -> None:
        self._held, self._image = np.empty((0, self.size[0], 3), np.uint8), None


def open_photo(path: Path, max_pixels: int = MAX_PHOTO_PIXELS) -> Photo:
    """Open ``path`` as a viewer shows it (EXIF orientation, alpha over white, 16-bit scaled); a DataError names why not.

    The size is read from the header first: a photo over ``max_pixels`` (or a decompression
    bomb claiming to be one) is refused before any pixel is decoded.
    """
    try:
        with _pil_limit(max_pixels):  # PIL checks its own guard on opening: ours is checked below, with the file's size
            img = Image.open(path)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise unreadable(path, f"{type(err).__name__}: {err}") from None
    try:
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise DataError(
                f"{path}: {img.width} x {img.height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
                f"(at most {MAX_SIDE:,} x {MAX_SIDE:,}): downscale or split the photo."
            )
        plain = img.format in STREAMED_FORMATS and img.mode in ("RGB", "L") and "transparency" not in img.info
        streamed = _streamed(path, img.getexif().get(ORIENTATION, 1)) if plain else None
        if streamed is not None:
            img.close()
            return streamed
        with _pil_limit(max_pixels):
            ImageOps.exif_transpose(img, in_place=True)  # decodes, then turns upright in place: no second copy
            rgb = viewer_rgb(img)
        if rgb is not img:
            img.close()
        return DecodedPhoto(rgb)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        img.close()
        raise unreadable(path, f"{type(err).__name__}: {err}") from None
    except BaseException:
        img.close()
        raise


def _turn(orientation: int) -> int:
    """An EXIF orientation as both libraries apply it: 2 to 8 turn or mirror, any other value leaves the photo as stored."""
    return orientation if orientation in range(2, 9) else 1


def unreadable(path: Path, why: str) -> DataError:
    """The one error of a photo that cannot be decoded, whichever library found it."""
    return DataError(f"{path}: cannot be read as an image ({why}).")


def _said(err: Exception) -> str:
    """libvips' last line of an error: what went wrong with the file."""
    return str(err).strip().splitlines()[-1].strip()


def _streamed(path: Path, orientation: int) -> StreamedPhoto | None:
    """The photo as libvips streams it, when pyvips is installed and reads the photo as PIL does (8-bit RGB or gray, the
    same EXIF ``orientation``); else None, and PIL decodes it."""
    try:
        import pyvips
    except (ImportError, OSError):  # not installed, or its libvips missing: PIL decodes the photo whole
        return None
    pyvips.cache_set_max(0)  # no decoded photo kept after its inspection (nor read stale if the file is rewritten)
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips' INFO lines (one per thread pool) would bury a command's log
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
        if image.format != "uchar" or image.hasalpha() or image.bands not in (1, 3):
            return None
        theirs = image.get("orientation") if image.get_typeof("orientation") else 1
        if _turn(theirs) != _turn(orientation):
            return None  # an orientation PIL finds elsewhere (XMP): PIL turns it
        if _turn(orientation) != 1:
            # turning needs the whole photo: libvips holds it (in a temporary file past its 100 MB threshold)
            image = pyvips.Image.new_from_file(str(path), fail_on="truncated").autorot()
        if image.bands == 1:
            image = image.bandjoin([image, image])  # gray as PIL makes it RGB: the same value in each band
        return StreamedPhoto(path, image)
    except pyvips.Error:  # a format or a file libvips reads otherwise than PIL: PIL's reading decides
        return None


@contextlib.contextmanager
def _pil_limit(pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb guard raised to ``pixels`` while a photo is decoded (it is sized for small images); none stays none."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if saved is None else max(pixels, saved)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def truth_beside(photo: Path) -> Path | None:
    """The truth mask the generator wrote beside ``photo`` (``<stem>.truth.png``), if there is one."""
    path = photo.with_name(photo.stem + TRUTH_SUFFIX)
    return path if path.is_file() else None


def read_truth(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A truth mask as a bool array (height, width): True where the photo is cracked (any non-black pixel)."""
    try:
        with _pil_limit(size[0] * size[1]), Image.open(path) as img:
            if img.size != size:
                raise DataError(f"{path}: the truth mask is {img.width} x {img.height}, the photo {size[0]} x {size[1]}: they must match.")
            return np.asarray(img.convert("L")) > 127
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot be read as a truth mask ({type(err).__name__}: {err}).") from None


def write_photo(path: Path, image: Image.Image, truth: np.ndarray) -> tuple[Path, Path]:
    """Save a generated photo (JPEG) and its truth mask beside it (PNG): their paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    mask = path.with_name(path.stem + TRUTH_SUFFIX)
    Image.fromarray(truth.astype(np.uint8) * 255, "L").save(mask)
    return path, mask

