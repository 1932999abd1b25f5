"""Whole photos for an inspection: opened upright as 8-bit RGB within a size limit, and their truth masks.

Why apart from :mod:`folder`: a training image is shrunk to the model's size as it is decoded;
a photo is read at its own size, many patches wide, so its limit is the inspection's
(:data:`MAX_PHOTO_PIXELS`), not PIL's guard for small images. Its pixels are handed out a strip
of rows at a time (:meth:`Photo.rows`), so only the decoded photo itself grows with its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crack_runner.datasets.errors import DataError
from crack_runner.datasets.folder import viewer_rgb

MAX_SIDE = 20_000
MAX_PHOTO_PIXELS = MAX_SIDE * MAX_SIDE  # 1.6 GB as PIL holds RGB (4 bytes a pixel): the largest photo inspected
TRUTH_SUFFIX = ".truth.png"  # the truth mask beside a photo: white where it is cracked (the generator writes it)


@dataclass
class Photo:
    """A decoded photo: upright, 8-bit RGB."""

    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``top`` to ``bottom`` as a (rows, width, 3) uint8 array: a strip, not a copy of the whole photo."""
        return np.asarray(self.image.crop((0, top, self.image.width, bottom)), dtype=np.uint8)

    def close(self) -> None:
        self.image.close()


def open_photo(path: Path, max_pixels: int = MAX_PHOTO_PIXELS) -> Photo:
    """Decode ``path`` as a viewer shows it (EXIF orientation, alpha over white, 16-bit scaled); a DataError names why not.

    The size is read from the header first: a photo over ``max_pixels`` (or a decompression
    bomb claiming to be one) is refused before any pixel is decoded.
    """
    try:
        with _pil_limit(max_pixels):  # PIL checks its own guard on opening: ours is checked below, with the file's size
            img = Image.open(path)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from None
    try:
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise DataError(
                f"{path}: {img.width} x {img.height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
                f"(at most {MAX_SIDE:,} x {MAX_SIDE:,}): downscale or split the photo."
            )
        with _pil_limit(max_pixels):
            ImageOps.exif_transpose(img, in_place=True)  # decodes, then turns upright in place: no second copy
            rgb = viewer_rgb(img)
        if rgb is not img:
            img.close()
        return Photo(rgb)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        img.close()
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from None
    except BaseException:
        img.close()
        raise


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

