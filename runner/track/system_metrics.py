"""MLflow's own system metrics for a run (``system/cpu_utilization_percentage``, memory, disk, network, GPU).

The samples are MLflow's (:class:`mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`,
on psutil; GPU utilisation and memory where a GPU and nvidia-ml-py are present, MLflow's ``system/gpu_*``). The runner owns the monitor
instead of passing ``log_system_metrics=True`` to ``mlflow.start_run`` for one reason: MLflow's
loop publishes a sample only after a full interval and drops what it collected when the run
ends, so a run shorter than the interval would get no sample at all and every run would lose
its last seconds. :func:`stop` logs that last sample while the run is still open.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)
# MLflow says "started", "stopping", "terminated" and "skip GPU" at INFO on every run; this module says it once.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

GPU_MONITORS = ("GPUMonitor", "ROCMMonitor")  # MLflow's, for NVIDIA (nvidia-ml-py) and AMD (pyrsmi) GPUs


def start(run_id: str, tracking_uri: str, interval_s: float, resumed: bool = False) -> SystemMetricsMonitor | None:
    """Sample the machine every ``interval_s`` seconds into run ``run_id`` (steps continue on a resumed run).

    Monitoring never stops a run: a monitor that cannot start is a warning and None.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # imports psutil

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=tracking_uri
        )
    except Exception as err:  # noqa: BLE001 - psutil missing or a store error: the run goes on without them
        log.warning("system metrics are off for this run (%s: %s); pip install psutil, or set tracking.system_metrics=false",
                    type(err).__name__, err)
        return None
    monitor.start()
    sampled = ", ".join(type(m).__name__.removesuffix("Monitor").lower() for m in monitor.monitors)
    gpu = any(type(m).__name__ in GPU_MONITORS for m in monitor.monitors)
    gpu_note = "" if gpu else " (no GPU metrics: no GPU, or nvidia-ml-py not installed)"
    log.info("system metrics every %g s: %s%s", monitor.sampling_interval, sampled, gpu_note)
    return monitor


def stop(monitor: SystemMetricsMonitor | None) -> None:
    """Stop sampling and log one last sample (the samples since the last one logged, and now); call before the run ends."""
    if monitor is None:
        return
    try:
        monitor.finish()  # the sampling thread ends; what it logged is flushed
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - a failed last sample must not fail the run
        log.warning("the last system metrics sample could not be logged (%s: %s)", type(err).__name__, err)
