"""Every common pixel format decodes to the look a viewer shows, the same for training and prediction."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_runner.datasets.folder import decode_image, decode_into
from runner.errors import DataError
from runner.predict import decode

SIZE = 32  # the files are written at this size, so lossless formats decode to exact pixels
_ramp = np.linspace(0, 255, SIZE).round().astype(np.uint8)
GRAY = np.tile(_ramp, (SIZE, 1))  # dark on the left, white on the right
RGB = np.stack([GRAY, GRAY.T, 255 - GRAY], axis=-1)  # a distinct gradient per channel
HALF = np.where(np.arange(SIZE) < SIZE // 2, 255, 128).astype(np.uint8)[None, :].repeat(SIZE, 0)  # alpha: right half 50 %


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def over_white(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What a viewer shows for ``pixels`` with ``alpha`` on a white page."""
    a = alpha[..., None] / 255.0
    return np.rint(pixels * a + 255.0 * (1.0 - a)).astype(np.uint8)


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG written chunk by chunk: PIL has no 16-bit RGB mode to save one from."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, truecolour
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def palette_image(transparent: bool) -> tuple[Image.Image, np.ndarray]:
    """Four-colour palette image (index 0 transparent if asked) and the look expected of it."""
    colors = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [90, 90, 90]], dtype=np.uint8)
    index = (np.arange(SIZE)[:, None] // 8 + np.arange(SIZE)[None, :] // 8) % 4
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette(colors.ravel().tolist())
    expected = colors[index]
    if transparent:
        img.info["transparency"] = 0
        expected[index == 0] = 255
    return img, expected


def save(img: Image.Image, path: Path, **options) -> Path:
    img.save(path, **options)
    return path


# name -> (write the file into a folder and return it, the expected pixels, the largest mean |difference|:
# 0 for lossless files, rounding for alpha, compression for JPEG)
Case = tuple[Callable[[Path], Path], np.ndarray, float]
CASES: dict[str, Case] = {
    "gray 16-bit PNG": (lambda d: save(Image.fromarray(GRAY.astype(np.uint16) * 257), d / "g16.png"), as_rgb(GRAY), 0),
    "RGB 16-bit PNG": (lambda d: write_png16(d / "rgb16.png", RGB.astype(np.uint16) * 257), RGB, 0),
    "gray 8-bit (L)": (lambda d: save(Image.fromarray(GRAY, "L"), d / "gray.png"), as_rgb(GRAY), 0),
    "RGB": (lambda d: save(Image.fromarray(RGB, "RGB"), d / "rgb.png"), RGB, 0),
    "RGBA half transparent": (
        lambda d: save(Image.fromarray(np.dstack([RGB, HALF]), "RGBA"), d / "rgba.png"), over_white(RGB, HALF), 0.5
    ),
    "LA half transparent": (
        lambda d: save(Image.fromarray(np.dstack([GRAY, HALF]), "LA"), d / "la.png"), over_white(as_rgb(GRAY), HALF), 0.5
    ),
    "palette": (lambda d: save(palette_image(False)[0], d / "p.png"), palette_image(False)[1], 0),
    "palette with transparency": (
        lambda d: save(palette_image(True)[0], d / "pt.png", transparency=0), palette_image(True)[1], 0
    ),
    "palette with transparency (GIF)": (
        lambda d: save(palette_image(True)[0], d / "pt.gif", transparency=0), palette_image(True)[1], 0
    ),
    "CMYK TIFF": (lambda d: save(Image.fromarray(RGB, "RGB").convert("CMYK"), d / "cmyk.tif"), RGB, 0),
    "CMYK JPEG": (lambda d: save(Image.fromarray(RGB, "RGB").convert("CMYK"), d / "cmyk.jpg", quality=95), RGB, 4),
    "1-bit": (
        lambda d: save(Image.fromarray(GRAY > 127).convert("1"), d / "bw.png"), as_rgb(np.where(GRAY > 127, 255, 0).astype(np.uint8)), 0
    ),
    "32-bit integer TIFF (16-bit values)": (
        lambda d: save(Image.fromarray(GRAY.astype(np.int32) * 257, "I"), d / "i32.tif"), as_rgb(GRAY), 0
    ),
    "float TIFF (0..1)": (
        lambda d: save(Image.fromarray(GRAY.astype(np.float32) / 255, "F"), d / "f01.tif"), as_rgb(GRAY), 0
    ),
    "float TIFF (0..255)": (
        lambda d: save(Image.fromarray(GRAY.astype(np.float32), "F"), d / "f255.tif"), as_rgb(GRAY), 0
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_every_pixel_format_decodes_to_its_look(tmp_path, name):
    write, expected, tolerance = CASES[name]
    decoded = decode_image(write(tmp_path), SIZE)
    assert isinstance(decoded, np.ndarray), decoded
    assert decoded.shape == (SIZE, SIZE, 3) and decoded.dtype == np.uint8
    assert abs(decoded.mean() - expected.mean()) < 2, "the brightness differs (e.g. a high-bit-depth file read as white)"
    error = np.abs(decoded.astype(np.int16) - expected.astype(np.int16))
    assert error.mean() <= tolerance, f"mean |difference| {error.mean():.2f}, max {error.max()}"


@pytest.mark.parametrize("name", CASES)
def test_prediction_decodes_as_training_does(tmp_path, name):
    path = CASES[name][0](tmp_path)
    training = decode_image(path, 24)  # a resize too
    assert isinstance(training, np.ndarray)
    np.testing.assert_array_equal(decode([path], 24)[0], training.astype(np.float32))


def quadrants(width: int, height: int) -> np.ndarray:
    """Red, green / blue, white quadrants: any turn or flip moves them."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    top, left = slice(0, height // 2), slice(0, width // 2)
    bottom, right = slice(height // 2, None), slice(width // 2, None)
    pixels[top, left], pixels[top, right] = (220, 20, 20), (20, 220, 20)
    pixels[bottom, left], pixels[bottom, right] = (20, 20, 220), (250, 250, 250)
    return pixels


def test_exif_orientation_is_applied_after_the_jpeg_draft(tmp_path, monkeypatch):
    """A camera JPEG stored sideways with orientation 6 decodes upright, still downscaled by the JPEG decoder."""
    upright = Image.fromarray(quadrants(640, 480))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    path = save(upright.transpose(Image.Transpose.ROTATE_90), tmp_path / "camera.jpg", exif=exif.tobytes(), quality=95)
    resized: list[tuple[int, int]] = []
    original_resize = Image.Image.resize

    def spy(self: Image.Image, *args, **kwargs) -> Image.Image:
        resized.append(self.size)
        return original_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decoded = decode_image(path, SIZE)
    assert isinstance(decoded, np.ndarray)
    assert resized == [(80, 60)]  # the decoder's 1/8 scale of the 480x640 file, then turned upright
    reference = np.asarray(original_resize(upright, (SIZE, SIZE), Image.Resampling.BILINEAR)).astype(np.int16)
    assert np.abs(decoded - reference).mean() < 8
    with Image.open(path) as stored:
        sideways = np.asarray(original_resize(stored.convert("RGB"), (SIZE, SIZE))).astype(np.int16)
    assert np.abs(sideways - reference).mean() > 50  # the check above could not pass without the turn


def test_an_oversized_image_is_skipped_with_a_note_naming_it(tmp_path, monkeypatch):
    big = save(Image.fromarray(np.tile(RGB, (2, 2, 1))), tmp_path / "huge.png")  # 4096 pixels
    fine = save(Image.fromarray(RGB), tmp_path / "fine.png")  # 1024 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # PIL refuses files over twice this as decompression bombs
    out = np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8)
    ok, skipped = decode_into([big, fine], SIZE, out, progress=False)
    assert ok.tolist() == [1]
    (note,) = skipped
    assert note.startswith(str(big)) and "DecompressionBombError" in note and "4096 pixels" in note
    with pytest.raises(DataError, match="huge.png .DecompressionBombError"):
        decode([big], SIZE)
