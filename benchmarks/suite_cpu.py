"""Where the test suite's time goes: each test's wall time and CPU time, its own and its processes'.

``--durations`` gives wall time only, which a test waiting on a server shares with the other
worker. Load this as a pytest plugin and each test's CPU seconds are recorded too: the
worker's own (training in-process) and its waited-for children's (``python -m runner``
subprocesses, joblib and Ray workers, servers it stopped). Then summarise:

    PYTHONPATH=benchmarks SUITE_CPU_DIR=/tmp/suite-cpu python -m pytest -q -p suite_cpu
    python benchmarks/suite_cpu.py /tmp/suite-cpu

Give each suite run a fresh folder: records are appended. Processes a test leaves to others
(Ray's daemons, a server stopped by a module fixture) are counted where they are waited for, or
not at all; threads an earlier test left running (TensorFlow's pools) count for the test under way.
The summary also says how long the machine's cores sat idle (or waited for the disk) from the first
test's start to the last one's end (Linux' /proc/stat): what better packing of tests could still win.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

OUT = "SUITE_CPU_DIR"  # the folder each worker writes its records to


def cpu_seconds() -> tuple[float, float]:
    """(this process's, its waited-for children's) user + system seconds so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def machine_seconds() -> list[float] | None:
    """The machine's [idle or waiting for I/O, all] core-seconds since boot (Linux); None elsewhere."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return [(ticks[3] + ticks[4]) / hz, sum(ticks) / hz]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Time one test with its setup and teardown, and append the record to this worker's file."""
    folder = os.environ.get(OUT)
    before, started, machine = cpu_seconds(), time.time(), machine_seconds()
    yield
    if folder is None:
        return
    after = cpu_seconds()
    record = {"test": item.nodeid, "start": started, "wall": time.time() - started, "own": after[0] - before[0],
              "children": after[1] - before[1], "machine_before": machine, "machine_after": machine_seconds()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"worker-{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help=f"the folder of ${OUT}")
    parser.add_argument("--top", type=int, default=20, help="how many of the costliest tests to list")
    args = parser.parse_args(argv)
    workers = {path.stem: [json.loads(line) for line in path.open()] for path in sorted(args.folder.glob("worker-*.jsonl"))}
    records = [r for rs in workers.values() for r in rs]
    if not records:
        raise SystemExit(f"no records in {args.folder}: run pytest with -p suite_cpu and {OUT}={args.folder}")
    first = min(r["start"] for r in records)
    print(f"{len(records)} tests: busy {sum(r['wall'] for r in records):.0f} worker-seconds, CPU {sum(r['own'] for r in records):.0f} s in the workers "
          f"and {sum(r['children'] for r in records):.0f} s in their processes")
    for name, rs in workers.items():
        print(f"{name}: busy {sum(r['wall'] for r in rs):.0f} s, last test ended {max(r['start'] + r['wall'] for r in rs) - first:.0f} s after the first began")
    opening, closing = min(records, key=lambda r: r["start"]), max(records, key=lambda r: r["start"] + r["wall"])
    if opening.get("machine_before") and closing.get("machine_after"):
        idle, total = (end - begin for begin, end in zip(opening["machine_before"], closing["machine_after"]))
        print(f"the machine's cores: idle or waiting for the disk {idle:.0f} of {total:.0f} core-seconds ({idle / total:.0%}) "
              "from the first test's start to the last one's end")
    print(f"\n{'wall s':>7} {'own s':>7} {'children s':>10}  test (costliest CPU first)")
    for r in sorted(records, key=lambda r: -(r["own"] + r["children"]))[: args.top]:
        print(f"{r['wall']:7.1f} {r['own']:7.1f} {r['children']:10.1f}  {r['test']}")


if __name__ == "__main__":
    main()
