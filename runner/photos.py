"""``python -m runner.photos OUT``: synthetic whole photos of concrete with known cracks, to judge crack maps by.

Each photo (``photo-<n>.jpg``) gets its truth beside it (``photo-<n>.truth.png``, white where
it is cracked), which ``python -m runner.inspect`` finds and scores against. The cracks cross
at random places; look-alikes that cause false alarms (formwork joints, scratches, sharp
stains, shadow edges, pore clusters) lie elsewhere. The same seed gives the same photos.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from crack_runner.datasets.photos import write_photo
from crack_runner.datasets.synthetic import render_photo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.photos", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("out", type=Path, help="folder to write the photos and their truth masks into")
    parser.add_argument("--count", type=int, default=3, help="photos to make (default: %(default)s)")
    parser.add_argument("--width", type=int, default=2000, help="pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=1500, help="pixels (default: %(default)s)")
    parser.add_argument("--cracks", type=int, default=3, help="cracks per photo (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("count", "width", "height"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for n in range(1, args.count + 1):
        image, truth = render_photo(args.seed * 1000 + n, args.width, args.height, cracks=args.cracks)
        photo, mask = write_photo(args.out / f"photo-{n}.jpg", image, truth)
        print(f"{photo}  (truth: {mask}, {100 * truth.mean():.2f}% crack pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
