"""The typed schema of a run.

Every YAML file under ``conf/`` is merged onto one of these dataclasses (registered in
Hydra's ConfigStore under ``schema/``), so a typo'd key or a value of the wrong type fails
at composition time with a message naming the key. Range checks that a type cannot express
live in ``__post_init__`` and run when :func:`to_run_config` turns the composed DictConfig
into these objects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from runner.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _positive(key: str, value: float | int) -> None:
    _require(value > 0, key, f"must be > 0, got {value}. Set it on the command line, e.g. {key}=1")


def _fraction(key: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    _require(ok, key, f"must be in {'(0' if low_open else '[0'}, 1), got {value}")


@dataclass
class DatasetConfig:
    """Where the images come from and how they are split."""

    name: str = MISSING
    path: Optional[str] = None
    image_size: int = 227
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: Optional[int] = None
    cache_dir: str = "data"
    decode_workers: Optional[int] = None
    decode_cache: bool = True
    in_memory_gb: Optional[float] = None  # pixels above this are memory-mapped (None: half the machine's memory)

    def __post_init__(self) -> None:
        _require(self.image_size >= 8, "dataset.image_size", f"must be >= 8 pixels, got {self.image_size}")
        _fraction("dataset.val_fraction", self.val_fraction, low_open=True)
        _fraction("dataset.test_fraction", self.test_fraction, low_open=True)
        _require(
            self.val_fraction + self.test_fraction < 1.0,
            "dataset.val_fraction + dataset.test_fraction",
            f"must leave images for training, got {self.val_fraction} + {self.test_fraction}",
        )
        if self.limit is not None:
            _positive("dataset.limit", self.limit)
        if self.in_memory_gb is not None:
            _require(self.in_memory_gb >= 0, "dataset.in_memory_gb", f"must be >= 0 (0: always memory-mapped), got {self.in_memory_gb}")


@dataclass
class SyntheticCracksConfig(DatasetConfig):
    """The embedded generator: deterministic from ``seed``, cached under ``cache_dir``."""

    name: str = "synthetic_cracks"
    samples_per_class: int = 500
    source_size: int = 227
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.samples_per_class >= 3, "dataset.samples_per_class", f"must be >= 3, got {self.samples_per_class}")


@dataclass
class ConcreteCracksConfig(DatasetConfig):
    """The real 40,000-image archive: a local folder/zip at ``path``, else downloaded from ``url``."""

    name: str = "concrete_cracks"
    url: str = MISSING
    sha256: Optional[str] = None


@dataclass
class ImageFolderConfig(DatasetConfig):
    """Any class-per-folder image tree at ``path``."""

    name: str = "image_folder"
    path: Optional[str] = MISSING


@dataclass
class ModelConfig:
    """A network; ``framework`` picks the trainer that runs it."""

    name: str = MISSING
    framework: str = MISSING

    def __post_init__(self) -> None:
        _require(
            self.framework in ("torch", "keras"),
            "model.framework",
            f"must be 'torch' or 'keras', got {self.framework!r}",
        )


@dataclass
class LinearConfig(ModelConfig):
    """One linear layer over the flattened, normalised image (the capstone's PyTorch model)."""

    name: str = "linear"
    framework: str = "torch"


@dataclass
class KerasBackboneConfig(ModelConfig):
    """A pre-trained keras.applications base with a new classification head."""

    framework: str = "keras"
    weights: Optional[str] = "imagenet"
    head_units: int = 256
    dropout: float = 0.5
    min_image_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.head_units >= 0, "model.head_units", f"must be >= 0 (0 = no hidden layer), got {self.head_units}")
        _fraction("model.dropout", self.dropout)


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _require(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("optimizer.momentum", self.momentum)


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999


PRECISIONS = ("32", "bf16-mixed")  # trainer.precision: Lightning's names


@dataclass
class TrainerConfig:
    epochs: int = 10
    fine_tune_epochs: int = 5
    batch_size: int = 32
    num_threads: Optional[int] = None
    progress: bool = True
    # "32": float32 throughout. "bf16-mixed": bfloat16 compute with float32 weights (both
    # frameworks), about 1.5x faster where the hardware has bfloat16 units, slightly different results.
    precision: str = "32"
    # Keras: compute the frozen layers once per image and train on their stored output
    # (equal results; see runner.frozen_features). False: through them every epoch.
    cache_frozen_features: bool = True
    feature_cache_dir: str = "data/features"  # the store, shared by runs and sweep jobs
    feature_cache_gb: float = 10.0  # least recently used entries beyond this are deleted

    def __post_init__(self) -> None:
        _positive("trainer.epochs", self.epochs)
        _positive("trainer.fine_tune_epochs", self.fine_tune_epochs)
        _positive("trainer.batch_size", self.batch_size)
        if self.num_threads is not None:
            _positive("trainer.num_threads", self.num_threads)
        _require(self.precision in PRECISIONS, "trainer.precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.feature_cache_gb >= 0, "trainer.feature_cache_gb", f"must be >= 0 (gigabytes kept between runs), got {self.feature_cache_gb}")


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "crack-classification"
    artifact_root: str = "mlruns"
    run_name: Optional[str] = None


@dataclass
class RunConfig:
    """The whole run. ``freeze_depth`` and ``fine_tune_lr`` only mean something for Keras models."""

    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    seed: int = 42
    freeze_depth: Optional[int] = None
    fine_tune_lr: Optional[float] = None
    objective: str = "val_accuracy"
    resume: Optional[str] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.model.framework != "keras":
            for key in ("freeze_depth", "fine_tune_lr"):
                _require(
                    getattr(self, key) is None,
                    key,
                    f"only applies to Keras transfer-learning models (model=resnet50 or model=vgg16); "
                    f"model={self.model.name} has no pre-trained base. Remove {key}=... from the command line.",
                )
        if self.resume is not None:
            _require(
                self.model.framework == "torch",
                "resume",
                f"continuing an interrupted run works for model=linear only; start the model={self.model.name} run anew.",
            )
        if self.fine_tune_lr is not None:
            _positive("fine_tune_lr", self.fine_tune_lr)
        if self.freeze_depth is not None:
            _require(self.freeze_depth >= 0, "freeze_depth", f"must be >= 0 or null, got {self.freeze_depth}")
        if isinstance(self.model, KerasBackboneConfig):
            _require(
                self.dataset.image_size >= self.model.min_image_size,
                "dataset.image_size",
                f"model={self.model.name} needs at least {self.model.min_image_size} pixels, "
                f"got {self.dataset.image_size}. Use e.g. dataset.image_size=224",
            )
        _require(
            self.objective in OBJECTIVES,
            "objective",
            f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )


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
}


def register_schemas() -> None:
    """Put the dataclasses into Hydra's ConfigStore, where conf/*.yaml pick them up."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schemas in _SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


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
