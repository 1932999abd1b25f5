"""The typed schema of a run.

Every YAML file under ``conf/`` is merged onto one of these dataclasses (registered in
Hydra's ConfigStore under ``schema/``), so a typo'd key or a value of the wrong type fails
at composition time with a message naming the key. The dataclasses hold types and checks,
not values: every default lives in ``conf/`` alone (a key no YAML sets has no value and is
reported as such), so the schema and the YAML cannot disagree. Range checks that a type cannot express
live in ``__post_init__`` and run when :func:`to_run_config` turns the composed DictConfig
into these objects.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from runner.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check(ok: bool, key: str, valid: str, value: object, example: object) -> None:
    """The range error every key gives: what is valid, what was given, and a setting that works."""
    _require(ok, key, f"must be {valid}, got {value!r}. Set e.g. {key}={example}")


def _positive(key: str, value: float, example: object, why: str = "") -> None:
    finite = "" if isinstance(value, int) else " and finite"
    _check(math.isfinite(value) and value > 0, key, f"> 0{finite}{why}", value, example)


def _non_negative(key: str, value: float, example: object, meaning: str = "") -> None:
    _check(value >= 0, key, f">= 0{meaning}", value, example)  # NaN fails too; inf means no limit


def _fraction(key: str, value: float, example: object, low_open: bool = False) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    _check(ok, key, f"in {'(0' if low_open else '[0'}, 1)", value, example)


def _int_range(key: str, value: int, low: int, high: int | None, example: object, unit: str = "", why: str = "") -> None:
    ok = value >= low and (high is None or value <= high)
    _check(ok, key, f">= {low}{unit}" + ("" if high is None else f" and <= {high}") + why, value, example)


def _text(key: str, value: str | None, example: str, nullable: bool = False) -> None:
    """A string key that is set must say something: an empty path or name means nothing."""
    if value is not None:
        _check(bool(value.strip()), key, "a non-empty string" + (" or null" if nullable else ""), value, example)


def _seed(key: str, value: int, example: object) -> None:
    _int_range(key, value, 0, SEED_MAX, example, why=" (2**32-1: NumPy and scikit-learn take no other seeds)")


def _fixed(group: str, node: Any, key: str, options: str) -> None:
    """A key the schema fixes (the class default): the schema decides what runs, so another value would only mislabel it."""
    fixed = getattr(type(node), key)
    valid = f"{fixed!r} (to run another {group}, choose {group}=<{options}>)"
    _check(fixed == MISSING or getattr(node, key) == fixed, f"{group}.{key}", valid, getattr(node, key), fixed)


def how() -> Any:
    """A key that says where or how a run runs, not what it computes: it may differ when the run is resumed."""
    return field(default=MISSING, metadata={HOW: True})


HOW = "where_or_how"


def may_differ_on_resume(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys of ``node`` (a RunConfig) marked :func:`how`: those a resumed run may change."""
    keys: set[str] = set()
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys |= may_differ_on_resume(value, f"{prefix}{f.name}.")
        elif f.metadata.get(HOW):
            keys.add(f"{prefix}{f.name}")
    return keys


def conf_dir() -> Path:
    """The folder of conf/: the repo's own in a checkout or an editable install, the wheel's copy (crack_runner.conf) otherwise."""
    spec = importlib.util.find_spec("crack_runner.conf")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the runner's configuration (crack_runner.conf) is not installed: reinstall the package (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


SEED_MAX = 2**32 - 1
MAX_IMAGE_SIZE = 4096  # 4096 x 4096 x 3 bytes is 48 MiB per decoded image, already past any use here


@dataclass
class DatasetConfig:
    """Where the images come from and how they are split."""

    name: str = MISSING
    path: Optional[str] = MISSING
    image_size: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    limit: Optional[int] = MISSING
    cache_dir: str = how()
    decode_workers: Optional[int] = how()
    decode_cache: bool = how()
    in_memory_gb: Optional[float] = how()  # pixels above this are memory-mapped (None: half the machine's memory)
    folds: Optional[int] = MISSING  # K: K-fold cross-validation of train+val (test held out) under one parent run

    def __post_init__(self) -> None:
        _fixed("dataset", self, "name", "synthetic_cracks|concrete_cracks|image_folder")
        _text("dataset.path", self.path, "/data/cracks", nullable=True)
        _int_range(
            "dataset.image_size", self.image_size, 8, MAX_IMAGE_SIZE, 227, " pixels",
            f" (images are decoded once at size x size: {MAX_IMAGE_SIZE} takes 48 MiB per image)",
        )
        _fraction("dataset.val_fraction", self.val_fraction, 0.15, low_open=True)
        _fraction("dataset.test_fraction", self.test_fraction, 0.15, low_open=True)
        _require(
            self.val_fraction + self.test_fraction < 1.0,
            "dataset.val_fraction + dataset.test_fraction",
            f"must be < 1 to leave images for training, got {self.val_fraction} + {self.test_fraction}. "
            "Set e.g. dataset.val_fraction=0.15 dataset.test_fraction=0.15",
        )
        if self.limit is not None:
            _positive("dataset.limit", self.limit, 200, " (images per class), or null for all")
        _text("dataset.cache_dir", self.cache_dir, "data")
        if self.decode_workers is not None:
            _positive("dataset.decode_workers", self.decode_workers, 2, " (threads), or null for one per core")
        if self.in_memory_gb is not None:
            _non_negative("dataset.in_memory_gb", self.in_memory_gb, 4, " GB (0: always memory-mapped), or null for half the memory")
        if self.folds is not None:
            _int_range("dataset.folds", self.folds, 2, None, 5, why=" (folds of train+val), or null for one train/val split")


@dataclass
class SyntheticCracksConfig(DatasetConfig):
    """The embedded generator: deterministic from ``seed``, cached under ``cache_dir``."""

    name: str = "synthetic_cracks"
    samples_per_class: int = MISSING
    source_size: int = MISSING
    seed: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.path is None, "dataset.path",
            f"the synthetic_cracks set is generated (into dataset.cache_dir) and reads no folder, got {self.path!r}. "
            f"To train on your images: dataset=image_folder dataset.path={self.path} "
            "(or dataset=concrete_cracks dataset.path=... for the capstone's archive)",
        )
        _int_range("dataset.samples_per_class", self.samples_per_class, 3, None, 500, why=" (a train/val/test split needs 3 per class)")
        _int_range("dataset.source_size", self.source_size, 16, MAX_IMAGE_SIZE, 227, " pixels", " (the size the generator draws at)")
        _seed("dataset.seed", self.seed, 0)


@dataclass
class ConcreteCracksConfig(DatasetConfig):
    """The real 40,000-image archive: a local folder/zip at ``path``, else downloaded from ``url``."""

    name: str = "concrete_cracks"
    url: str = MISSING
    sha256: Optional[str] = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("://" in self.url, "dataset.url", "a URL such as https://... or file:///...", self.url, "file:///data/cracks.zip")
        if self.sha256 is not None:
            hex64 = len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256)
            _check(hex64, "dataset.sha256", "64 hexadecimal digits (sha256sum's output) or null", self.sha256, "null")


@dataclass
class ImageFolderConfig(DatasetConfig):
    """Any class-per-folder image tree at ``path``."""

    name: str = "image_folder"
    path: Optional[str] = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.path is not None, "dataset.path", "the folder of class sub-folders (not null)", self.path, "/data/cracks")


@dataclass
class ModelConfig:
    """A network; ``framework`` picks the trainer that runs it."""

    name: str = MISSING
    framework: str = MISSING

    def __post_init__(self) -> None:
        _fixed("model", self, "name", "linear|resnet50|vgg16")
        _fixed("model", self, "framework", "linear|resnet50|vgg16")


@dataclass
class LinearConfig(ModelConfig):
    """One linear layer over the flattened, normalised image (the capstone's PyTorch model)."""

    name: str = "linear"
    framework: str = "torch"


@dataclass
class KerasBackboneConfig(ModelConfig):
    """A pre-trained keras.applications base with a new classification head."""

    framework: str = "keras"
    weights: Optional[str] = MISSING
    head_units: int = MISSING
    dropout: float = MISSING
    min_image_size: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("model.weights", self.weights, "imagenet", nullable=True)
        _int_range("model.head_units", self.head_units, 0, None, 256, why=" (0 = no hidden layer)")
        _fraction("model.dropout", self.dropout, 0.5)
        _int_range("model.min_image_size", self.min_image_size, 32, None, 32, " pixels", " (keras.applications bases refuse smaller inputs)")


# optimizer.name -> its class in each framework (torch.optim.<name>, keras.optimizers.<name>) and the
# group's own keys as that class's arguments; the learning rate and weight decay are passed by the trainer.
OPTIMIZERS: dict[str, dict[str, tuple[str, Callable[[Any], dict[str, Any]]]]] = {
    "sgd": {
        "torch": ("SGD", lambda cfg: {"momentum": cfg.momentum}),
        "keras": ("SGD", lambda cfg: {"momentum": cfg.momentum}),
    },
    "adam": {
        "torch": ("Adam", lambda cfg: {"betas": (cfg.beta1, cfg.beta2)}),
        "keras": ("Adam", lambda cfg: {"beta_1": cfg.beta1, "beta_2": cfg.beta2}),
    },
}


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING

    def __post_init__(self) -> None:
        _fixed("optimizer", self, "name", "sgd|adam")
        _positive("optimizer.lr", self.lr, 0.01)
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay", "a finite number >= 0", self.weight_decay, 0)


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    momentum: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("optimizer.momentum", self.momentum, 0.9)


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    lr: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("optimizer.beta1", self.beta1, 0.9)
        _fraction("optimizer.beta2", self.beta2, 0.999)


@dataclass
class AugmentConfig:
    """Random changes to training batches (conf/augment/): each transform on its own switch; none touches val or test."""

    name: str = "none"
    hflip: bool = MISSING  # mirror left-right, half the images
    vflip: bool = MISSING  # mirror top-bottom, half the images
    rot90: bool = MISSING  # rotate by 0, 90, 180 or 270 degrees (square images)
    brightness: float = MISSING  # add up to +-this share of the pixel range (0.1: +-25.5 levels)
    contrast: float = MISSING  # scale each image's deviation from its mean by 1 +- up to this

    def __post_init__(self) -> None:
        _fraction("augment.brightness", self.brightness, 0.1)
        _fraction("augment.contrast", self.contrast, 0.2)

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.brightness > 0 or self.contrast > 0


# trainer.precision (Lightning's names) -> what each framework computes in: a torch dtype, a Keras
# dtype policy. bf16-mixed: bfloat16 compute with float32 weights.
PRECISIONS: dict[str, dict[str, str]] = {
    "32": {"torch": "float32", "keras": "float32"},
    "bf16-mixed": {"torch": "bfloat16", "keras": "mixed_bfloat16"},
}


MONITORED = ("val_loss", "val_accuracy")  # val_loss is minimised, val_accuracy maximised
SELECTIONS = ("best", "last")
LR_SCHEDULES = ("none", "cosine", "step", "plateau")
CLASS_WEIGHTS = (None, "balanced")
FEATURE_DTYPES = ("float16", "float32")  # how the frozen-feature store keeps what the layers compute


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    fine_tune_epochs: int = MISSING
    batch_size: int = MISSING
    num_threads: Optional[int] = how()
    progress: bool = how()
    # "32": float32 throughout. "bf16-mixed": bfloat16 compute with float32 weights (both
    # frameworks), about 1.5x faster where the hardware has bfloat16 units, slightly different results.
    precision: str = MISSING
    # Keras: compute the frozen layers once per image and train on their stored output
    # (equal results; see runner.frozen_features). False: through them every epoch.
    cache_frozen_features: bool = how()
    feature_cache_dir: str = how()  # the store, shared by runs and sweep jobs
    feature_cache_gb: float = how()  # least recently used entries beyond this are deleted
    feature_cache_dtype: str = MISSING  # float32 (as the layers compute it) or float16 (half the disk; results move, see experiments.md)
    # After a run ends FINISHED, its checkpoints (last/best, with the optimizer's state: what a resume
    # needs) are deleted from its folder and artifacts; the logged model keeps the weights it reports.
    keep_checkpoints: bool = how()
    # Which epoch a run keeps (runner.train.epochs): the best by `monitor` (val_loss minimised, val_accuracy
    # maximised), or the last; early stopping after `early_stopping_patience` epochs without a gain above min_delta.
    monitor: str = MISSING
    select: str = MISSING
    early_stopping_patience: Optional[int] = MISSING
    min_delta: float = MISSING
    # The rate of each epoch (runner.train.schedules), per phase from that phase's base rate.
    lr_schedule: str = MISSING
    warmup_epochs: int = MISSING
    lr_decay: float = MISSING  # step and plateau: the factor of each cut
    lr_step_epochs: int = MISSING  # step: cut every this many epochs after the warm-up
    lr_plateau_patience: int = MISSING  # plateau: cut after this many epochs without a gain of `monitor`
    class_weights: Optional[str] = MISSING  # balanced: each class weighs n / (classes x its count) in the training loss

    def __post_init__(self) -> None:
        _positive("trainer.epochs", self.epochs, 10)
        _positive("trainer.fine_tune_epochs", self.fine_tune_epochs, 5)
        _positive("trainer.batch_size", self.batch_size, 32)
        if self.num_threads is not None:
            _positive("trainer.num_threads", self.num_threads, 2, " (threads), or null for all cores")
        _check(self.precision in PRECISIONS, "trainer.precision", f"one of {', '.join(PRECISIONS)}", self.precision, 32)
        _text("trainer.feature_cache_dir", self.feature_cache_dir, "data/features")
        _non_negative("trainer.feature_cache_gb", self.feature_cache_gb, 10, " (gigabytes kept between runs)")
        _check(self.feature_cache_dtype in FEATURE_DTYPES, "trainer.feature_cache_dtype", " or ".join(FEATURE_DTYPES), self.feature_cache_dtype, "float32")
        _check(self.monitor in MONITORED, "trainer.monitor", f"one of {', '.join(MONITORED)}", self.monitor, "val_loss")
        _check(self.select in SELECTIONS, "trainer.select", f"one of {', '.join(SELECTIONS)}", self.select, "best")
        if self.early_stopping_patience is not None:
            _positive("trainer.early_stopping_patience", self.early_stopping_patience, 3, " (epochs), or null for no early stopping")
        _check(math.isfinite(self.min_delta) and self.min_delta >= 0, "trainer.min_delta", "a finite number >= 0", self.min_delta, 0)
        _check(self.lr_schedule in LR_SCHEDULES, "trainer.lr_schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule, "cosine")
        _int_range("trainer.warmup_epochs", self.warmup_epochs, 0, self.epochs - 1, 1, why=f" (fewer than trainer.epochs={self.epochs})")
        _fraction("trainer.lr_decay", self.lr_decay, 0.1, low_open=True)
        _positive("trainer.lr_step_epochs", self.lr_step_epochs, 3)
        _positive("trainer.lr_plateau_patience", self.lr_plateau_patience, 2)
        _check(self.class_weights in CLASS_WEIGHTS, "trainer.class_weights", "null or balanced", self.class_weights, "balanced")


@dataclass
class TrackingConfig:
    uri: str = how()
    experiment: str = MISSING
    artifact_root: str = how()
    run_name: Optional[str] = how()
    pictures: bool = how()  # the run's plots/*.png (runner.report.evaluate); a sweep of many short trials may go without
    # MLflow's own system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py), sampled
    # every ``system_metrics_interval`` seconds, plus one last sample when the run ends.
    system_metrics: bool = how()
    system_metrics_interval: float = how()

    def __post_init__(self) -> None:
        _text("tracking.uri", self.uri, "sqlite:///mlflow.db")
        _text("tracking.experiment", self.experiment, "crack-classification")
        _text("tracking.artifact_root", self.artifact_root, "mlruns")
        _text("tracking.run_name", self.run_name, "baseline", nullable=True)
        _positive("tracking.system_metrics_interval", self.system_metrics_interval, 5, " (seconds between samples)")


@dataclass
class ExportConfig:
    """ONNX exports made when a run ends (runner.deploy.onnx_export); ``python -m runner.export`` makes them later."""

    onnx: Optional[bool] = how()  # null: by framework (the linear model yes, Keras runs no: two more copies of ResNet50 a trial)
    int8: bool = how()
    max_accuracy_drop: float = how()
    calibration_images: int = how()

    def __post_init__(self) -> None:
        _check(0 <= self.max_accuracy_drop < 1, "export.max_accuracy_drop", "in [0, 1) (test accuracy, as a fraction)",
               self.max_accuracy_drop, 0.005)
        _int_range("export.calibration_images", self.calibration_images, 1, None, 256)

    def wanted(self, framework: str) -> bool:
        """Whether a run of ``framework`` exports when it ends."""
        return self.onnx if self.onnx is not None else framework == "torch"


PRUNERS = ("none", "median", "asha", "hyperband")


@dataclass
class SweepConfig:
    """How an Optuna sweep spends its trials (runner.sweep): which pruner stops them, how many run at a time, where the study lives."""

    pruner: str = MISSING  # decides how far a trial trains: part of what it computes
    min_epochs: int = MISSING
    startup_trials: int = MISSING
    workers: int = how()
    storage: Optional[str] = how()

    def __post_init__(self) -> None:
        _check(self.pruner in PRUNERS, "sweep.pruner", f"one of {', '.join(PRUNERS)}", self.pruner, "median")
        _positive("sweep.min_epochs", self.min_epochs, 2, " (epochs)")
        _int_range("sweep.startup_trials", self.startup_trials, 0, None, 3)
        _positive("sweep.workers", self.workers, 2, " (trials at a time)")
        _text("sweep.storage", self.storage, "sqlite:///optuna.db", nullable=True)


@dataclass
class RunConfig:
    """The whole run. ``freeze_depth`` and ``fine_tune_lr`` only mean something for Keras models."""

    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    augment: AugmentConfig = MISSING
    seed: int = MISSING
    freeze_depth: Optional[int] = MISSING
    fine_tune_lr: Optional[float] = MISSING
    objective: str = MISSING
    resume: Optional[str] = how()
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    export: ExportConfig = MISSING
    sweep: SweepConfig = MISSING

    def __post_init__(self) -> None:
        if self.model.framework != "keras":
            for key in ("freeze_depth", "fine_tune_lr"):
                _require(
                    getattr(self, key) is None,
                    key,
                    f"only applies to Keras transfer-learning models (model=resnet50 or model=vgg16); "
                    f"model={self.model.name} has no pre-trained base. Remove {key}=... from the command line.",
                )
        _seed("seed", self.seed, 42)
        _text("resume", self.resume, "null", nullable=True)
        if self.fine_tune_lr is not None:
            _positive("fine_tune_lr", self.fine_tune_lr, 1e-5)
            _int_range(
                "trainer.warmup_epochs", self.trainer.warmup_epochs, 0, self.trainer.fine_tune_epochs - 1, 0,
                why=f" (each phase warms up: fewer than trainer.fine_tune_epochs={self.trainer.fine_tune_epochs})",
            )
        if self.dataset.folds is not None:
            _require(self.resume is None, "resume", "cross-validation runs (dataset.folds) cannot be resumed; start them anew without resume=...")
        if self.freeze_depth is not None:
            _int_range("freeze_depth", self.freeze_depth, 0, None, "null", why=", or null (the whole base frozen)")
        if isinstance(self.model, KerasBackboneConfig):
            _require(
                self.dataset.image_size >= self.model.min_image_size,
                "dataset.image_size",
                f"model={self.model.name} needs at least {self.model.min_image_size} pixels, "
                f"got {self.dataset.image_size}. Set e.g. dataset.image_size=224",
            )
        _check(self.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}", self.objective, "val_accuracy")


# Metrics a sweeper may optimise; all are maximised except those in MINIMISED.
OBJECTIVES = ("val_accuracy", "val_loss", "test_accuracy", "test_f1", "test_roc_auc")
MINIMISED = frozenset({"val_loss"})

_SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {
        "synthetic_cracks": SyntheticCracksConfig,
        "concrete_cracks": ConcreteCracksConfig,
        "image_folder": ImageFolderConfig,
    },
    "model": {"linear": LinearConfig, "keras_backbone": KerasBackboneConfig},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig},
    "augment": {"augment": AugmentConfig},
}


def register_schemas() -> None:
    """Put the dataclasses into Hydra's ConfigStore, where conf/*.yaml pick them up."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schemas in _SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def dataset_config(logged: dict[str, Any]) -> DatasetConfig:
    """A run's dataset section as its config/config.yaml logged it, typed and checked again (to load the same data later)."""
    schema = _SCHEMAS["dataset"].get(str(logged.get("name")))
    if schema is None:
        raise ConfigError(f"the logged dataset {logged.get('name')!r} is none of {', '.join(_SCHEMAS['dataset'])}: it was not logged by this runner.")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), logged))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"the logged dataset section cannot be read: {err}") from None


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Turn the composed config into typed objects, running every range check."""
    if "hydra" in cfg:  # present when composed with return_hydra_config=True
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} has no value and this configuration needs one: set it on the command line, e.g. {err.full_key}=...") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    assert isinstance(run, RunConfig)
    return run
