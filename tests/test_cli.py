"""The command line, as a user runs it."""

from __future__ import annotations

import mlflow


def test_default_command_trains_and_prints_a_summary(cli, store):
    result = cli()
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "test_accuracy" in out and "MLflow run:" in out
    assert f"mlflow ui --backend-store-uri {store['uri']}" in out
    runs = mlflow.MlflowClient(store["uri"]).search_runs(
        [mlflow.MlflowClient(store["uri"]).get_experiment_by_name("crack-classification").experiment_id]
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id in out
    assert runs[0].data.params["dataset.image_size"] == "32"


def test_help_lists_the_groups(cli):
    result = cli("--help", tiny=False)
    assert result.returncode == 0
    assert "dataset: concrete_cracks, image_folder, synthetic_cracks" in result.stdout
    assert "optimizer: adam, sgd" in result.stdout


def test_typo_is_reported_without_running(cli):
    result = cli("optimizer.lrr=0.1")
    assert result.returncode == 2
    assert "optimizer.lrr is not a key of this runner (did you mean optimizer.lr?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_keras_key_with_linear_is_one_clear_message(cli):
    result = cli("freeze_depth=140")
    assert result.returncode == 2
    assert "freeze_depth: only applies to Keras" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_path_names_the_path(cli, tmp_path):
    result = cli("dataset=image_folder", f"dataset.path={tmp_path / 'nowhere'}", tiny=False)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
