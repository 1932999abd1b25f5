"""Frozen features: training on the stored output of the frozen layers equals training through them.

Tiny ResNet50 runs (random init, 32 px, a few dozen images; VGG16, which builds faster, where the
backbone does not matter) with ``trainer.cache_frozen_features`` on and off, from the same seed: the
same predictions and epoch metrics within float tolerance. The store's keys and eviction on a tiny
model. (A run that finds every output in the store computes none and gets the same results: the
ResNet50 resume test in tests/test_reliability.py, whose uninterrupted run reads what the others stored.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.train import keras_trainer  # noqa: I001  (first: it puts Keras on TensorFlow before keras is imported)
import keras
import numpy as np
import pytest

from crack_runner import datasets
from crack_runner.models.keras_backbones import build, freeze, frozen_layer_count
from runner.config.schema import to_run_config
from runner.train.epochs import EpochPolicy, Epochs
from runner.train.frozen import store as feature_store
from runner.train.frozen import tfdata
from runner.train.frozen.cut import cut_after_frozen
from runner.train.frozen.store import FeatureStore
from runner.train.seeding import seed_everything

SHAPE = (32, 32, 3)


class RecordingTracker:
    """The part of runner.track.tracking.Tracker the trainer uses, without MLflow."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []  # the trained model's, set by train()
        self.artifacts: list[str] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_json(self, data: Any, name: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(f"{artifact_path}/{Path(path).name}")

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


def train(make_cfg, folder: Path, cache: bool, *overrides: str, model: str = "resnet50"):
    """One Keras fit as the runner does it; the test images' probabilities, the tracker and the trained model."""
    run_cfg = to_run_config(
        make_cfg(f"model={model}", "model.weights=null", f"trainer.cache_frozen_features={cache}", f"trainer.feature_cache_dir={folder.parent / 'store'}", *overrides)
    )
    seed_everything(run_cfg.seed, keras_trainer)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)
    tracker = RecordingTracker()
    epochs = Epochs(tracker, folder / "checkpoints" / keras_trainer.CHECKPOINT, policy=EpochPolicy.of(run_cfg.trainer))
    trained = keras_trainer.fit(run_cfg, data, tracker, epochs)
    tracker.history = trained.history
    return trained.predict_proba(data.test.images), tracker, trained.model


@pytest.mark.long
@pytest.mark.slow
def test_training_on_cached_frozen_features_equals_training_through_the_frozen_layers(make_cfg, tmp_path, monkeypatch):
    # Phase 1 (2 epochs): the head on the whole frozen base, cached as pooled vectors. Phase 2:
    # freeze_depth=140 ends inside conv4's block 6, whose BN/add/relu hold no trainable weight, so
    # the cut is its output. Epoch orders continue across epochs and phases in both runs.
    # SGD, not the model's default Adam: Adam's normalised steps blow float rounding up into visible differences.
    # float32 storage: as the layers compute it (float16, the default, is compared with it below).
    overrides = ["optimizer=sgd", "optimizer.lr=0.01", "freeze_depth=140", "fine_tune_lr=0.001", "trainer.epochs=2", "trainer.fine_tune_epochs=1",
                 "trainer.select=last", "trainer.feature_cache_dtype=float32"]
    cuts = ["pool", "conv4_block6_out"]
    monkeypatch.setattr(tfdata, "IN_MEMORY", 64 * 2**10)  # images and feature maps: read from NumPy per batch
    fitted: list[str] = []
    keras_fit = keras.Model.fit

    def spy_fit(model, *args, **kwargs):
        fitted.append(model.name)
        return keras_fit(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    passes: list[tuple[str, tuple[int, ...]]] = []  # (split, input shape) of each pass of frozen layers
    compute = feature_store.compute

    def spy_compute(step, images, *args):
        passes.append((args[2], images.shape[1:]))
        return compute(step, images, *args)

    monkeypatch.setattr(feature_store, "compute", spy_compute)
    cached, cached_tracker, cached_model = train(make_cfg, tmp_path / "cached", True, *overrides)
    assert fitted == ["trainable_part"] * len(cuts)
    # The layers up to the fine-tune cut ran once per image for both phases: on each split's
    # pixels once, and phase 1's pooled vectors came from their output through the rest of the base.
    assert [name for name, shape in passes if shape == SHAPE] == ["frozen layers: train", "frozen layers: val", "frozen layers: predict"]
    assert [name for name, shape in passes if shape != SHAPE] == ["frozen layers: train", "frozen layers: val"]
    fitted.clear()
    through, through_tracker, _ = train(make_cfg, tmp_path / "through", False, *overrides)
    assert fitted == ["resnet50_classifier"] * len(cuts)

    assert [cached_tracker.params[f"phase{n}.cached_up_to"] for n in range(1, len(cuts) + 1)] == cuts
    assert through_tracker.params["phase1.cached_up_to"] == "none"
    np.testing.assert_allclose(cached, through, rtol=1e-4, atol=1e-5)
    assert [h["phase"] for h in cached_tracker.history] == ["head", "head", "fine_tune"]
    assert len(cached_tracker.history) == len(through_tracker.history)
    for mine, theirs in zip(cached_tracker.history, through_tracker.history):
        assert mine.pop("phase") == theirs.pop("phase")
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    assert cached_tracker.history[0]["train_loss"] != cached_tracker.history[-1]["train_loss"]  # it trained

    # The checkpoint holds the whole classifier with the trained weights; the cache is gone.
    assert "checkpoints/last.keras" in cached_tracker.artifacts
    checkpoint = keras.saving.load_model(tmp_path / "cached" / "checkpoints" / "last.keras")
    assert checkpoint.name == "resnet50_classifier" and int(checkpoint.optimizer.iterations) > 0
    for saved, trained in zip(checkpoint.weights, cached_model.weights):
        np.testing.assert_array_equal(saved.numpy(), trained.numpy())

    # The store kept, per frozen part, the train and val outputs, and the last phase's the test images'.
    store = tmp_path / "store"
    assert sorted(len(list(folder.glob("*.npy"))) for folder in store.iterdir()) == [2, 3]
    assert not list(store.glob("*/*.partial.npy"))


@pytest.mark.slow
def test_float16_storage_halves_the_store_and_trains_to_the_same_test_accuracy(make_cfg, tmp_path):
    # The head on the whole frozen base's stored pooled vectors. Here the trained model's probabilities
    # differ by the rounding alone; training conv5 too (freeze_depth=140) from random weights amplifies
    # any rounding over the epochs, float16's or another thread count's (experiments.md compares
    # float16 and float32 storage on the embedded set at 227 px there).
    # VGG16: the storage is the model's, not the backbone's, and VGG16 builds and traces in a fraction of ResNet50's time.
    overrides = ["freeze_depth=null", "dataset.samples_per_class=48", "dataset.image_size=64", "trainer.epochs=3"]
    results = {}
    for dtype in ("float32", "float16"):
        probs, tracker, _ = train(make_cfg, tmp_path / dtype, True, *overrides, f"trainer.feature_cache_dtype={dtype}", model="vgg16")
        assert tracker.params["phase1.cached_up_to"] == "pool"
        results[dtype] = probs
    run_cfg = to_run_config(make_cfg("model=vgg16", "model.weights=null", *overrides))
    labels = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False).test.labels
    accuracy = {dtype: float((probs.argmax(1) == labels).mean()) for dtype, probs in results.items()}
    assert abs(accuracy["float16"] - accuracy["float32"]) <= 0.002, accuracy
    np.testing.assert_allclose(results["float16"], results["float32"], atol=1e-3)
    sizes = {dtype: sum(p.stat().st_size for p in (tmp_path / "store").glob(f"*/*-{dtype}-*.npy")) for dtype in results}
    assert 0.49 < sizes["float16"] / sizes["float32"] < 0.51, sizes


def test_a_store_too_small_for_the_run_is_said_at_the_start_and_it_trains_through_the_layers(make_cfg, tmp_path, caplog):
    # VGG16: the check is the model's, not the backbone's, and VGG16 builds and traces in a fraction of ResNet50's time.
    probs, tracker, _ = train(make_cfg, tmp_path / "run", True, "freeze_depth=15", "trainer.epochs=1", "trainer.feature_cache_gb=0.0001", model="vgg16")
    said = [r.getMessage() for r in caplog.records if "frozen features" in r.getMessage()]
    assert len(said) == 1 and "set trainer.feature_cache_gb=1 or more" in said[0] and "GB" in said[0], said
    assert tracker.params["frozen_features"] == "through the layers: the store cannot hold them"
    assert tracker.params["phase1.cached_up_to"] == "none" and probs.shape[1] == 2
    assert not list((tmp_path / "store").glob("*/*.npy"))


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 3))
    return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs)))


def test_the_store_keys_entries_by_weights_and_pixels_and_evicts_the_least_recently_used(tmp_path, caplog):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    first, second = tiny_model(0), tiny_model(1)
    assert feature_store.layers_key(first) == feature_store.layers_key(tiny_model(0))  # names aside, the same layers
    assert feature_store.layers_key(first) != feature_store.layers_key(second)

    entry_bytes = 10 * 5 * 4 + 128  # float32 rows and the .npy header
    store = FeatureStore(tmp_path, max_gb=2.5 * entry_bytes / 1e9, batch_size=4, progress=False, dtype="float32")
    out = store.features(first, images, "a")
    np.testing.assert_allclose(out, first.predict(images.astype(np.float32), verbose=0), rtol=1e-6)
    assert store.features(first, images.copy(), "a again") is not None and len(list(tmp_path.glob("*/*.npy"))) == 1
    store.features(first, images[::-1].copy(), "b")  # other pixels: a new entry
    assert len(list(tmp_path.glob("*/*.npy"))) == 2

    # A later run (a new store object) with other weights: over the limit, the oldest entry goes.
    later = FeatureStore(tmp_path, max_gb=2.5 * entry_bytes / 1e9, batch_size=4, progress=False, dtype="float32")
    oldest = min(tmp_path.glob("*/*.npy"), key=lambda p: p.stat().st_mtime)
    with caplog.at_level("INFO"):
        later.features(second, images, "c")
    assert not oldest.exists() and len(list(tmp_path.glob("*/*.npy"))) == 2
    assert "least recently used" in caplog.text


def test_a_store_without_room_on_disk_falls_back_to_the_layers(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(feature_store, "DISK_RESERVE", 2**62)
    store = FeatureStore(tmp_path, max_gb=1, batch_size=4, progress=False)
    with caplog.at_level("WARNING"):
        assert store.features(tiny_model(0), np.zeros((3, 4, 4, 3), np.uint8), "train") is None
    assert "would not fit" in caplog.text and "trainer.feature_cache_dir" in caplog.text
    assert not list(tmp_path.glob("*/*.npy"))


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[keras.Model, keras.Model]]:
    """Random-init models whose BatchNormalization layers hold statistics, scales and offsets unlike their init."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    built = {name: build(name, None, SHAPE, 2) for name in ("resnet50", "vgg16")}
    for layer in built["resnet50"][1].layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = (w.shape for w in layer.get_weights())
            layer.set_weights([rng.uniform(0.5, 1.5, gamma), rng.normal(0, 0.1, beta), rng.normal(0, 0.1, mean), rng.uniform(0.5, 2, variance)])
    return built


@pytest.mark.parametrize(
    "name, freeze_depth, cut",
    [
        ("resnet50", None, "pool"),
        ("resnet50", 175, "pool"),
        ("resnet50", 140, "conv4_block6_out"),
        ("resnet50", 150, "conv4_block6_out"),  # 143-149 (conv5_block1's first convs) frozen, yet after the last clean cut
        ("resnet50", 10, "pool1_pool"),
        ("resnet50", 1, None),  # nothing with weights before the first trainable layer
        ("resnet50", 0, None),
        ("vgg16", 15, "block4_pool"),
    ],
)
def test_the_split_is_the_model_cut_at_the_last_clean_boundary_of_its_frozen_part(models, name, freeze_depth, cut):
    model, base = models[name]
    freeze(base, frozen_layer_count(base, freeze_depth))
    split = cut_after_frozen(model, base)
    if cut is None:
        assert split is None
        return
    assert split.cut == cut
    assert not split.prefix.trainable_weights
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in split.prefix.layers[-1 if cut != "pool" else -2].layers)
    assert [id(w) for w in split.rest.trainable_weights] == [id(w) for w in model.trainable_weights]
    pixels = np.random.default_rng(0).uniform(0, 255, (3, *SHAPE)).astype(np.float32)
    features = split.prefix(pixels, training=False)
    np.testing.assert_allclose(split.rest(features, training=False).numpy(), model(pixels, training=False).numpy(), rtol=1e-4, atol=1e-6)
    # The frozen part is an inference copy with BatchNormalization folded into the convolutions: the same values.
    if cut == "pool":
        expected = keras.Model(model.inputs[0], model.get_layer("pool").output)(pixels, training=False).numpy()
    else:
        expected = keras.Model(base.inputs[0], base.get_layer(cut).output)(model.get_layer("preprocess_input")(pixels)).numpy()
    np.testing.assert_allclose(features.numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.long
@pytest.mark.slow
def test_bf16_mixed_precision_trains_on_its_own_stored_features_as_through_the_layers(make_cfg, tmp_path):
    # bfloat16 compute: other frozen outputs, so an entry of their own, within bfloat16 rounding
    # of the float32 ones; training on them as through the layers, up to that rounding. (A
    # small lr: a random-init base at 32 px gives huge features, and at lr=0.01 rounding alone
    # sends two runs apart.)
    overrides = ["optimizer=sgd", "optimizer.lr=0.0001", "trainer.epochs=2", "trainer.precision=bf16-mixed", "trainer.select=last"]
    cached, cached_tracker, model = train(make_cfg, tmp_path / "cached", True, *overrides)
    assert model.get_layer("head_hidden").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"  # the softmax stays float32
    assert keras.config.dtype_policy().name == "float32"  # the policy was for this model only
    through, through_tracker, _ = train(make_cfg, tmp_path / "through", False, *overrides)
    np.testing.assert_allclose(cached, through, atol=0.01)
    for mine, theirs in zip(cached_tracker.history, through_tracker.history):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.02)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=0.02)

    pixels = np.random.default_rng(0).uniform(0, 255, (4, *SHAPE)).astype(np.float32)
    outputs, keys = [], []
    for policy in ("float32", "mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        classifier, base = build("resnet50", None, SHAPE, 2, policy=policy)
        freeze(base, len(base.layers))
        frozen = cut_after_frozen(classifier, base).prefix
        outputs.append(feature_store.inference_step(frozen)(pixels).numpy())
        keys.append(feature_store.layers_key(frozen))
    assert keys[0] != keys[1]
    assert outputs[1].dtype == np.float32 and not np.array_equal(*outputs)
    assert np.linalg.norm(outputs[1] - outputs[0]) / np.linalg.norm(outputs[0]) < 0.01  # measured 0.003 at 227 px


def test_epoch_orders_depend_on_the_seed_and_the_epoch_alone():
    # What a resumed run needs to read its epochs in the order of a run never stopped: the
    # batches of epochs 3..4 are those that epochs 1..4 have after their first two epochs.
    def rows(epochs: range) -> list[list[int]]:
        return [batch.tolist() for batch in tfdata.batch_rows(10, 4, 7, epochs).as_numpy_iterator()]

    whole = rows(range(1, 5))
    assert len(whole) == 4 * 3 and [len(b) for b in whole[:3]] == [4, 4, 2]  # each epoch's batches end with the epoch
    assert rows(range(3, 5)) == whole[6:]
    assert sorted(sum(whole[:3], [])) == list(range(10)) and whole[:3] != whole[3:6]  # every row once, a new order each epoch
    assert rows(range(1, 5)) == whole  # iterated again: the same


def status_mb(field: str) -> int:
    """This process's RssFile (mapped file pages) or RssAnon (its own memory), in MB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(f"{field}:")) // 1024


def test_a_stored_entry_made_one_tensor_is_not_held_twice(tmp_path):
    np.save(tmp_path / "entry.npy", np.ones((64, 2**20 // 2), np.float16))  # 64 MB, as the store writes an entry
    entry = np.load(tmp_path / "entry.npy", mmap_mode="r")
    before = status_mb("RssFile")
    rows = tfdata.batch_rows(len(entry), 16)
    batch = next(iter(tfdata.batches(entry, None, rows)))
    assert batch.shape == (16, 2**20 // 2) and float(batch[0, 0]) == 1.0
    assert status_mb("RssFile") < before + 32  # its pages were read into the tensor, then let go
    np.testing.assert_array_equal(entry[:2], 1)  # still readable: mapped again from the file


def test_predictions_read_a_stored_entry_batch_by_batch_without_a_whole_copy(tmp_path):
    np.save(tmp_path / "entry.npy", np.full((256, 2**18), 2, np.float32))  # 256 MB: one tensor, were it read for training
    entry = np.load(tmp_path / "entry.npy", mmap_mode="r")
    before = status_mb("RssAnon")
    total = sum(float(keras.ops.sum(batch)) for batch in tfdata.batches(entry, None, tfdata.batch_rows(len(entry), 16), once=True))
    assert total == 2 * entry.size  # every row, once
    assert status_mb("RssAnon") < before + 128, "the entry was copied whole"
