"""The Keras stream on real ResNet50 / VGG16 models: random init (model.weights=null), 32 px, a few dozen images."""

from __future__ import annotations

import textwrap
from pathlib import Path

from runner.train import keras_trainer  # noqa: I001  (first: it puts Keras on TensorFlow before keras is imported)
import keras
import mlflow
import numpy as np
import pytest
from test_explain import logged_pictures
from test_export import artifacts

import forked
from crack_runner import datasets
from crack_runner.models.errors import ModelError
from crack_runner.models.keras_backbones import BACKBONES, build, freeze, frozen_layer_count, load_base
from runner.app import run
from runner.config.schema import to_run_config
from runner.deploy import onnx_export
from runner.errors import TrainingError
from runner.track.safe_load import UnreadableCheckpoint
from runner.train.epochs import Epochs
from services import disk_bytes, run_in_process, runner_env

SHAPE = (32, 32, 3)
RESNET50_LAYERS = 175


@pytest.fixture(scope="module")
def resnet_base() -> keras.Model:
    return load_base("resnet50", None, SHAPE)


def only_run(client: mlflow.MlflowClient):
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    return found


@pytest.mark.parametrize("freeze_depth, frozen", [(0, 0), (1, 1), (140, 140), (RESNET50_LAYERS, RESNET50_LAYERS), (None, RESNET50_LAYERS)])
def test_freeze_depth_freezes_the_first_base_layers_and_no_others(resnet_base, freeze_depth, frozen):
    freeze(resnet_base, frozen_layer_count(resnet_base, freeze_depth))
    batch_norm = [isinstance(layer, keras.layers.BatchNormalization) for layer in resnet_base.layers]
    expected = [index >= frozen and not bn for index, bn in enumerate(batch_norm)]  # BN: frozen, in inference mode
    assert [layer.trainable for layer in resnet_base.layers] == expected
    assert len(expected) == RESNET50_LAYERS and sum(batch_norm) == 53
    assert (len(resnet_base.trainable_weights) > 0) == (frozen < RESNET50_LAYERS)


@pytest.mark.parametrize("freeze_depth", [RESNET50_LAYERS + 1, 1000])
def test_freeze_depth_out_of_range_gives_the_valid_range_and_layer_count(resnet_base, freeze_depth):
    with pytest.raises(ModelError) as err:
        frozen_layer_count(resnet_base, freeze_depth)
    message = str(err.value)
    assert message.startswith("freeze_depth:") and f"got {freeze_depth}" in message
    assert f"0..{RESNET50_LAYERS}" in message and f"{RESNET50_LAYERS} layers" in message


def test_freeze_depth_out_of_range_fails_before_any_training(make_cfg, client):
    with pytest.raises(ModelError, match=r"0\.\.19"):
        run(make_cfg("model=vgg16", "model.weights=null", "freeze_depth=20", "fine_tune_lr=1e-4"))
    found = only_run(client)
    assert found.info.status == "FAILED" and "val_accuracy" not in found.data.metrics


@pytest.mark.parametrize(
    "overrides, phases",
    [
        (["freeze_depth=140"], [("train", 140, 0.01)]),
        ([], [("train", RESNET50_LAYERS, 0.01)]),
        (["freeze_depth=140", "fine_tune_lr=1e-5"], [("head", RESNET50_LAYERS, 0.01), ("fine_tune", 140, 1e-5)]),
        (["fine_tune_lr=1e-5"], [("head", RESNET50_LAYERS, 0.01), ("fine_tune", 0, 1e-5)]),  # null: unfreeze it all
    ],
)
def test_phases_follow_freeze_depth_and_fine_tune_lr(make_cfg, resnet_base, overrides, phases):
    run_cfg = to_run_config(make_cfg("model=resnet50", "model.weights=null", "optimizer.lr=0.01", *overrides))
    assert [(p.name, p.freeze_depth, p.lr) for p in keras_trainer.plan(run_cfg, resnet_base)] == phases


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_the_model_applies_the_backbones_own_preprocess_input(name):
    model, _ = build(name, None, SHAPE, 2)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, *SHAPE)).astype(np.float32)
    inside = keras.Model(model.input, model.get_layer("preprocess_input").output).predict(pixels, verbose=0)
    np.testing.assert_allclose(inside, BACKBONES[name].preprocess_input(pixels.copy()), atol=1e-4)


def small_classifier(optimizer: keras.optimizers.Optimizer) -> keras.Model:
    """A few Dense weights and a dropout layer (a random state): what a checkpoint holds, in a model built at once."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_a_checkpoint_restores_weights_optimizer_and_random_states_and_refuses_an_optimizer_that_does_not_fit(tmp_path):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1)
    trained = small_classifier(keras.optimizers.Adam(0.01))
    trained.fit(rng.normal(size=(16, 4)), rng.integers(0, 2, 16), epochs=2, verbose=0)
    path = tmp_path / keras_trainer.CHECKPOINT
    keras_trainer.save_checkpoint(path, trained, epoch=2, phase="train")

    keras.utils.set_random_seed(2)  # other initial weights and random states
    fresh = small_classifier(keras.optimizers.Adam(0.01))
    keras_trainer.restore_checkpoint(path, fresh, optimizer=True)
    for name, restored, saved in (("weights", fresh.weights, trained.weights), ("optimizer", fresh.optimizer.variables, trained.optimizer.variables),
                                  ("random states", keras_trainer.rng_states(fresh), keras_trainer.rng_states(trained))):
        assert len(restored) == len(saved) > 0, name
        for mine, theirs in zip(restored, saved):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs), err_msg=name)

    other = small_classifier(keras.optimizers.SGD(0.01, momentum=0.9))  # another optimizer's state: Keras would skip it with a warning
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"), pytest.raises(UnreadableCheckpoint, match="no optimizer state"):
        keras_trainer.restore_checkpoint(path, other, optimizer=True)
    keras_trainer.restore_checkpoint(path, other, optimizer=False)  # a phase that starts anew: the weights only
    for mine, theirs in zip(other.weights, trained.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs))
    assert not list(tmp_path.glob(".restore-*"))  # the weights' copy beside the checkpoint is gone


@pytest.mark.parametrize("file, reason", [("missing.h5", "no weights file"), ("vgg16.weights.h5", "does not hold"), ("junk.h5", "does not hold")])
def test_weights_file_that_is_missing_or_does_not_fit_is_a_config_error(tmp_path, file, reason):
    load_base("vgg16", None, SHAPE).save_weights(tmp_path / "vgg16.weights.h5")
    (tmp_path / "junk.h5").write_text("not a weights file")
    with pytest.raises(ModelError) as err:
        load_base("resnet50", str(tmp_path / file), SHAPE)
    message = str(err.value)
    assert message.startswith("model.weights:") and file in message and reason in message
    assert "model.weights=null" in message and "Traceback" not in message


@pytest.mark.slow
def test_fine_tune_lr_trains_the_head_then_the_unfrozen_layers_in_one_run(make_cfg, client, monkeypatch, traces):
    fits: list[tuple[float, int, int]] = []
    epochs: list[tuple[int, str]] = []
    keras_fit, end_epoch = keras.Model.fit, Epochs.end

    def spy_fit(model, *args, **kwargs):
        fits.append((float(model.optimizer.learning_rate), len(model.trainable_weights), kwargs["initial_epoch"]))
        return keras_fit(model, *args, **kwargs)

    def spy_end(self, step, metrics, save, phase="train", lr_key="optimizer.lr"):
        epochs.append((step, phase))
        return end_epoch(self, step, metrics, save, phase, lr_key)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    monkeypatch.setattr(Epochs, "end", spy_end)
    run(make_cfg("model=vgg16", "model.weights=null", "freeze_depth=15", "optimizer.lr=0.01",
                 "fine_tune_lr=0.001", "trainer.epochs=1", "trainer.fine_tune_epochs=1"))

    (head_lr, head_weights, head_start), (tune_lr, tune_weights, tune_start) = fits
    assert (head_lr, head_start) == pytest.approx((0.01, 0)) and (tune_lr, tune_start) == pytest.approx((0.001, 1))
    assert head_weights == 4 and tune_weights == 4 + 6  # hidden and softmax Dense; then block5's 3 convolutions too
    assert epochs == [(1, "head"), (2, "fine_tune")]
    assert traces == ["trainable_part"] * 2  # once per phase: what the first step would make was made before it (keras_fit)
    found = only_run(client)
    assert found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_accuracy")] == [1, 2]
    params = {k: v for k, v in found.data.params.items() if k.startswith("phase")}
    assert params["phase1.name"] == "head" and params["phase1.freeze_depth"] == "19"
    assert params["phase2.name"] == "fine_tune" and params["phase2.freeze_depth"] == "15"
    trainable = [int(params[f"phase{n}.trainable_params"]) for n in (1, 2)]
    frozen = [int(params[f"phase{n}.frozen_params"]) for n in (1, 2)]
    assert trainable[0] < trainable[1] and trainable[0] + frozen[0] == trainable[1] + frozen[1]


@pytest.mark.long
@pytest.mark.slow
def test_command_line_resnet50_run_in_a_pipe_is_quiet_tracked_like_linear_and_never_imports_torch(cli, client, store, tmp_path, monkeypatch):
    """One ResNet50 run from a weights file, in a process: what it imports and prints, what it logs, which layers trained."""
    keras.utils.set_random_seed(7)  # weights unlike the run's own random init (seed 42)
    start = load_base("resnet50", None, SHAPE)
    weights = tmp_path / "resnet50_notop.weights.h5"
    start.save_weights(weights)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the run lists every module it imports on stderr
    # A process: TensorFlow's native libraries write to its stderr. Progress asked for, but not a terminal.
    result = cli("model=resnet50", f"model.weights={weights}", "freeze_depth=150", "trainer.progress=true", "tracking.pictures=true",
                 process="fresh")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    logs = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert result.returncode == 0, logs[-3000:]
    assert {"tensorflow", "keras"} <= imported
    assert not [name for name in imported if name.split(".")[0] == "torch"]
    for noise in NOISE:
        assert noise not in logs and noise not in result.stdout, noise
    assert "MLflow run:" in result.stdout and "test_accuracy" in result.stdout
    assert "MLflow run:" not in logs and "epoch 1" in logs  # results on stdout, logs on stderr

    found = only_run(client)
    assert found.info.status == "FINISHED" and found.info.run_id in result.stdout + result.stderr
    params = found.data.params
    assert params["framework"] == "keras" and params["model.name"] == "resnet50" and params["freeze_depth"] == "150"
    assert params["tensorflow_version"] == keras_trainer.tf.__version__ and params["keras_version"] == keras.__version__
    assert params["phase1.name"] == "train" and params["phase1.freeze_depth"] == "150" and "phase2.name" not in params
    assert int(params["phase1.trainable_params"]) > 0 and int(params["phase1.frozen_params"]) > 0
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(found.info.run_id, key)] == [1, 2]
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "val_accuracy"):
        assert 0.0 <= found.data.metrics[key] <= 1.0
    names = {a.path for d in ("config", "checkpoints", "plots") for a in client.list_artifacts(found.info.run_id, d)}
    assert {"config/config.yaml", "config/overrides.yaml", "plots/learning_curves.png", "plots/confusion_matrix.png"} <= names
    logged_pictures(client, "keras")  # precision-recall, calibration and Grad-CAM, no linear weights (tests/test_explain.py)
    info = mlflow.models.get_model_info(f"runs:/{found.info.run_id}/model")
    assert "tensorflow" in info.flavors and info.signature.inputs.inputs[0].shape == (-1, 32, 32, 3)
    # FINISHED: the checkpoints (weights and optimizer state, for a resume) are gone; the logged model holds
    # the weights alone, and the whole run takes at most 1.2x their float32 size.
    assert not any(name.startswith("checkpoints/") for name in names)
    assert not list((tmp_path / "outputs").rglob("*.keras"))
    size = 4 * (int(params["phase1.trainable_params"]) + int(params["phase1.frozen_params"]))
    assert disk_bytes(Path(store["artifacts"]), tmp_path / "outputs") <= 1.2 * size

    # The logged model's base: the first 150 layers and every BatchNormalization (statistics too) as loaded, the others trained.
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{found.info.run_id}/model")) / "data" / "model.keras"
    trained = keras.saving.load_model(logged).get_layer("resnet50")
    for index, (before, after) in enumerate(zip(start.layers, trained.layers)):
        unchanged = [np.array_equal(b, a) for b, a in zip(before.get_weights(), after.get_weights())]
        if index < 150 or isinstance(before, keras.layers.BatchNormalization):
            assert all(unchanged), f"frozen layer {index} {before.name} changed"
        elif before.weights:
            assert not all(unchanged), f"unfrozen layer {index} {before.name} did not train"


# What TensorFlow's native libraries and progress bars would put in a log read from a pipe.
NOISE = ("E0000", "I0000", "W0000", "absl::InitializeLog", "oneDNN", "\r", "\x1b[")


# Run in a process that never trained (forked before the project is imported), outside the project: loading must not need any of its code.
LOAD_AND_PREDICT = textwrap.dedent(
    """
    import sys
    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
    project = [name for name in sys.modules if name.split(".")[0] in ("runner", "models", "datasets")]
    assert not project, project
    """
)


@pytest.mark.long
@pytest.mark.slow
def test_a_vgg16_runs_logged_model_predicts_in_a_process_of_its_own_and_exports(make_cfg, client, store, tmp_path):
    """One tiny VGG16 run (a Keras run takes seconds to build and trace) checked two ways. (The same run on memory-mapped
    pixels: tests/test_reliability.py, whose VGG16 reference run reads them so.)"""
    overrides = ("model=vgg16", "model.weights=null", "seed=5", "objective=val_loss")
    cfg = make_cfg(*overrides)
    run(cfg)
    found = only_run(client)
    assert found.info.status == "FINISHED" and found.data.params["model.name"] == "vgg16"

    # The logged model loads and predicts in a process of its own, outside the project.
    run_cfg = to_run_config(cfg)
    test = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False).test
    np.save(tmp_path / "images.npy", test.images.astype(np.float32))
    loaded = forked.run_code(LOAD_AND_PREDICT, [f"runs:/{found.info.run_id}/model", "images.npy", "probs.npy"], tmp_path,
                             runner_env(store["uri"]), timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(test), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == test.labels).mean() == pytest.approx(found.data.metrics["test_accuracy"])

    # runner.export makes its ONNX file through Keras' own export, kept because it matches the native model.
    done = run_in_process([found.info.run_id], tmp_path, runner_env(store["uri"]), "runner.export")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "onnx kept: matches the native model" in done.stdout
    assert artifacts(client, found.info.run_id) == {"onnx/float32"}
    assert client.get_run(found.info.run_id).data.metrics["onnx_max_abs_diff"] <= onnx_export.TOLERANCE


@pytest.mark.slow
def test_diverging_training_ends_failed_with_a_clear_error(make_cfg, client):
    with pytest.raises(TrainingError, match="lower optimizer.lr"):
        run(make_cfg("model=vgg16", "model.weights=null", "optimizer.lr=1e38"))
    assert only_run(client).info.status == "FAILED"


@pytest.mark.slow
def test_imagenet_weights_without_a_network_is_one_clear_message_before_any_run_opens(cli, client, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no cached weights,
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # and no way out: the download fails at once
    result = cli("model=vgg16")  # weights: imagenet, the default
    assert result.returncode == 2
    assert "model.weights=imagenet" in result.stderr and "could not be downloaded" in result.stderr
    assert "model.weights=null" in result.stderr and "Traceback" not in result.stderr
    experiment = client.get_experiment_by_name("crack-classification")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []  # no FAILED run left in the UI
