"""Synthetic concrete-crack photographs in the layout of the real data set.

Why: the real 40,000-image set is a large download; tests, CI and quick experiments
need an offline stand-in that is deterministic, laid out the same way
(``root/Positive/*.jpg`` = crack, ``root/Negative/*.jpg`` = no crack) and hard enough
that a linear model on raw pixels does not solve it while a small CNN can.

Every image is drawn from its own random generator seeded by ``(seed, class, index)``,
so the output does not depend on the number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from crack_runner.datasets import stopping
from crack_runner.datasets.errors import DataError

logger = logging.getLogger(__name__)

CLASS_NAMES = ("Negative", "Positive")  # index = label, the crack class is 1
GENERATOR_VERSION = 1  # bump whenever the pictures change, so caches are rebuilt
MARKER_NAME = ".complete"
JPEG_QUALITY = 90
_REFERENCE_SIZE = 227  # the sizes below are tuned at the real images' resolution
_WEATHERING = ((2.0, 4.0), (4.0, 2.0))  # Beta parameters per class: how aged the surface looks
_SUPERSAMPLE = 2  # strokes are drawn at this factor and box-filtered down: anti-aliasing

Array = np.ndarray


class _Job(NamedTuple):
    path: Path
    class_index: int
    index: int
    size: int
    seed: int


def generate(
    root: Path,
    samples_per_class: int,
    image_size: int = 227,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write samples_per_class images per class under root/Positive and root/Negative; return root.

    The images are rendered into a sibling folder named by the parameters and renamed to
    ``root`` only when complete, so an interrupted run never leaves a half-filled ``root``;
    the images it did make stay there (each written whole, by a rename) and the next call
    with the same parameters renders only the rest. One process at a time generates a set
    (a lock beside it); another waiting for it then finds it made. A ``root`` holding a marker
    with the same parameters is reused as is; one generated with other parameters is
    replaced; any other existing ``root`` is left untouched and raises DataError.
    """
    root = Path(root)
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    params = {
        "generator_version": GENERATOR_VERSION,
        "samples_per_class": samples_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    if _marker_params(root) == params:
        logger.info("Reusing synthetic data set at %s", root)
        return root
    if root.exists() and _marker_params(root) is None:
        raise DataError(
            f"{root} exists and is not a synthetic data set made by this runner: generated images never go into it. "
            "Move what it holds, or set dataset.cache_dir to another folder."
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=6).hexdigest()
    staging = root.parent / f".{root.name}.{key}.partial"
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _marker_params(root) == params:  # made by another process while this one waited
            return root
        staging.mkdir(mode=0o755, exist_ok=True)
        _drop_unfinished(staging)  # a killed run's half-written files
        jobs = _plan_jobs(staging, samples_per_class, image_size, seed)
        todo = [job for job in jobs if not job.path.exists()]
        logger.info("Generating %d synthetic images of %d px in %s%s", len(todo), image_size, root,
                    f" ({len(jobs) - len(todo)} made by an interrupted run kept)" if len(todo) < len(jobs) else "")
        try:
            _run_jobs(todo, workers)
        except BaseException:
            _drop_unfinished(staging)  # the workers are gone by now (the pool joins them when it ends)
            logger.warning("synthetic images: interrupted; those made are kept in %s and the same command renders the rest", staging)
            raise
        (staging / MARKER_NAME).write_text(json.dumps(params, sort_keys=True))
        _publish(staging, root, params)
    return root


def render(seed: int, class_index: int, index: int, size: int = 227) -> Image.Image:
    """Render one image; the same arguments always give the same picture."""
    rng = np.random.default_rng([seed, class_index, index])
    scale = size / _REFERENCE_SIZE
    # Cracked concrete tends to be older and dirtier. This weak, overlapping global cue is what lets
    # a linear model on pixels beat chance (~75-80 %) without solving the task.
    weathering = rng.beta(*_WEATHERING[class_index])
    lum = _concrete_surface(rng, size, brightness=0.84 - 0.3 * weathering + rng.normal(0.0, 0.03))
    color = np.ones((size, size, 3), np.float32) * _base_tint(rng)
    _add_stains(rng, lum, color, count=rng.poisson(0.4 + 2.0 * weathering))
    _add_pores(rng, lum, scale, count=int(rng.integers(10, 70) * scale**2))
    if CLASS_NAMES[class_index] == "Positive":
        _add_crack(rng, lum, scale)
    else:
        _add_distractors(rng, lum, color, scale)
    lum *= _uneven_light(rng, size)
    rgb = lum[..., None] * color + rng.normal(0.0, 0.012, (size, size, 3)).astype(np.float32)
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


# --------------------------------------------------------------------- whole photos

PHOTO_TILE = 2 * _REFERENCE_SIZE  # cracks and look-alikes are drawn on tiles of this size, at the patches' scale
CRACK_CORE = 0.25  # a pixel whose crack core (0..1, blurred stroke) reaches this is crack in a photo's truth mask


def render_photo(seed: int, width: int = 2000, height: int = 1500, cracks: int = 3, lookalikes: int = 8) -> tuple[Image.Image, Array]:
    """A whole photo of a concrete surface, at the patches' scale, and its truth: a bool mask of the crack pixels.

    Why: an inspection maps cracks over a photo many patches wide; judging the map needs a photo
    whose cracks are known to the pixel. ``cracks`` cracks cross it at random places, and
    ``lookalikes`` of the features that cause false alarms in practice (formwork joints,
    scratches, sharp stains, shadow edges, pore clusters) lie elsewhere, drawn as the patches'
    are. The same arguments always give the same photo.
    """
    rng = np.random.default_rng([seed, len(CLASS_NAMES), width, height])  # a stream of its own, apart from the patches'
    size = max(width, height)
    lum = _concrete_surface(rng, size, brightness=0.72 + rng.normal(0.0, 0.03))
    color = np.ones((height, width, 3), np.float32) * _base_tint(rng)
    _add_pores(rng, lum, 1.0, count=int(rng.integers(10, 70) * size**2 / _REFERENCE_SIZE**2))
    for k in range(lookalikes // 4):  # joints and shadow edges run across the whole photo
        (_formwork_line, _shadow_edge)[k % 2](rng, lum, None, 1.0)
    lum = lum[:height, :width].copy()
    truth = np.zeros((height, width), bool)
    local = (_scratches, _sharp_stain, _pore_cluster)  # the others are local marks: drawn on a tile, placed
    for k in range(lookalikes - lookalikes // 4):
        _on_tile(rng, lum, color, lambda tile_lum, tile_color, k=k: local[k % len(local)](rng, tile_lum, tile_color, 1.0))
    for _ in range(cracks):
        core = _on_tile(rng, lum, color, lambda tile_lum, tile_color: _add_crack(rng, tile_lum, 1.0))
        truth[core.region] |= core.value > CRACK_CORE
    light = _uneven_light(rng, size)[:height, :width]
    rgb = (lum * light)[..., None] * color + rng.normal(0.0, 0.012, (height, width, 3)).astype(np.float32)
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB"), truth


class _Placed(NamedTuple):
    region: tuple[slice, slice]
    value: Array


def _on_tile(rng: np.random.Generator, lum: Array, color: Array, draw: Callable[[Array, Array], Array | None]) -> _Placed:
    """Run ``draw`` on a blank tile and multiply what it did into a random place of the photo (clipped at its edges)."""
    height, width = lum.shape
    tile_lum = np.ones((PHOTO_TILE, PHOTO_TILE), np.float32)
    tile_color = np.ones((PHOTO_TILE, PHOTO_TILE, 3), np.float32)
    drawn = draw(tile_lum, tile_color)
    x = int(rng.integers(-PHOTO_TILE // 4, max(1, width - 3 * PHOTO_TILE // 4)))
    y = int(rng.integers(-PHOTO_TILE // 4, max(1, height - 3 * PHOTO_TILE // 4)))
    photo = (slice(max(y, 0), min(y + PHOTO_TILE, height)), slice(max(x, 0), min(x + PHOTO_TILE, width)))
    tile = (slice(photo[0].start - y, photo[0].stop - y), slice(photo[1].start - x, photo[1].stop - x))
    lum[photo] *= tile_lum[tile]
    color[photo] *= tile_color[tile]
    return _Placed(photo, drawn[tile] if drawn is not None else tile_lum[tile])


# --------------------------------------------------------------------- orchestration


def _marker_params(root: Path) -> dict | None:
    """The parameters a finished generation recorded in root, or None."""
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _plan_jobs(folder: Path, samples_per_class: int, size: int, seed: int) -> list[_Job]:
    width = max(5, len(str(samples_per_class)))  # 00001.jpg like the real set, sortable
    jobs = []
    for class_index, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(exist_ok=True)
        for index in range(1, samples_per_class + 1):
            path = folder / name / f"{index:0{width}d}.jpg"
            jobs.append(_Job(path, class_index, index, size, seed))
    return jobs


def _run_jobs(jobs: list[_Job], workers: int | None) -> None:
    """Render all jobs, in parallel over the cores unless workers == 1; a stop request ends it within a second.

    Interrupted, the worker processes are terminated, not waited for (generate removes the staging folder).
    """
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), unit="img", desc="synthetic images", disable=None) as bar:
        if workers == 1:
            for job in jobs:
                stopping.check()
                _render_job(job)
                bar.update()
            return
        chunksize = max(1, len(jobs) // (workers * 16))
        chunks = [jobs[start : start + chunksize] for start in range(0, len(jobs), chunksize)]
        with stopping.process_pool(workers) as pool:  # leaving it terminates the workers
            for done in stopping.imap(pool, _render_chunk, chunks):
                bar.update(done)


def _render_job(job: _Job) -> None:
    """Render one image and write it whole: under a temporary name, then renamed (an interrupted write leaves no image)."""
    image = render(job.seed, job.class_index, job.index, job.size)
    partial = job.path.with_name(f".{job.path.name}.tmp")
    image.save(partial, "JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=0)
    os.replace(partial, job.path)


def _drop_unfinished(staging: Path) -> None:
    """Delete the temporary files of images whose writing was cut short, so the staging folder holds whole images only."""
    for unfinished in staging.glob("*/.*.tmp"):
        unfinished.unlink(missing_ok=True)


def _render_chunk(jobs: list[_Job]) -> int:
    """One task of the worker processes: a few images, fewer round trips than one each."""
    for job in jobs:
        _render_job(job)
    return len(jobs)


def _publish(staging: Path, root: Path, params: dict) -> None:
    """Move the finished staging folder to root, replacing a stale generation."""
    stale = None
    if root.exists():
        stale = staging.with_suffix(".stale")
        root.rename(stale)
    try:
        staging.rename(root)
    except OSError:
        # Another process published the same data set first: keep theirs.
        if _marker_params(root) != params:
            raise
        shutil.rmtree(staging)
    if stale is not None:
        shutil.rmtree(stale)


# --------------------------------------------------------------------- surface


def _fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int, gain: float) -> Array:
    """Zero-mean, unit-std value noise: random grids upsampled and summed over octaves."""
    total = np.zeros((size, size), np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        if cells > size:
            break
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        total += amplitude * _upsample(grid, size)
        amplitude *= gain
        cells *= 2
    return (total - total.mean()) / (total.std() + 1e-6)


def _upsample(grid: Array, size: int) -> Array:
    return np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.Resampling.BICUBIC))


def _concrete_surface(rng: np.random.Generator, size: int, brightness: float) -> Array:
    """Grey luminance: cloudy shading, mottling, sand grains and fine sensor-like grain."""
    clouds = _fractal_noise(rng, size, cells=int(rng.integers(2, 5)), octaves=3, gain=0.5)
    # Mottling and sand grains have a physical size: fixed cell counts, finer at low resolution.
    mottle = _fractal_noise(rng, size, cells=min(size, _REFERENCE_SIZE // 12), octaves=2, gain=0.7)
    sand_cells = min(size, int(_REFERENCE_SIZE / rng.uniform(2.5, 4.0)))
    sand = _fractal_noise(rng, size, cells=sand_cells, octaves=1, gain=1.0)
    grain = rng.standard_normal((size, size)).astype(np.float32)
    lum = brightness * (
        1.0
        + rng.uniform(0.02, 0.07) * clouds
        + rng.uniform(0.015, 0.035) * mottle
        + rng.uniform(0.02, 0.05) * sand
        + rng.uniform(0.015, 0.035) * grain
    )
    return lum.astype(np.float32)


def _base_tint(rng: np.random.Generator) -> Array:
    """Per-image colour cast: mostly neutral grey, sometimes warm (beige) or cool."""
    warmth = rng.normal(0.0, 0.025)
    tint = np.array([1.0 + warmth, 1.0 + 0.3 * warmth, 1.0 - warmth], np.float32)
    return tint + rng.normal(0.0, 0.008, 3).astype(np.float32)


def _uneven_light(rng: np.random.Generator, size: int) -> Array:
    """Multiplicative light field: a linear gradient in a random direction and a vignette."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0.0, 0.3) * (x * math.cos(angle) + y * math.sin(angle))
    cy, cx = rng.uniform(-0.2, 0.2, 2)
    vignette = rng.uniform(0.0, 0.5) * ((x - cx) ** 2 + (y - cy) ** 2)
    return (1.0 + gradient - vignette).astype(np.float32)


# --------------------------------------------------------------------- masks


class _Mask:
    """A supersampled 8-bit drawing surface that comes back as a float array in [0, 1]."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.image = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.image)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float, value: float = 1.0) -> None:
        """A rotated ellipse, as a polygon, so pores can be elongated in any direction."""
        t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        px = rx * np.cos(t)
        py = ry * np.sin(t)
        xs = cx + px * math.cos(angle) - py * math.sin(angle)
        ys = cy + px * math.sin(angle) + py * math.cos(angle)
        self.polygon(np.stack([xs, ys], axis=1), value)

    def polygon(self, points: Array, value: float = 1.0) -> None:
        self.draw.polygon([tuple(p) for p in points * _SUPERSAMPLE], fill=int(255 * value))

    def stroke(self, points: Array, widths: Array) -> None:
        """A polyline whose width varies per vertex; sub-pixel widths become fainter lines."""
        s = _SUPERSAMPLE
        for (x0, y0), (x1, y1), w in zip(points[:-1], points[1:], widths[:-1]):
            fill = int(255 * min(1.0, w * s))
            px = max(1, int(round(w * s)))
            self.draw.line([(x0 * s, y0 * s), (x1 * s, y1 * s)], fill=fill, width=px)
            if px > 2:  # round joints, otherwise thick segments leave notches
                r = px / 2
                self.draw.ellipse([x1 * s - r, y1 * s - r, x1 * s + r, y1 * s + r], fill=fill)

    def array(self, blur: float = 0.0) -> Array:
        image = self.image.resize((self.size, self.size), Image.Resampling.BOX)
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(image, np.float32) / 255.0


# --------------------------------------------------------------------- surface features


def _add_stains(rng: np.random.Generator, lum: Array, color: Array, count: int) -> None:
    """Large soft blobs (damp, dirt, rust) that darken and tint the surface."""
    size = lum.shape[0]
    for _ in range(count):
        mask = _Mask(size)
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.1, 0.35) * size
        mask.polygon(_blob(rng, cx, cy, r, irregularity=0.35))
        soft = mask.array(blur=rng.uniform(0.15, 0.4) * r)
        _shade(rng, lum, color, soft, darkening=rng.uniform(0.03, 0.12))


def _shade(rng: np.random.Generator, lum: Array, color: Array, mask: Array, darkening: float) -> None:
    """Darken lum under mask and shift its colour a little towards a random cast."""
    lum *= 1.0 - darkening * mask
    cast = np.array([0.04, 0.015, -0.03], np.float32) * rng.uniform(-0.5, 1.0)
    color += mask[..., None] * cast


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, irregularity: float) -> Array:
    """Vertices of an irregular closed shape around (cx, cy): a circle with a wavy, lumpy radius."""
    n = 32
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.uniform(0, 2 * math.pi)
    noise = rng.normal(0, 1, n)
    lumps = np.convolve(np.r_[noise[-2:], noise, noise[:2]], np.ones(5) / 5, mode="valid")  # wraps around
    radii = r * np.clip(1.0 + irregularity * lumps / (lumps.std() + 1e-6), 0.2, None)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _add_pores(
    rng: np.random.Generator,
    lum: Array,
    scale: float,
    count: int,
    centre: Array | None = None,
    spread: float = 0.0,
) -> None:
    """Air holes: dark specks and small ellipses with a lit rim on the side facing the light."""
    size = lum.shape[0]
    dark, rim = _Mask(size), _Mask(size)
    light_angle = rng.uniform(0, 2 * math.pi)
    for _ in range(count):
        if centre is None:
            cx, cy = rng.uniform(0, size, 2)
        else:
            cx, cy = centre + rng.normal(0, spread, 2)
        r = scale * min(6.0, rng.lognormal(0.0, 0.55))
        rx, ry = r, r * rng.uniform(0.55, 1.0)
        angle = rng.uniform(0, math.pi)
        depth = rng.uniform(0.4, 1.0)
        if r > 1.2 * scale:
            lit_x, lit_y = cx - 0.6 * r * math.cos(light_angle), cy - 0.6 * r * math.sin(light_angle)
            rim.ellipse(lit_x, lit_y, rx, ry, angle, 0.8)
        dark.ellipse(cx, cy, rx, ry, angle, depth)
    lum += 0.12 * rim.array(blur=0.5 * scale) * lum
    lum *= 1.0 - 0.6 * dark.array(blur=0.35 * scale)


# --------------------------------------------------------------------- cracks


def _add_crack(rng: np.random.Generator, lum: Array, scale: float) -> Array:
    """A jagged crack of random width and length, often branched, dark inside with soft edges; returns where it is (0..1)."""
    size = lum.shape[0]
    mask = _Mask(size)
    length = rng.uniform(0.5, 1.6) * size
    width = scale * float(np.clip(rng.lognormal(0.7, 0.5), 0.8, 6.0))
    centre = rng.uniform(0.3, 0.7, 2) * size
    heading = rng.uniform(0, math.pi)
    branchiness = rng.choice([0.0, 0.02, 0.05], p=[0.35, 0.4, 0.25])
    # Grow both ways from an inner point, so a crack crosses the picture rather than starting at its edge.
    for direction in (heading, heading + math.pi):
        _grow_crack(rng, mask, centre, direction, length / 2, width, scale, branchiness, generations=2)
    faint = rng.random() < 0.15
    depth = rng.uniform(0.15, 0.3) if faint else rng.uniform(0.35, 0.75)
    core = mask.array(blur=rng.uniform(0.3, 0.8) * scale)
    halo = mask.array(blur=rng.uniform(4.0, 10.0) * scale)
    lum *= (1.0 - depth * core) * (1.0 - 0.8 * depth * np.minimum(1.0, 3.0 * halo))
    return core


def _grow_crack(
    rng: np.random.Generator,
    mask: _Mask,
    start: Array,
    heading: float,
    length: float,
    width: float,
    scale: float,
    branchiness: float,
    generations: int,
) -> None:
    """Draw one crack arm as a random walk, recursing into thinner, shorter branches."""
    points = _random_walk(rng, start, heading, length, step=rng.uniform(2.0, 5.0) * scale)
    widths = width * _width_profile(rng, len(points))
    mask.stroke(points, widths)
    if generations == 0 or branchiness == 0:
        return
    for i in np.flatnonzero(rng.random(len(points) - 2) < branchiness) + 1:
        local = math.atan2(*(points[i + 1] - points[i])[::-1])
        turn = rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)
        remaining = length * (1 - i / len(points))
        _grow_crack(
            rng, mask, points[i], local + turn, remaining * rng.uniform(0.25, 0.6),
            widths[i] * rng.uniform(0.35, 0.7), scale, branchiness, generations - 1,
        )


def _random_walk(rng: np.random.Generator, start: Array, heading: float, length: float, step: float) -> Array:
    """A jagged path: the heading wanders but is pulled back to its mean, like a real crack."""
    n = max(2, int(length / step))
    deviation = np.zeros(n, np.float32)
    kicks = rng.normal(0, 0.45, n)
    for i in range(1, n):
        deviation[i] = 0.75 * deviation[i - 1] + kicks[i]
    drift = np.cumsum(rng.normal(0, 0.025, n))  # slow bending of the overall direction
    angles = heading + deviation + drift
    steps = step * rng.uniform(0.5, 1.5, n)[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def _width_profile(rng: np.random.Generator, n: int) -> Array:
    """Relative width along a crack arm: smoothly varying, tapering to a tip at the end."""
    wobble = np.convolve(rng.normal(0, 1, n + 8), np.ones(9) / 9, mode="valid")[:n]
    t = np.linspace(0, 1, n)
    taper = np.clip((1 - t) * 3, 0.15, 1.0)
    return np.clip(1.0 + 0.8 * wobble, 0.3, 1.8) * taper


# --------------------------------------------------------------------- negatives' distractors


def _add_distractors(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """Crack-like features that are not cracks, so the classes are not trivially separable."""
    kinds = (_formwork_line, _scratches, _sharp_stain, _shadow_edge, _pore_cluster)
    count = rng.choice(4, p=[0.3, 0.4, 0.2, 0.1])
    for k in rng.choice(len(kinds), size=count, replace=False):
        kinds[k](rng, lum, color, scale)


def _line_across(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """A point inside the image and a unit direction, mostly near-axis like formwork."""
    if rng.random() < 0.7:
        angle = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.08)
    else:
        angle = rng.uniform(0, math.pi)
    return rng.uniform(0.15, 0.85, 2) * size, np.array([math.cos(angle), math.sin(angle)])


def _formwork_line(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """A straight joint line from the formwork, often with a slight brightness step across it."""
    size = lum.shape[0]
    point, direction = _line_across(rng, size)
    mask = _Mask(size)
    ends = np.stack([point - 2 * size * direction, point + 2 * size * direction])
    mask.stroke(ends, np.full(2, rng.uniform(0.6, 2.5) * scale))
    sign = rng.choice([-1.0, 1.0], p=[0.3, 0.7])  # mostly a dark groove, sometimes a light ridge
    lum *= 1.0 - sign * rng.uniform(0.08, 0.25) * mask.array(blur=0.5 * scale)
    lum *= 1.0 + rng.uniform(-0.04, 0.04) * _half_plane(size, point, direction, softness=0.7 * scale)


def _scratches(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """A few thin straight marks, lighter or darker than the surface."""
    size = lum.shape[0]
    mask = _Mask(size)
    for _ in range(int(rng.integers(1, 5))):
        start = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * math.pi)
        end = start + rng.uniform(0.15, 0.6) * size * np.array([math.cos(angle), math.sin(angle)])
        mask.stroke(np.stack([start, end]), np.full(2, rng.uniform(0.4, 1.4) * scale))
    sign = rng.choice([-1.0, 1.0])
    lum *= 1.0 + sign * rng.uniform(0.08, 0.25) * mask.array(blur=0.4 * scale)


def _sharp_stain(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """A stain with crisp edges (paint, spill), unlike the soft damp blobs."""
    size = lum.shape[0]
    mask = _Mask(size)
    cx, cy = rng.uniform(0, size, 2)
    mask.polygon(_blob(rng, cx, cy, rng.uniform(0.08, 0.3) * size, irregularity=0.5))
    _shade(rng, lum, color, mask.array(blur=0.5 * scale), darkening=rng.uniform(0.06, 0.2))


def _shadow_edge(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """A cast shadow over part of the picture, its edge a straight line."""
    size = lum.shape[0]
    point, direction = _line_across(rng, size)
    shadow = _half_plane(size, point, direction, softness=rng.uniform(0.5, 6.0) * scale)
    lum *= 1.0 - rng.uniform(0.08, 0.3) * shadow


def _pore_cluster(rng: np.random.Generator, lum: Array, color: Array, scale: float) -> None:
    """A honeycombed patch: many air holes close together."""
    size = lum.shape[0]
    centre = rng.uniform(0.15, 0.85, 2) * size
    count = int(rng.integers(25, 80) * scale**2) + 5
    _add_pores(rng, lum, scale, count, centre=centre, spread=rng.uniform(0.05, 0.15) * size)


def _half_plane(size: int, point: Array, direction: Array, softness: float) -> Array:
    """1 on one side of the line through point along direction, 0 on the other, soft edge."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    distance = (x - point[0]) * direction[1] - (y - point[1]) * direction[0]
    with np.errstate(over="ignore"):  # far on the dark side exp overflows to inf: the value is 0, as it should be
        return (1.0 / (1.0 + np.exp(-distance / softness))).astype(np.float32)
