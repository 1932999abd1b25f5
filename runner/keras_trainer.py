"""The Keras trainer: transfer learning in the two phases of the Keras guide, on TensorFlow.

Phase 1 trains the new head on the frozen base; with ``fine_tune_lr`` set, phase 2 unfreezes
the base layers after ``freeze_depth``, recompiles at ``fine_tune_lr`` and trains on, with
the epoch (MLflow step) count continuing. Everything is logged through the run's Tracker,
exactly like the torch trainer.

Frozen layers compute the same thing every epoch, so by default (``trainer.cache_frozen_features``)
a phase trains the rest of the model on their output for each train and val image, computed
once and kept across runs in a store (runner.frozen_features): with the whole base frozen each
epoch is a small MLP fit on pooled vectors, and a later run with the same frozen layers and
images (a sweep's next job) skips the base entirely. A fine-tune run computes the layers
before its second phase's cut once per image for both phases (:func:`pooled_via`). There is
no random augmentation in this trainer; one that changes the images every epoch would have
to turn the cache off. ``trainer.precision=bf16-mixed`` builds the model under Keras'
``mixed_bfloat16`` policy.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

# Before keras and tensorflow are imported: Keras on TensorFlow (a KERAS_BACKEND=torch in
# the shell would import torch), and without TensorFlow's C++ info and warning lines.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from datasets import DataSplits  # noqa: E402
from models.keras_backbones import POOL, FrozenSplit, build, freeze, frozen_layer_count, frozen_tail, split_frozen  # noqa: E402
from runner.frozen_features import FeatureStore  # noqa: E402
from runner.config import AdamConfig, OptimizerConfig, RunConfig, SGDConfig  # noqa: E402
from runner import interrupt  # noqa: E402
from runner.errors import ConfigError, TrainingError  # noqa: E402
from runner.files import atomic_path  # noqa: E402
from runner.tracking import Tracker  # noqa: E402

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """The framework and library versions, logged as run params."""
    return {"framework": "keras", "tensorflow_version": tf.__version__, "keras_version": keras.__version__}


POLICIES = {"32": "float32", "bf16-mixed": "mixed_bfloat16"}  # trainer.precision -> Keras dtype policy


def batch_rows(count: int, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """The row indices of each batch; the same order for images and for their cached features."""
    rows = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        rows = rows.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
    return rows.batch(batch_size)


# Arrays up to an eighth of the machine's memory become one TensorFlow tensor, gathered in the
# graph; larger ones are read per batch through tf.numpy_function, which holds Python's lock and
# at times halved the training speed on 2 cores (measured: 79 s against 42 s an epoch).
IN_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8


def batches(array: np.ndarray, labels: np.ndarray | None, rows: tf.data.Dataset) -> tf.data.Dataset:
    """Float32 batches (with labels, if given) of the rows of ``array`` in the order of ``rows``, prefetched.

    ``array``: uint8 images (cast per batch) or stored float32 features. What is shuffled is the
    order of the rows (:func:`batch_rows`), so the shuffle buffer holds indices, not images, and
    datasets made from the same ``rows`` share one sequence of epoch orders. Arrays up to
    ``IN_MEMORY`` bytes become one tensor; larger ones (the 40,000-image set, a frozen prefix's
    feature maps of thousands of images) are gathered batch by batch from NumPy, memory-mapped
    files included, with no copy of the whole array.
    """
    targets = None if labels is None else tf.convert_to_tensor(labels)
    if array.nbytes <= IN_MEMORY:
        source = tf.convert_to_tensor(np.asarray(array))

        def gather(rows: tf.Tensor) -> tf.Tensor:
            return tf.gather(source, rows)

    else:
        shape = (None, *array.shape[1:])

        def read(rows: np.ndarray) -> np.ndarray:
            return array[rows]

        def gather(rows: tf.Tensor) -> tf.Tensor:
            x = tf.numpy_function(read, [rows], tf.as_dtype(array.dtype), stateful=False)
            x.set_shape(shape)
            return x

    @tf.autograph.experimental.do_not_convert  # plain tensor code; AutoGraph only warns about the closures
    def take(rows: tf.Tensor) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(gather(rows), tf.float32)
        return x if targets is None else (x, tf.gather(targets, rows))

    return rows.map(take, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


@dataclass
class KerasModel:
    """A trained Keras classifier with what evaluation and MLflow need.

    With ``split`` and ``store`` (the last phase trained on stored frozen features), the
    frozen part's output for the images to predict comes from the store too (computed once,
    then read by every later run on the same images and frozen layers); the trainable part
    runs on it: the same probabilities as the whole model, up to float rounding.
    """

    model: keras.Model
    batch_size: int
    split: FrozenSplit | None = None
    store: FeatureStore | None = None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of raw pixels (N, H, W, 3), uint8 or float, values 0..255."""
        features = self.store.features(self.split.frozen, images, "predict") if self.split and self.store else None
        model, inputs = (self.model, images) if features is None else (self.split.trainable, features)
        return model.predict(batches(inputs, None, batch_rows(len(images), self.batch_size)), verbose=0)

    def log_model(self, tracker: Tracker, example: np.ndarray) -> str:
        """Log with mlflow.tensorflow, which saves the Keras model in its .keras format.

        Preprocessing and softmax are inside the model and it holds only built-in layers, so
        ``mlflow.pyfunc.load_model`` loads it anywhere. (mlflow.keras.log_model fails on an
        input example in MLflow 3.x: it writes the example before creating the model folder.)
        """
        return tracker.log_model(
            "tensorflow",
            self.model,
            example.astype(np.float32),
            lambda x: self.model.predict(x, verbose=0),  # the logged model itself, as pyfunc will run it
            requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", "numpy"],
        )


def build_optimizer(cfg: OptimizerConfig, lr: float) -> keras.optimizers.Optimizer:
    """Keras' SGD or Adam with the optimizer group's settings, at ``lr`` (the phase's rate).

    Keras applies weight_decay decoupled from the gradient (as AdamW does), torch adds it to
    the gradient: the same for plain SGD, close but not identical otherwise.
    """
    weight_decay = cfg.weight_decay or None
    if isinstance(cfg, SGDConfig):
        return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if isinstance(cfg, AdamConfig):
        return keras.optimizers.Adam(learning_rate=lr, beta_1=cfg.beta1, beta_2=cfg.beta2, weight_decay=weight_decay)
    raise TypeError(f"no keras optimizer for {cfg.name}")


def compile_model(model: keras.Model, cfg: OptimizerConfig, lr: float) -> None:
    """(Re)compile after a change of frozen layers, with a fresh optimizer at the phase's ``lr``."""
    model.compile(optimizer=build_optimizer(cfg, lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


@dataclass(frozen=True)
class Phase:
    """One ``model.fit``: its name in the epoch history, base layers frozen from the input, learning rate, epochs."""

    name: str
    freeze_depth: int
    lr: float
    epochs: int
    lr_key: str = "optimizer.lr"  # the key that sets ``lr``, named when training diverges


def plan(run: RunConfig, base: keras.Model) -> list[Phase]:
    """The phases of a run, with ``freeze_depth`` checked against the base before any training.

    fine_tune_lr null: one phase, the base layers after freeze_depth (BatchNormalization layers
    excepted, see models.keras_backbones.freeze) and the head at optimizer.lr.
    fine_tune_lr set: the head alone on the whole frozen base, then the base layers after
    freeze_depth at fine_tune_lr; freeze_depth=null there unfreezes the whole base, as the
    Keras guide does (null cannot mean 'all frozen' in a phase made to unfreeze layers).
    """
    frozen = frozen_layer_count(base, run.freeze_depth)
    if run.fine_tune_lr is None:
        return [Phase("train", frozen, run.optimizer.lr, run.trainer.epochs)]
    return [
        Phase("head", len(base.layers), run.optimizer.lr, run.trainer.epochs),
        Phase("fine_tune", 0 if run.freeze_depth is None else frozen, run.fine_tune_lr, run.trainer.fine_tune_epochs, "fine_tune_lr"),
    ]


def parameter_count(weights: list) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def save_checkpoint(path: Path, model: keras.Model) -> None:
    """The model with its optimizer state (Keras' .keras format), written atomically."""
    with atomic_path(path) as tmp:
        model.save(tmp)


class EpochTracker(keras.callbacks.Callback):
    """Per epoch: the torch stream's metrics to the Tracker and a checkpoint; a NaN/inf loss stops the run."""

    def __init__(self, tracker: Tracker, phase: Phase, checkpoint: Path, classifier: keras.Model | None = None) -> None:
        super().__init__()
        self.tracker = tracker
        self.phase = phase
        self.checkpoint = checkpoint
        self.classifier = classifier  # what the checkpoint holds; None: the model being fit

    def stop_if_diverged(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"the {what} became {value} in the {self.phase.name} phase. The learning rate is probably too high: "
                f"lower {self.phase.lr_key} (e.g. divide it by 10)."
            )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupt.check()  # Ctrl-C / SIGTERM: stop between batches, the run ends KILLED
        self.stop_if_diverged("training loss", float((logs or {}).get("loss", 0.0)))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self.stop_if_diverged("validation loss", float(logs["val_loss"]))
        metrics = {
            "train_loss": logs["loss"],
            "train_accuracy": logs["accuracy"],
            "val_loss": logs["val_loss"],
            "val_accuracy": logs["val_accuracy"],
        }
        save_checkpoint(self.checkpoint, self.classifier or self.model)
        self.tracker.log_epoch(epoch + 1, metrics, phase=self.phase.name)
        self.tracker.log_artifact(self.checkpoint, "checkpoints")


def set_threads(num_threads: int | None) -> None:
    """Size TensorFlow's thread pools (None: all cores); possible only before its first op in a process."""
    threads = num_threads or os.cpu_count() or 1
    if (tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()) == threads:  # 0: TF's default, all cores
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran in this process (several runs in one Python session)
        log.warning("TensorFlow is already running in this process: trainer.num_threads=%s takes effect in a new one", num_threads)


def stored_pair(store: FeatureStore, frozen: keras.Model, train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """What ``frozen`` computes for the train and val inputs, from the store (see runner.frozen_features); None if the disk cannot hold it."""
    train_out = store.features(frozen, train, "train")
    val_out = store.features(frozen, val, "val") if train_out is not None else None
    return None if val_out is None else (train_out, val_out)


def stored_features(store: FeatureStore, split: FrozenSplit, data: DataSplits) -> tuple[np.ndarray, np.ndarray] | None:
    """The frozen part's output for the train and val images."""
    return stored_pair(store, split.frozen, data.train.images, data.val.images)


def pooled_via(store: FeatureStore, later: FrozenSplit, tail: keras.Model, data: DataSplits) -> tuple[np.ndarray, np.ndarray] | None:
    """Phase 1's pooled vectors by way of the fine-tune phase's frozen output (stored for it): the tail on it.

    The layers before the fine-tune cut then run once per image for both phases, not once each.
    """
    maps = stored_features(store, later, data)
    return None if maps is None else stored_pair(store, tail, *maps)


def fit(run: RunConfig, data: DataSplits, tracker: Tracker, resume_from: Path | None = None) -> KerasModel:
    """Train the new head (and unfrozen base layers) in one or two phases, with metrics and a checkpoint per epoch.

    ``resume_from`` (continuing an interrupted run) is not supported for Keras models yet.
    """
    if resume_from is not None:
        raise ConfigError(
            f"resume: continuing an interrupted run works for model=linear only; start the model={run.model.name} "
            "run anew (the same command without resume=...)."
        )
    set_threads(run.trainer.num_threads)
    if run.trainer.progress:  # Keras' progress bars, also in the predict calls MLflow makes to log the model
        keras.config.enable_interactive_logging()
    else:
        keras.config.disable_interactive_logging()
    model, base = build(run.model, data.image_shape, len(data.classes), POLICIES[run.trainer.precision])
    phases = plan(run, base)
    tracker.log_params(
        {"device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu", "base_layers": len(base.layers)}
    )
    batch_size = run.trainer.batch_size
    # One sequence of epoch orders for the whole run, whether a phase reads images or cached features.
    train_rows, val_rows = batch_rows(len(data.train), batch_size, run.seed), batch_rows(len(data.val), batch_size)
    checkpoint = tracker.output_dir / "checkpoints" / "last.keras"
    store = None
    if run.trainer.cache_frozen_features:
        store = FeatureStore(Path(run.trainer.feature_cache_dir), run.trainer.feature_cache_gb, batch_size, run.trainer.progress)
    # A fine-tune run: the second phase's cut, known before the first, whose frozen output
    # serves both phases (see pooled_via).
    later = None
    if store and len(phases) > 1:
        freeze(base, phases[-1].freeze_depth)
        later = split_frozen(model, base)
    epochs_done = 0
    for number, phase in enumerate(phases, start=1):
        freeze(base, phase.freeze_depth)
        compile_model(model, run.optimizer, phase.lr)
        if store is None:
            split = None
        elif later is not None and number == len(phases):
            split = later
        else:
            split = split_frozen(model, base)
        if later is not None and number == 1 and later.cut != POOL:  # the head on the whole frozen base
            features = pooled_via(store, later, frozen_tail(base, later.cut), data)
        else:
            features = stored_features(store, split, data) if split else None
        if features is None:  # through the whole model, every epoch
            split, fitted = None, model
            train = batches(data.train.images, data.train.labels, train_rows)
            val = batches(data.val.images, data.val.labels, val_rows)
        else:  # the layers after the cut, on the stored output of those before it
            fitted = split.trainable
            fitted.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])  # the classifier's own optimizer
            train = batches(features[0], data.train.labels, train_rows)
            val = batches(features[1], data.val.labels, val_rows)
        trainable, frozen = parameter_count(model.trainable_weights), parameter_count(model.non_trainable_weights)
        tracker.log_params(
            {
                f"phase{number}.name": phase.name,
                f"phase{number}.freeze_depth": phase.freeze_depth,
                f"phase{number}.trainable_params": trainable,
                f"phase{number}.frozen_params": frozen,
                f"phase{number}.cached_up_to": split.cut if split else "none",
            }
        )
        log.info(
            "phase %d/%d %s: the first %d of %d base layers and all BatchNormalization layers frozen, "
            "%d trainable and %d frozen parameters, lr=%g, %d epoch(s)%s",
            number, len(phases), phase.name, phase.freeze_depth, len(base.layers), trainable, frozen, phase.lr, phase.epochs,
            f", on the stored output of the layers up to {split.cut}" if split else "",
        )
        fitted.fit(
            train,
            validation_data=val,
            initial_epoch=epochs_done,
            epochs=epochs_done + phase.epochs,
            callbacks=[EpochTracker(tracker, phase, checkpoint, model)],
            shuffle=False,  # the dataset shuffles itself
            verbose=1 if run.trainer.progress else 0,
        )
        epochs_done += phase.epochs
    return KerasModel(model, batch_size, split, store)
