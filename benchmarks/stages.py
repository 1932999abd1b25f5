"""Where a runner run's time goes: a profile of named stages, shared by the benchmarks.

A stage is a function (an attribute of a module or class) and a label. While
:func:`stage_timers` is active each stage is patched to add its own seconds to a dict,
minus those of stages called inside it, so the labels' seconds add up to the run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from runner import app
from runner.track.tracking import Tracker

CONF = Path(__file__).resolve().parents[1] / "conf"

Stage = tuple[Any, str, str]  # (owner, attribute, label)
RUNNING: list[str] = []  # the labels of the timed stages under way, innermost last (MemoryPeaks reads it)


def status_kb() -> dict[str, int]:
    """This process's memory counters from /proc/self/status (VmHWM, RssAnon, RssFile, ...) in kB; empty off Linux."""
    counters = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                counters[name] = int(value.split()[0])
    return counters


def peak_rss_gb() -> float:
    """This process's peak resident memory since it started its program (VmHWM).

    Not ``getrusage``'s ru_maxrss: Linux carries into it the memory of the process that forked
    this one, as it stood at the exec, so a small command started by a large benchmark reads large.
    """
    if "VmHWM" in (counters := status_kb()):
        return counters["VmHWM"] * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MemoryPeaks:
    """Peaks of this process's own memory (RssAnon + RssShmem) and of the file pages it maps (RssFile), sampled.

    VmHWM counts both: the pages of a memory-mapped file that an epoch reads count while they
    stay mapped, though they are page cache the kernel can take back, so a run over a
    memory-mapped store reads larger than what it holds.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.own_gb = self.file_gb = 0.0
        self.own_stage = ""  # the stage under way when own memory peaked
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            kb = status_kb()
            own = (kb.get("RssAnon", 0) + kb.get("RssShmem", 0)) * 1024 / 1e9
            if own > self.own_gb:
                self.own_gb, self.own_stage = own, (RUNNING[-1] if RUNNING else "between the stages")
            self.file_gb = max(self.file_gb, kb.get("RssFile", 0) * 1024 / 1e9)
            if self._done.wait(self.every_s):
                return

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The project's config with ``overrides``, as ``python -m runner`` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def bookkeeping_stages(model_class: type) -> list[Stage]:
    """The stages after the data and the epochs that every trainer shares: MLflow logging, test evaluation, model export."""
    return [
        (Tracker, "log_metrics", "MLflow: metrics"),
        (Tracker, "log_artifact", "MLflow: artifact uploads (checkpoints)"),
        (model_class, "predict_proba", "test predictions"),
        (app, "evaluate_and_log", "test metrics, plots, JSON"),
        (model_class, "log_model", "MLflow: model export"),
    ]


@contextlib.contextmanager
def stage_timers(stages: list[Stage]) -> Iterator[dict[str, float]]:
    """Patch each stage to add its exclusive seconds to the yielded dict.

    Wall seconds under each label, CPU seconds of the process under ``cpu:<label>``.
    """
    times: dict[str, float] = defaultdict(float)
    stack = RUNNING
    saved = []
    for owner, name, label in stages:
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def timed(*args, _fn=original, _label=label, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            stack.append(_label)
            try:
                return _fn(*args, **kwargs)
            finally:
                stack.pop()
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
                times[_label] += seconds
                times[f"cpu:{_label}"] += cpu_seconds
                if stack:
                    times[stack[-1]] -= seconds
                    times[f"cpu:{stack[-1]}"] -= cpu_seconds

        setattr(owner, name, timed)
    try:
        yield times
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def timed_run(stages: list[Stage], run: Any, *args: Any) -> dict[str, float]:
    """Seconds of each stage of ``run(*args)``, and of the whole under ``whole run``."""
    with stage_timers(stages) as times:
        start, cpu = time.perf_counter(), time.process_time()
        run(*args)
        times["whole run"], times["cpu:whole run"] = time.perf_counter() - start, time.process_time() - cpu
    return dict(times)


def profile_rows(stages: list[Stage], times: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """Table rows: each stage's seconds, share of the whole run and CPU seconds, then the rest and the whole."""
    whole, whole_cpu = times["whole run"], times["cpu:whole run"]
    rows = [(label, times.get(label, 0.0), times.get(f"cpu:{label}", 0.0)) for _, _, label in stages]
    rows.append(("other: run start/end, params, tags, summary", whole - sum(r[1] for r in rows), whole_cpu - sum(r[2] for r in rows)))
    rows.append(("whole run", whole, whole_cpu))
    return [(label, f"{seconds:.2f}", f"{100 * seconds / whole:.0f}%", f"{cpu:.2f}") for label, seconds, cpu in rows]


PROFILE_HEADERS = ("stage", "seconds", "share", "CPU seconds")
