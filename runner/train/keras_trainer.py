"""The Keras trainer: transfer learning in the two phases of the Keras guide, on TensorFlow.

Build the classifier (models.keras_backbones), plan its phases, then per phase: freeze,
compile, fit. Phase 1 trains the new head on the frozen base; with ``fine_tune_lr`` set,
phase 2 unfreezes the base layers after ``freeze_depth``, recompiles at ``fine_tune_lr`` and
trains on, with the epoch (MLflow step) count continuing. Each epoch begins and ends in the
shared step (runner.train.epochs), as in the torch trainer: it gives the epoch's rate, decides early
stopping (``model.stop_training``), keeps the best epoch, whose weights are loaded back into
the classifier after the last phase, and writes the checkpoint from which ``resume=<run id>``
continues the run in either phase (:func:`save_checkpoint`).

:func:`fit` reads as the guide does: build, then per phase freeze, compile, fit. Beside the
plain ``model.fit`` on image batches sits one shortcut (runner.train.frozen, on by default with
``trainer.cache_frozen_features``): the frozen layers run once per image and the classifier's
trainable rest fits on their stored output, with the same results as the plain path.
``trainer.precision=bf16-mixed`` builds the model under Keras' ``mixed_bfloat16`` policy.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.report.console import quiet_native_logs

# Before keras and tensorflow are imported: Keras on TensorFlow (a KERAS_BACKEND=torch in
# the shell would import torch), and without TensorFlow's C++ info and warning lines.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ log lines (oneDNN notes, a harmless NodeDef "error"): set 0 to see them
quiet_native_logs()  # the same for those TensorFlow logs through absl, which ignores that variable

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from crack_runner.datasets import DataSplits, stopping  # noqa: E402
from crack_runner.models.keras_backbones import build, check_weights, freeze, frozen_layer_count  # noqa: E402
from runner.config.schema import OPTIMIZERS, PRECISIONS, OptimizerConfig, RunConfig  # noqa: E402
from runner.errors import ConfigError, storage_error  # noqa: E402
from runner.track.safe_load import UnreadableCheckpoint  # noqa: E402
from runner.track.tracking import Tracker  # noqa: E402
from runner.train.augment import augment  # noqa: E402
from runner.train.class_weights import class_weights  # noqa: E402
from runner.train.epochs import Epochs  # noqa: E402
from runner.train.frozen import FrozenShortcut  # noqa: E402
from runner.train.frozen.cut import CutModel  # noqa: E402
from runner.train.frozen.store import FeatureStore  # noqa: E402
from runner.train.frozen.tfdata import batch_rows, batch_seeds, batches  # noqa: E402
from runner.train.keras_fit import fit as fit_traced_once  # noqa: E402

log = logging.getLogger(__name__)

CHECKPOINT = "last.keras"
RESUME_STATE = "runner_resume.json"  # a member of the checkpoint's archive: what continuing needs beyond the model


def versions() -> dict[str, str]:
    """The framework and library versions, logged as run params."""
    return {"framework": "keras", "tensorflow_version": tf.__version__, "keras_version": keras.__version__}


def seed(value: int) -> None:
    """Seed Keras and TensorFlow, and make TensorFlow's ops deterministic (same seed, same results)."""
    keras.utils.set_random_seed(value)
    tf.config.experimental.enable_op_determinism()


def check(run: RunConfig) -> None:
    """Weights that cannot be had (offline ImageNet, a missing file) stop the run before it opens."""
    check_weights(run.model.name, run.model.weights)


@dataclass
class KerasModel:
    """A trained Keras classifier with what evaluation and MLflow need.

    ``shortcut``: when the last phase trained on the stored output of the frozen layers, the
    images to predict go that way too (their frozen output computed once, then read by every
    later run on the same images and layers): the same probabilities as the whole model, up to float rounding.
    """

    model: keras.Model
    batch_size: int
    history: list[dict[str, Any]]
    shortcut: FrozenShortcut | None = None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of raw pixels (N, H, W, 3), uint8 or float, values 0..255."""
        probs = self.shortcut.predict_proba(images) if self.shortcut else None
        if probs is None:
            probs = self.model.predict(batches(images, None, batch_rows(len(images), self.batch_size), once=True), verbose=0)
        return probs

    def log_model(self, tracker: Tracker, example: np.ndarray) -> str:
        """Log with mlflow.tensorflow, which saves the Keras model in its .keras format, weights without optimizer state.

        What is logged is the classifier's layers as an uncompiled model: the optimizer's
        moments (twice the trainable weights for Adam) serve only a resume, which reads the
        run's checkpoints, so the logged model is the size of its weights.

        Preprocessing and softmax are inside the model and it holds only built-in layers, so
        ``mlflow.pyfunc.load_model`` loads it anywhere, without pickle: Keras reads the .keras
        file in its safe mode, and with no custom objects MLflow cloudpickles none beside it.
        (mlflow.keras.log_model fails on an input example in MLflow 3.x: it writes the example
        before creating the model folder.)
        """
        inference = keras.Model(self.model.inputs, self.model.outputs, name=self.model.name)  # the same layers, not compiled
        return tracker.log_model(
            "tensorflow",
            inference,
            example.astype(np.float32),
            # The logged model itself, called once: the signature needs the output's shape and dtype, which
            # model.predict gives too, but only after tracing a graph of the whole network for one example.
            lambda x: keras.ops.convert_to_numpy(inference([x], training=False)),  # its inputs: a list of one
            requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", "numpy"],
        )


def build_optimizer(cfg: OptimizerConfig, lr: float) -> keras.optimizers.Optimizer:
    """The optimizer group's Keras optimizer (config.OPTIMIZERS) at ``lr``, the phase's rate.

    Keras applies weight_decay decoupled from the gradient (as AdamW does), torch adds it to
    the gradient: the same for plain SGD, close but not identical otherwise.
    """
    name, arguments = OPTIMIZERS[cfg.name]["keras"]
    return getattr(keras.optimizers, name)(learning_rate=lr, weight_decay=cfg.weight_decay or None, **arguments(cfg))


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


class EpochEnd(keras.callbacks.Callback):
    """Keras' hooks into the shared epoch step (runner.train.epochs): the epoch's rate set, losses checked per batch, each epoch closed there.

    ``self.model`` is the model being fitted (the classifier or its trainable rest); both share the classifier's optimizer.
    """

    def __init__(self, epochs: Epochs, phase: Phase, classifier: keras.Model) -> None:
        super().__init__()
        self.epochs = epochs
        self.phase = phase
        self.classifier = classifier  # what the checkpoint holds, whether the fitted model is it or its trainable rest

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.epochs.begin(self.phase.name, self.phase.lr, self.phase.epochs))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        stopping.check()  # Ctrl-C / SIGTERM: stop between batches, the run ends KILLED
        self.epochs.check_finite("training loss", float((logs or {}).get("loss", 0.0)), f"in the {self.phase.name} phase", self.phase.lr_key)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        metrics = {"train_loss": logs["loss"], "train_accuracy": logs["accuracy"], "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"]}
        save = functools.partial(save_checkpoint, model=self.classifier, epoch=epoch + 1, phase=self.phase.name)
        if self.epochs.end(epoch + 1, metrics, save, self.phase.name, self.phase.lr_key):
            self.model.stop_training = True  # early stopping ends this phase; a fine-tune phase after it still runs


def rng_states(model: keras.Model) -> list[keras.Variable]:
    """The layers' random states (the seed generators of the head's dropout), which ``model.save`` leaves out."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def save_checkpoint(path: Path, model: keras.Model, epoch: int, phase: str) -> None:
    """The classifier as a .keras file, with what continuing after ``epoch`` needs beyond it.

    Keras saves the weights and the optimizer's variables, not the layers' random states (the
    dropout masks to come) nor where the run stands: those go into the same archive as one
    JSON member (keras.saving.load_model ignores it), so the checkpoint stays one file written
    atomically. The shuffling position is the epoch itself: epoch e's order is drawn from
    (seed, e) (runner.train.frozen.tfdata.epoch_order).
    """
    model.save(path)
    state = {"epoch": epoch, "phase": phase, "rng": [keras.ops.convert_to_numpy(v).tolist() for v in rng_states(model)]}
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(RESUME_STATE, json.dumps(state))


WEIGHTS = "model.weights.h5"  # the member of a .keras archive that holds the weights and the optimizer's variables
UNREADABLE = (zipfile.BadZipFile, OSError, ValueError, TypeError, KeyError)  # what reading a damaged or foreign archive raises


def read_checkpoint(path: Path) -> keras.Model:
    """Read a checkpoint written by :func:`save_checkpoint` in Keras' safe mode, as a resume checks every checkpoint
    before the run reopens (runner.track.safe_load.check_resume): a layer that would run pickled code is refused.

    A resumed run's checkpoints come from its store, which others may write: one that is
    truncated, damaged or not this runner's (no resume state, or one without its epoch, phase
    and random states) is an UnreadableCheckpoint naming it.
    """
    try:
        resume_state(path)
        return keras.saving.load_model(path, safe_mode=True)
    except UNREADABLE as err:
        raise UnreadableCheckpoint(path, err) from None


def resume_state(path: Path) -> dict[str, Any]:
    """Where the checkpoint's run stood: its last complete ``epoch``, its ``phase`` and the layers' random states (``rng``)."""
    with zipfile.ZipFile(path) as archive:
        return _resume_state(archive, path)


def _resume_state(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    if RESUME_STATE not in archive.namelist():
        raise ConfigError(
            f"resume: the checkpoint {path.name} was written by a runner that could not resume Keras runs; "
            "start the run anew (the same command without resume=...)."
        )
    state = json.loads(archive.read(RESUME_STATE))
    if not (isinstance(state, dict) and isinstance(state.get("epoch"), int) and isinstance(state.get("phase"), str)
            and isinstance(state.get("rng"), list)):
        raise ValueError(f"its {RESUME_STATE} does not hold an epoch, a phase and random states")
    return state


def restore_checkpoint(path: Path, model: keras.Model, optimizer: bool) -> None:
    """Give ``model`` a checkpoint's weights and random states (``model``: frozen and compiled for the phase that goes on, if one does).

    ``optimizer``: also the optimizer's state (step count, momenta), when the run goes on inside
    the phase that saved it; a phase that starts anew starts a fresh optimizer, as in a run never
    stopped. Only arrays are read, into the run's own model: the checkpoint is one this run wrote,
    or one :func:`read_checkpoint` checked before the run reopened; the classifier is not rebuilt
    from the file's config. The weights member is copied out beside the checkpoint first: h5py
    reads it from a plain file in one pass, where inside the archive it seeks through the zip stream.
    """
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(dir=path.parent, prefix=".restore-") as folder:
            state = _resume_state(archive, path)
            weights = Path(folder, WEIGHTS)
            try:
                with archive.open(WEIGHTS) as source, open(weights, "wb") as target:
                    shutil.copyfileobj(source, target, 2**22)
            except OSError as err:
                raise storage_error(err) or err from None  # a full disk is said as one, not as a damaged checkpoint
            if optimizer:
                model.optimizer.build(model.trainable_variables)
            compiled = getattr(model, "optimizer", None)  # none when every phase had ended: the model was never compiled
            model.load_weights(weights, objects_to_skip=None if optimizer or compiled is None else [compiled])
        if optimizer and int(model.optimizer.iterations) == 0:  # Keras skips an optimizer state that does not fit with a warning only
            raise ValueError("it holds no optimizer state for the phase it stopped in")
        for variable, value in zip(rng_states(model), state["rng"], strict=True):
            variable.assign(value)
    except UNREADABLE as err:
        raise UnreadableCheckpoint(path, err) from None


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


def fit(run: RunConfig, data: DataSplits, tracker: Tracker, epochs: Epochs, resume_from: Path | None = None) -> KerasModel:
    """Train the new head (and unfrozen base layers) in one or two phases, each epoch closed through ``epochs``.

    ``resume_from``: a folder with the ``last.keras`` of an interrupted run. Phases it had
    completed are skipped; the phase it stopped in goes on after its last complete epoch with
    that epoch's weights, optimizer state and random states, and every epoch reads the rows in
    the order an uninterrupted run would (tests/test_reliability.py: the same final metrics).
    """
    set_threads(run.trainer.num_threads)
    if run.trainer.progress:  # Keras' progress bars, also in the predict calls MLflow makes to log the model
        keras.config.enable_interactive_logging()
    else:
        keras.config.disable_interactive_logging()
    cfg = run.model
    model, base = build(
        cfg.name, cfg.weights, data.image_shape, len(data.classes), cfg.head_units, cfg.dropout, PRECISIONS[run.trainer.precision]["keras"]
    )
    phases = plan(run, base)
    tracker.log_params({"device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu", "base_layers": len(base.layers)})
    shortcut = frozen_shortcut(run, model, base, data, phases, tracker)
    weights = class_weights(data.train.labels, data.classes, run.trainer.class_weights, tracker)
    checkpoint = resume_from / CHECKPOINT if resume_from else None
    stood = resume_state(checkpoint) if checkpoint else {"epoch": 0}
    epochs.rewind(stood["epoch"], resume_from)
    for number, phase in enumerate(phases, start=1):
        left = epochs.left(phase.name, phase.epochs)
        if left == 0:  # completed (or stopped early) before the interruption
            continue
        done = epochs.history[-1]["step"] if epochs.history else 0  # early stopping may have ended a phase before its last epoch
        span = range(done + 1, done + left + 1)
        freeze(base, phase.freeze_depth)
        compile_model(model, run.optimizer, phase.lr)
        if checkpoint:
            restore_checkpoint(checkpoint, model, optimizer=left < phase.epochs)
            log.info("resuming after epoch %d (%s phase) from the checkpoint of run %s", done, stood["phase"], tracker.run_id)
            checkpoint = None
        cut = shortcut.begin_phase(first=number == 1) if shortcut else None
        log_phase(tracker, number, len(phases), phase, model, base, cut)
        fit_args = dict(
            initial_epoch=done,
            epochs=done + left,
            steps_per_epoch=math.ceil(len(data.train) / run.trainer.batch_size),  # one pass over the phase's epochs
            callbacks=[EpochEnd(epochs, phase, model)],
            shuffle=False,  # the batches shuffle themselves
            verbose=1 if run.trainer.progress else 0,
            class_weight=None if weights is None else dict(enumerate(weights.tolist())),
        )
        if cut is not None:
            shortcut.fit(span, **fit_args)  # the trainable rest on the frozen layers' stored output: the same epochs, faster
        else:
            train, val = image_batches(run, data, span)
            fit_traced_once(model, train, validation_data=val, **fit_args)  # the plain path: every layer, every epoch
    if checkpoint:  # every phase had ended: the run was stopped after its last epoch, while it was tested or logged
        restore_checkpoint(checkpoint, model, optimizer=False)
        log.info("resuming after epoch %d, the last, from the checkpoint of run %s: only the test and the model's logging are left",
                 stood["epoch"], tracker.run_id)
    # The best epoch's classifier, read as a resume reads it; the trainable rest on stored output shares its layers.
    epochs.finish(lambda path: restore_checkpoint(path, model, optimizer=False))
    return KerasModel(model, run.trainer.batch_size, epochs.history, shortcut if shortcut and shortcut.cut else None)


def image_batches(run: RunConfig, data: DataSplits, epochs: range) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Train batches of ``epochs`` (epoch e's order drawn from (seed, e), augmented when augment is on) and val batches."""
    size = run.trainer.batch_size
    changes = functools.partial(augment, cfg=run.augment) if run.augment.enabled else None
    seeds = batch_seeds(len(data.train), size, run.seed, epochs) if changes else None
    train = batches(data.train.images, data.train.labels, batch_rows(len(data.train), size, run.seed, epochs), changes, seeds)
    return train, batches(data.val.images, data.val.labels, batch_rows(len(data.val), size))


def frozen_shortcut(run: RunConfig, model: keras.Model, base: keras.Model, data: DataSplits, phases: list[Phase], tracker: Tracker) -> FrozenShortcut | None:
    """The frozen layers' stored output to train on (trainer.cache_frozen_features), or None for the plain path,
    which augmentation needs (the stored output holds the images unchanged), as does a store too small for it."""
    if not run.trainer.cache_frozen_features:
        return None
    if run.augment.enabled:
        log.info("augment=%s: training goes through the frozen layers every epoch (trainer.cache_frozen_features is ignored: "
                 "their stored output holds the images unchanged)", run.augment.name)
        tracker.log_params({"frozen_features": "through the layers: augment is on"})
        return None
    trainer = run.trainer
    store = FeatureStore(Path(trainer.feature_cache_dir), trainer.feature_cache_gb, trainer.batch_size, trainer.progress, trainer.feature_cache_dtype)
    fine_tune_depth = phases[-1].freeze_depth if len(phases) > 1 else None
    shortcut = FrozenShortcut(model, base, data, trainer.batch_size, run.seed, store, fine_tune_depth)
    if not shortcut.fits(phases[0].freeze_depth):
        tracker.log_params({"frozen_features": "through the layers: the store cannot hold them"})
        return None
    return shortcut


def log_phase(tracker: Tracker, number: int, count: int, phase: Phase, model: keras.Model, base: keras.Model, cut: CutModel | None) -> None:
    """The phase's settings as params (phase<N>.*) and one log line."""
    trainable, frozen = parameter_count(model.trainable_weights), parameter_count(model.non_trainable_weights)
    tracker.log_params(
        {
            f"phase{number}.name": phase.name,
            f"phase{number}.freeze_depth": phase.freeze_depth,
            f"phase{number}.trainable_params": trainable,
            f"phase{number}.frozen_params": frozen,
            f"phase{number}.cached_up_to": cut.cut if cut else "none",
        }
    )
    log.info(
        "phase %d/%d %s: the first %d of %d base layers and all BatchNormalization layers frozen, "
        "%d trainable and %d frozen parameters, lr=%g, %d epoch(s)%s",
        number, count, phase.name, phase.freeze_depth, len(base.layers), trainable, frozen, phase.lr, phase.epochs,
        f", on the stored output of the layers up to {cut.cut}" if cut else "",
    )
