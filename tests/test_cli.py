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


def test_a_linear_run_never_imports_tensorflow(store, data_cache, tmp_path):
    """Only the trainer of the run's framework is imported (also nothing of it for --help)."""
    import subprocess
    import sys

    from conftest import CONF, TINY

    overrides = [*TINY, f"tracking.uri={store['uri']}", f"dataset.cache_dir={data_cache}", f"tracking.artifact_root={tmp_path / 'a'}"]
    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from runner.config.schema import register_schemas\n"
        "from runner.app import run\n"
        "register_schemas()\n"
        f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
        f"    cfg = compose('config', overrides={overrides!r})\n"
        "run(cfg)\n"
        "leaked = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not leaked, leaked\n"
        "print('ok', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok True"
    # --help imports no framework; the commands that load a logged model split no data: scikit-learn's
    # second of imports is not theirs to pay (one interpreter for both: --help imports neither).
    shown = subprocess.run(
        [sys.executable, "-c", "import sys, runpy; sys.argv=['runner','--help']\n"
         "try:\n    runpy.run_module('runner', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "help = sorted(m for m in ('torch', 'tensorflow', 'keras', 'mlflow', 'sklearn') if m in sys.modules)\n"
         "import runner.predict, runner.inspect, runner.export\n"
         "sys.__stdout__.write(f'{help} {\"sklearn\" in sys.modules}\\n')"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert shown.stdout.strip().splitlines()[-1] == "[] False", shown.stdout[-2000:] + shown.stderr[-2000:]
