"""The patch windows that cover a photo: the model's own patch size, a stride, every edge covered."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A patch of the photo, in its pixels: left, top, width, height (smaller than the patch only in a photo smaller than it)."""

    x: int
    y: int
    width: int
    height: int


def starts(length: int, patch: int, stride: int) -> list[int]:
    """Where windows start along a side of ``length``: every ``stride``, and one flush with the far edge so it is covered.

    A side no longer than the patch gets one window over all of it.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be at least 1 pixel, got {patch} and {stride}")
    if length <= patch:
        return [0]
    found = list(range(0, length - patch + 1, stride))
    if found[-1] != length - patch:
        found.append(length - patch)
    return found


def grid(width: int, height: int, patch: int, stride: int) -> list[Window]:
    """The windows of a ``width`` x ``height`` photo, row by row (top to bottom, left to right)."""
    w, h = min(patch, width), min(patch, height)
    return [Window(x, y, w, h) for y in starts(height, patch, stride) for x in starts(width, patch, stride)]
