"""No run silently does something other than what was typed: unknown keys, keys a run ignores, generated data, one-class models."""

from __future__ import annotations

import logging
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from conftest import ROOT
from runner.app import run
from runner.config.keys import check_command_line, check_ignored
from runner.config.schema import to_run_config
from runner.errors import ConfigError
from runner.train.metrics import degenerate
from runner.train.torch_trainer import TorchModel


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+optimzer.lr=0.001", "did you mean optimizer.lr?"),  # what Hydra's own error suggests typing
        ("optimzer.lr=0.001", "did you mean optimizer.lr?"),
        ("+trainer.epoch=3", "did you mean trainer.epochs?"),
        ("++dataset.image_sise=64", "did you mean dataset.image_size?"),
        ("modle=resnet50", "did you mean model?"),
    ],
)
def test_an_unknown_key_with_or_without_plus_names_the_nearest_known_key(override, named):
    message = check_command_line(["-m", override, "optimizer.lr=0.1,0.01"])
    assert message is not None and named in message and override in message


def test_group_choices_hydra_settings_and_known_keys_pass():
    assert check_command_line(["model=resnet50", "hydra/launcher=joblib", "hydra.sweeper.n_trials=3",
                               "model.weights=null", "freeze_depth=140", "optimizer.beta1=0.8", "-m", "seed=1,2"]) is None
    assert check_command_line(["+experiment=linear", "optimizer.momentum=0.5"]) is None


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["model=resnet50", "optimizer.momentum=0.5"], "not a key of optimizer=adam, which this command composes: only optimizer=sgd take it"),
        (["model.weights=null"], "not a key of model=linear, which this command composes: only model=resnet50, model=vgg16 take it"),
    ],
)
def test_a_key_the_composed_option_lacks_is_named_with_the_options_that_take_it(arguments, named):
    message = check_command_line(arguments)  # Hydra's own answer would be "To append to your config use +key=value"
    assert message is not None and named in message
    assert check_command_line(["model=resnet50", "optimizer=sgd", "optimizer.momentum=0.5"]) is None


def test_the_typo_stops_the_command_before_anything_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "runner", "+optimzer.lr=0.001"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2 and "did you mean optimizer.lr?" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_key_of_another_group_option_added_with_plus_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="model.weights is not a key of model=linear"):
        run(make_cfg("+model.weights=imagenet"))
    with pytest.raises(ConfigError, match="optimizer.momentum is not a key of optimizer=adam"):
        run(make_cfg("optimizer=adam", "+optimizer.momentum=0.5"))


def test_a_path_given_to_the_generated_set_is_refused_and_nothing_is_written_there(make_cfg, tmp_path):
    target = tmp_path / "nope"
    with pytest.raises(ConfigError, match="dataset=image_folder dataset.path="):
        run(make_cfg(f"dataset.path={target}"))
    assert not target.exists()


@pytest.mark.parametrize(
    ("typed", "fix"),
    [
        ("trainer.fine_tune_epochs=3", "fine_tune_lr"),
        ("trainer.lr_decay=0.5", "trainer.lr_schedule=step"),
        ("trainer.min_delta=0.01", "trainer.early_stopping_patience"),
        ("trainer.feature_cache_gb=1", "model=resnet50"),
    ],
)
def test_a_key_this_run_ignores_is_refused_alone_and_a_warning_in_a_sweep(make_cfg, typed, fix, caplog):
    run_cfg = to_run_config(make_cfg(typed))
    with pytest.raises(ConfigError, match=f"{typed.split('=')[0]}: this run does not use it.*{fix}"):
        check_ignored(run_cfg, [typed])
    with caplog.at_level(logging.WARNING):
        check_ignored(run_cfg, [typed], sweep_job=True)  # the other jobs of the sweep may use it
    assert "does not use it" in caplog.text
    check_ignored(run_cfg, [])  # set by the YAML, not typed: nothing to say


def test_one_class_for_every_image_is_named_with_its_likely_cause():
    assert degenerate(np.array([[0.9, 0.1], [0.2, 0.8]]), ["Negative", "Positive"]) is None
    note = degenerate(np.array([[0.6, 0.4], [0.7, 0.3], [0.51, 0.49]]), ["Negative", "Positive"])
    assert note is not None and "'Negative' for all 3 test images" in note and "model.weights=null" in note


def test_a_run_whose_model_predicts_one_class_says_so_and_is_tagged(make_cfg, client, monkeypatch, caplog):
    def always_negative(self, images):
        return np.tile([0.8, 0.2], (len(images), 1))

    monkeypatch.setattr(TorchModel, "predict_proba", always_negative)
    with caplog.at_level(logging.INFO):
        run(make_cfg("trainer.epochs=1"))
    (finished,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert finished.info.status == "FINISHED" and finished.data.tags["degenerate"] == "one_class"
    assert finished.data.metrics["test_recall"] == 0.0
    assert "WARNING:     the model predicts 'Negative' for all" in caplog.text  # in the end-of-run summary
    assert mlflow.active_run() is None
