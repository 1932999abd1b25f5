"""Pruned Optuna sweeps: the epoch a trial is stopped at, its honest record, free-running workers, resume, failures.

The sweeper's loop runs with a stand-in launcher where only timing or failure matters (fast);
one pruned sweep of the linear model runs for real, in-process, and is then resumed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from runner.config.schema import to_run_config
from runner.errors import ConfigError
from runner.sweep.search import OptunaSearch
from runner.sweep.space import search_space
from runner.sweep.study import PRUNED_ATTR, SWEEPER
from runner.sweep.trial import trial_pruning
from runner.track.job import JobContext
from runner.train.epochs import EpochPolicy, Epochs

LINEAR_SWEEP = ["-m", "+experiment=optuna_linear", "trainer.epochs=5",
                "sweep.pruner=median", "sweep.startup_trials=1", "sweep.min_epochs=2"]


class Recorder:
    """The part of the Tracker that Epochs uses, without MLflow."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.when_finished: list = []

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_json(self, data: Any, name: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


def test_a_trial_trailing_the_others_is_pruned_at_the_first_epoch_the_pruner_may_stop_it(make_cfg, tmp_path):
    """Earlier trials reached val_accuracy 0.5 + 0.1 e at epoch e; this one stays at 0.3: stopped at sweep.min_epochs=3, not before."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for _ in range(3):
        earlier = study.ask()
        for epoch in range(1, 6):
            earlier.report(0.5 + 0.1 * epoch, epoch)
        study.tell(earlier, 1.0)
    trial = study.ask()
    run = to_run_config(make_cfg("sweep.pruner=median", "sweep.min_epochs=3", "trainer.monitor=val_accuracy", "trainer.epochs=5"))
    job = JobContext(tmp_path, trial=trial.number, study="s", study_storage=url)
    tracker = Recorder()
    epochs = Epochs(tracker, tmp_path / "last.pt", policy=EpochPolicy.of(run.trainer), pruning=trial_pruning(run, job))
    ended = [epochs.end(e, {"train_loss": 1.0, "train_accuracy": 0.3, "val_loss": 1.0, "val_accuracy": 0.3}, lambda p: p.write_bytes(b"x"))
             for e in range(1, 4)]
    assert ended == [False, False, True] and epochs.pruned == 3
    assert epochs.left("train", 5) == 0 and epochs.left("fine_tune", 5) == 0  # no epoch of any phase after it
    assert tracker.tags["pruned"] == "true" and tracker.metrics["pruned_epoch"] == 3
    stored = study.trials[trial.number]
    assert stored.intermediate_values == {1: 0.3, 2: 0.3, 3: 0.3} and stored.user_attrs[PRUNED_ATTR] == 3


def test_val_loss_is_reported_so_that_lower_is_better_in_a_maximising_study(make_cfg, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    trial = study.ask()
    run = to_run_config(make_cfg("sweep.pruner=median"))  # trainer.monitor: val_loss
    trial_pruning(run, JobContext(tmp_path, trial=trial.number, study="s", study_storage=url))(1, 0.25)
    assert study.trials[0].intermediate_values == {1: -0.25}


def test_a_pruner_outside_an_optuna_sweep_is_a_clear_error(cli):
    result = cli("sweep.pruner=median")
    assert result.returncode == 2 and "sweep.pruner=median stops the trials of an Optuna sweep" in result.stderr
    assert "Traceback" not in result.stderr
    workers = cli("-m", "+experiment=optuna_linear", "hydra.sweeper.n_trials=2", "sweep.workers=2")
    assert workers.returncode == 2 and "sweep.workers=2 runs trials side by side, in processes: add hydra/launcher=joblib" in workers.stderr
    assert "Traceback" not in workers.stderr


@pytest.mark.parametrize("override, said", [
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials: must be a whole number of at least 1"),
    ("hydra.sweeper.direction=up", "hydra.sweeper.direction: must be minimize or maximize"),
    ("sweep.storage=nosuchdb://x", "sweep.storage: the Optuna study's database nosuchdb://x cannot be opened"),
    ("sweep.pruner=median sweep.min_epochs=3", "sweep.min_epochs=3 is past the trials' last epoch (2)"),  # TINY: 2 epochs
    ("hydra.sweeper.n_trials=two", "hydra.sweeper.n_trials: must be a whole number of at least 1"),
])
def test_a_search_that_cannot_run_is_refused_before_its_parent_run_opens(cli, client, override, said):
    result = cli("-m", "+experiment=optuna_linear", *override.split())
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # no parent left FAILED or empty


def test_a_search_that_sweeps_its_epochs_is_not_refused_for_its_min_epochs(make_cfg):
    from runner.sweep.study import check_sweep

    def composed(*swept: str):  # a multirun's config: the swept keys left at their defaults (2 epochs), named in the task
        cfg = make_cfg("+experiment=optuna_linear", "sweep.pruner=median", "sweep.min_epochs=5", "hydra.sweeper.direction=MAXIMIZE",
                       return_hydra=True)
        cfg.hydra.overrides.task = ["sweep.pruner=median", "sweep.min_epochs=5", *swept]
        return cfg

    with pytest.raises(ConfigError, match="sweep.min_epochs=5 is past"):
        check_sweep(composed())
    assert check_sweep(composed("trainer.epochs=4,8")).min_epochs == 5
    assert check_sweep(composed("trainer.epochs=choice(4, 8)")).pruner == "median"


class StandIn:
    """A launcher whose jobs sleep (those numbered in ``slow``: long) and return 0.5; those in ``lost`` die with their worker."""

    def __init__(self, slow: set[int], lost: set[int]) -> None:
        self.slow, self.lost = slow, lost
        self.spans: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        returns = []
        for n, _ in enumerate(job_overrides, start=initial_job_idx):
            if n in self.lost:
                raise RuntimeError("A task has failed to un-serialize: the worker process was killed")
            start = time.monotonic()
            time.sleep(1.5 if n in self.slow else 0.05)
            with self.lock:
                self.spans[n] = (start, time.monotonic())
            ret = JobReturn()
            ret.status, ret.return_value = JobStatus.COMPLETED, 0.5
            returns.append(ret)
        return returns


def stand_in_sweep(tmp_path: Path, n_trials: int, workers: int, slow: set[int] = frozenset(), lost: set[int] = frozenset(),
                   failure_rate: float = 0.0) -> tuple[OptunaSearch, StandIn]:
    """The sweeper's own loop over a study in ``tmp_path``, its jobs run by :class:`StandIn`."""
    search = OptunaSearch(optuna.samplers.TPESampler(seed=0), "maximize", "stand-in", n_trials, 1, failure_rate, None)
    search.config = OmegaConf.create({
        "sweep": {"pruner": "none", "min_epochs": 1, "startup_trials": 1, "workers": workers,
                  "storage": f"sqlite:///{tmp_path / 'optuna.db'}"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "trainer": {"monitor": "val_loss", "epochs": 2},
        "hydra": {"sweep": {"dir": str(tmp_path)}, "job": {"env_set": {"RUNNER_SWEEP_PARENT": "parent0"}}, "overrides": {"hydra": [], "task": []},
                  "sweeper": {"_target_": SWEEPER, "n_trials": n_trials, "direction": "maximize"}, "launcher": {"_target_": "test_pruning.StandIn"}},
    })
    search.launcher = launcher = StandIn(set(slow), set(lost))
    search.sweep(["lr=interval(0.1, 1.0)"])
    return search, launcher


def test_free_running_workers_start_the_next_trial_as_soon_as_one_ends(tmp_path):
    search, launcher = stand_in_sweep(tmp_path, n_trials=6, workers=2, slow={0})
    assert [t.state.name for t in search.study.trials] == ["COMPLETE"] * 6  # n_trials in all, whatever the workers
    start, end = launcher.spans[0]
    during = [n for n, (s, e) in launcher.spans.items() if n != 0 and s >= start and e <= end]
    assert len(during) >= 3, f"the other worker waited for the slow trial: {launcher.spans}"  # no batch to wait for
    assert search.study.study_name == "stand-in-parent0"  # the sweep's own study


def test_a_lost_worker_fails_its_trial_and_a_new_trial_takes_its_place(tmp_path):
    search, launcher = stand_in_sweep(tmp_path, n_trials=4, workers=2, lost={1})
    assert [t.state.name for t in search.study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert sorted(launcher.spans) == [0, 2, 3, 4]  # 4 trials ended, as asked
    with pytest.raises(RuntimeError, match="worker process was killed"):  # a launcher that loses every job stops the sweep
        stand_in_sweep(tmp_path / "lost", n_trials=2, workers=2, lost=set(range(10)))


def test_a_resumed_study_runs_only_the_trials_left_and_fails_those_a_killed_sweep_left_running(tmp_path):
    search, _ = stand_in_sweep(tmp_path, n_trials=2, workers=1)
    search.study.ask()  # a trial whose sweep was killed: RUNNING for ever
    again, launcher = stand_in_sweep(tmp_path, n_trials=5, workers=2)
    assert [t.state.name for t in again.study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert len(launcher.spans) == 3


@pytest.mark.long
@pytest.mark.slow
def test_a_pruned_sweep_records_pruned_trials_honestly_and_resumes_without_rerunning_them(cli, store, tmp_path):
    result = cli(*LINEAR_SWEEP, "hydra.sweeper.n_trials=4")
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "sweep_parent"]
    jobs = [r for r in runs if r is not parent]
    study_url = f"sqlite:///{Path(store['uri'].removeprefix('sqlite:///')).parent / 'optuna.db'}"  # beside the tracking store
    (study,) = [s for s in optuna.get_all_study_summaries(study_url) if s.study_name == f"linear-search-{parent.info.run_id}"]
    trials = optuna.load_study(study_name=study.study_name, storage=study_url).trials
    assert len(trials) == len(jobs) == 4
    pruned = [j for j in jobs if j.data.tags.get("pruned") == "true"]
    assert pruned, "no trial was pruned"
    for job in jobs:
        assert job.info.status == "FINISHED" and "test_accuracy" in job.data.metrics  # a pruned run is tested and logged too
        epochs = len(client.get_metric_history(job.info.run_id, "val_loss"))
        if job in pruned:
            assert job.data.metrics["pruned_epoch"] == epochs and 2 <= epochs < 5  # never before sweep.min_epochs
        else:
            assert epochs == 5 and "pruned_epoch" not in job.data.metrics
    assert sorted(t.state.name for t in trials) == sorted("PRUNED" if j in pruned else "COMPLETE" for j in jobs)
    assert "pruned@" in result.stdout  # the sweep's closing table marks them

    again = cli(*LINEAR_SWEEP, "hydra.sweeper.n_trials=6", f"resume={parent.info.run_id}")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name=study.study_name, storage=study_url).trials
    runs = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert len(trials) == 6 and len([r for r in runs if r.info.run_id != parent.info.run_id]) == 6  # 2 new trials, none rerun
    assert {r.info.run_id for r in runs} >= {j.info.run_id for j in jobs}
    assert "4 ended before" in again.stderr


def test_hydras_sweep_grammar_becomes_optunas_distributions():
    space, fixed = search_space(["lr=tag(log, interval(1e-3, 3.0))", "bs=choice(16, 32)", "wd=1,2", "n=range(16, 129, 16)",
                                 "k=int(interval(1, 5))", "model=linear", "+x=2"])
    assert space == {"lr": optuna.distributions.FloatDistribution(1e-3, 3.0, log=True),
                     "bs": optuna.distributions.CategoricalDistribution([16, 32]),
                     "wd": optuna.distributions.CategoricalDistribution([1, 2]),
                     "n": optuna.distributions.IntDistribution(16, 128, step=16),
                     "k": optuna.distributions.IntDistribution(1, 5)}
    assert fixed == ["model=linear", "+x=2"]
    with pytest.raises(ConfigError, match="empty range"):
        search_space(["n=range(5, 1)"])


def test_hydras_own_optuna_sweeper_installed_beside_ours_is_named_with_the_fix(tmp_path, monkeypatch):
    from runner.report.console import missing_plugin

    assert missing_plugin(["-m", "+experiment=optuna_linear"]) is None
    (tmp_path / "hydra_plugins" / "hydra_optuna_sweeper").mkdir(parents=True)
    (tmp_path / "hydra_plugins" / "hydra_optuna_sweeper" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "pip uninstall hydra-optuna-sweeper" in missing_plugin(["-m", "+experiment=optuna_linear"])
    assert missing_plugin(["-m", "optimizer.lr=0.1,0.01"]) is None  # a sweep without Optuna does not care
