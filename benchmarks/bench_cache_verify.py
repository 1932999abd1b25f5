"""What checking the caches before use costs (datasets.integrity), at the real images' 227 px.

    python benchmarks/bench_cache_verify.py                  # 1,000 and 10,000 images, 1,000 files to fingerprint
    python benchmarks/bench_cache_verify.py --images 40000   # the whole concrete-crack set (6.2 GB of pixels)

Prints, per checksum the standard library offers, its speed on one core and on all; then per
image count the seconds to check the rows a run reads (in memory, and a memory-mapped rows
file) and a frozen-feature entry of the same size, beside the seconds the read itself takes;
then the content fingerprint of a folder of JPEGs, without and with its digest index. Files
live in a temporary folder (--dir), read warm from the page cache, as a later run reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from crack_runner.datasets import integrity

PX = 227
ROW = PX * PX * 3

CHECKSUMS: dict[str, Callable[[memoryview], object]] = {
    "zlib.crc32": zlib.crc32,
    "zlib.adler32": zlib.adler32,
    "hashlib.sha1": lambda row: hashlib.sha1(row).digest(),
    "hashlib.sha256": lambda row: hashlib.sha256(row).digest(),
    "hashlib.md5": lambda row: hashlib.md5(row).digest(),
    "hashlib.blake2b": lambda row: hashlib.blake2b(row, digest_size=8).digest(),
}


def seconds(work: Callable[[], object], repeat: int = 3) -> float:
    """The best of ``repeat`` timings (the first may fault pages in)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def compare_checksums(rows: np.ndarray) -> None:
    threads = os.cpu_count() or 1
    print(f"checksum speed on {len(rows)} rows of {PX} px ({rows.nbytes / 1e9:.2f} GB), GB/s: 1 thread, {threads} threads")
    for name, hash_row in CHECKSUMS.items():

        def hash_rows(part: np.ndarray, hash_row: Callable[[memoryview], object] = hash_row) -> None:
            for row in part:
                hash_row(row.data)

        one = seconds(lambda: hash_rows(rows))
        with ThreadPoolExecutor(threads) as pool:
            many = seconds(lambda: list(pool.map(hash_rows, np.array_split(rows, threads))))
        print(f"  {name:16s} {rows.nbytes / one / 1e9:5.2f}  {rows.nbytes / many / 1e9:5.2f}")


def cache_checks(count: int, folder: Path) -> None:
    """The checks a run makes on ``count`` images' pixels, timed beside the read they guard."""
    rng = np.random.default_rng(0)
    pixels = np.lib.format.open_memmap(folder / "pixels.npy", mode="w+", dtype=np.uint8, shape=(count, PX, PX, 3))
    for start in range(0, count, 1000):
        pixels[start : start + 1000] = rng.integers(0, 256, (min(1000, count - start), PX, PX, 3), dtype=np.uint8)
    pixels.flush()
    del pixels
    mapped = np.load(folder / "pixels.npy", mmap_mode="r")
    order = rng.permutation(count)
    read = seconds(lambda: np.take(mapped, order, axis=0))
    in_memory = np.take(mapped, order, axis=0)
    decode_time = seconds(lambda: [integrity.row_checksum(row) for row in in_memory], repeat=1)
    check = seconds(lambda: integrity.row_checksums(in_memory))
    whole_file = seconds(lambda: integrity.file_checksum(folder / "pixels.npy"))
    rows_file = seconds(lambda: integrity.row_checksums(mapped))
    print(
        f"{count} images at {PX} px ({mapped.nbytes / 1e9:.2f} GB):\n"
        f"  read the split-ordered rows into memory (np.take)       {read:6.3f} s\n"
        f"  check them (row_checksums, in-memory path, every run)   {check:6.3f} s\n"
        f"  check a mapped rows file (memory-mapped path, each map) {rows_file:6.3f} s\n"
        f"  check a feature entry of this size (file_checksum)      {whole_file:6.3f} s\n"
        f"  checksums taken while decoding (one thread, once)       {decode_time:6.3f} s"
    )


def fingerprint_cost(count: int, folder: Path) -> None:
    """The content fingerprint of ``count`` JPEGs at 227 px: first run (hash every file), then a run with the index."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(rng.integers(100, 160, (PX, PX, 3), dtype=np.uint8)).save(paths[-1], quality=90)
    time.sleep(integrity.RACY_NS / 1e9)  # files older than that are recorded in the index, as a data set's are
    index = folder / "index.json"
    megabytes = sum(path.stat().st_size for path in paths) / 1e6
    stat_only = seconds(lambda: [path.stat().st_size for path in paths])
    cold = seconds(lambda: integrity.content_digests(paths))
    integrity.content_digests(paths, index)
    warm = seconds(lambda: integrity.content_digests(paths, index))
    print(
        f"fingerprint of {count} JPEGs ({megabytes:.1f} MB):\n"
        f"  stat only (the former size-based fingerprint)  {stat_only:6.3f} s\n"
        f"  SHA-256 of every file (no index: first run)    {cold:6.3f} s\n"
        f"  with the digest index ({index.stat().st_size / 1e3:.0f} kB), files unchanged {warm:6.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--files", type=int, default=1000, help="JPEGs to fingerprint")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: the system's temp folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cache_verify.", dir=args.dir))
    try:
        compare_checksums(np.random.default_rng(2).integers(0, 256, (2000, ROW), dtype=np.uint8))
        for count in args.images:
            cache_checks(count, work)
        (work / "files").mkdir()
        fingerprint_cost(args.files, work / "files")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
