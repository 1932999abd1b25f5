"""What Hydra tells a job about itself (its folder, overrides, sweep), and the config made concrete for this machine."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config.schema import RunConfig
from runner.track.files import absolute_path, check_writable
from runner.track.sweep import STORAGE_KEY, STUDY_KEY, SWEEP_ID_KEY, SWEEP_PARENT_KEY, SWEPT_KEY, TRIAL_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What Hydra tells a job about itself; neutral defaults when called from Python."""

    output_dir: Path
    overrides: list[str] = field(default_factory=list)
    sweep: str | None = None
    sweep_parent: str | None = None
    job_num: int = 0
    threads: int | None = None  # None: all cores (one job at a time)
    ray_node: str | None = None  # the Ray node running this job (Ray launcher), so a run shows where it ran
    swept: tuple[str, ...] = ()  # the keys its sweep varies
    trial: int | None = None  # the Optuna trial this job is, in a sweep whose study lives in a database (runner.sweep)
    study: str | None = None
    study_storage: str | None = None

    def run_name(self, model: str) -> str:
        """The MLflow run's name: the swept values first (a name cut short in the UI still shows them), the model, the other overrides."""
        swept = [o for o in self.overrides if o.lstrip("+~").split("=", 1)[0] in self.swept]
        return " ".join([*swept, model, *(o for o in self.overrides if o not in swept)])


def job_context() -> JobContext:
    if not HydraConfig.initialized():  # called from Python (tests, notebooks) without @hydra.main
        return JobContext(Path(tempfile.mkdtemp(prefix="runner-")))
    hc = HydraConfig.get()
    output_dir = own_folder(Path(hc.runtime.output_dir))
    if hc.mode != RunMode.MULTIRUN:
        return JobContext(output_dir, list(hc.overrides.task))
    return JobContext(
        output_dir,
        list(hc.overrides.task),
        sweep=hc.job.env_set.get(SWEEP_ID_KEY) or str(absolute_path(str(hc.sweep.dir))),
        sweep_parent=hc.job.env_set.get(SWEEP_PARENT_KEY),
        job_num=int(hc.job.num),
        threads=_threads_per_job(hc.launcher),
        ray_node=_ray_node(),
        swept=tuple(key for key in str(hc.job.env_set.get(SWEPT_KEY, "")).split(",") if key),
        trial=int(hc.job.env_set[TRIAL_KEY]) if TRIAL_KEY in hc.job.env_set else None,
        study=hc.job.env_set.get(STUDY_KEY),
        study_storage=hc.job.env_set.get(STORAGE_KEY),
    )


def _ray_node() -> str | None:
    """The id of the Ray node this process runs on, or None outside Ray (never imports Ray itself)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def own_folder(folder: Path) -> Path:
    """``folder`` if this run is the first to claim it, else a new folder inside it.

    Hydra names a run's folder by the second it started, so two runs started in the same
    second get the same one; checkpoints written there would then mix. The claim (an
    exclusively created ``.owner`` file) gives each run a folder nobody else writes to.
    """
    check_writable(folder, "the run's output folder", "hydra.run.dir")
    try:
        with open(folder / ".owner", "x") as owner:
            owner.write(f"{os.getpid()}\n")
        return folder
    except FileExistsError:
        own = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
        log.info("output folder %s is another run's (started in the same second): this run writes to %s", folder, own)
        return own


def _threads_per_job(launcher: DictConfig) -> int | None:
    """Cores one job may use when the launcher runs several at once, so they don't oversubscribe."""
    cores = os.cpu_count() or 1
    if "n_jobs" in launcher:  # joblib: n_jobs processes at once, -1 = one per core
        n_jobs = int(launcher.n_jobs or 1)
        return max(1, cores // (cores if n_jobs < 0 else n_jobs))
    if "ray" in launcher:  # Ray: each task reserves ray.remote.num_cpus cores on its node
        return int(launcher.ray.get("remote", {}).get("num_cpus") or 1)
    return None


def localise(run: RunConfig, job: JobContext) -> RunConfig:
    """Absolute data paths, threads shared out so parallel sweep jobs don't oversubscribe the cores,
    and progress bars only where a person watches (a terminal on stderr and stdout, never a file or pipe)."""
    run.dataset.cache_dir = str(absolute_path(run.dataset.cache_dir))
    run.trainer = dataclasses.replace(
        run.trainer,
        feature_cache_dir=str(absolute_path(run.trainer.feature_cache_dir)),
        progress=run.trainer.progress and sys.stderr.isatty() and sys.stdout.isatty(),
    )
    if run.dataset.path:
        run.dataset.path = str(absolute_path(run.dataset.path))
    if run.trainer.num_threads is None:
        run.trainer = dataclasses.replace(run.trainer, num_threads=job.threads or os.cpu_count() or 1)
    return run


