"""Composition of every group and override, and the errors of a bad configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import MISSING

from runner.config.schema import AdamConfig, ImageFolderConfig, LinearConfig, SGDConfig, SyntheticCracksConfig, to_run_config
from runner.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_default_config_is_linear_on_synthetic_with_sgd(make_cfg):
    run = to_run_config(make_cfg(tiny=False))
    assert isinstance(run.dataset, SyntheticCracksConfig)
    assert isinstance(run.model, LinearConfig) and run.model.framework == "torch"
    assert isinstance(run.optimizer, SGDConfig) and run.optimizer.momentum == 0.9
    assert run.freeze_depth is None and run.fine_tune_lr is None
    assert run.trainer.epochs == 10 and run.dataset.image_size == 227


@pytest.mark.parametrize(
    "override, check",
    [
        ("optimizer=adam", lambda r: isinstance(r.optimizer, AdamConfig) and r.optimizer.lr == 0.001),
        ("optimizer.lr=0.1", lambda r: r.optimizer.lr == 0.1),
        ("optimizer.momentum=0.5", lambda r: r.optimizer.momentum == 0.5),
        ("dataset=image_folder", None),  # needs a path: checked below
        ("dataset.limit=7", lambda r: r.dataset.limit == 7),
        ("dataset.val_fraction=0.2", lambda r: r.dataset.val_fraction == 0.2),
        ("trainer.batch_size=64", lambda r: r.trainer.batch_size == 64),
        ("seed=7", lambda r: r.seed == 7),
        ("tracking.experiment=other", lambda r: r.tracking.experiment == "other"),
    ],
)
def test_overrides_reach_the_typed_config(make_cfg, override, check):
    if check is None:
        run = to_run_config(make_cfg(override, "dataset.path=/data/cracks", tiny=False))
        assert isinstance(run.dataset, ImageFolderConfig) and run.dataset.path == "/data/cracks"
    else:
        assert check(to_run_config(make_cfg(override)))


def test_concrete_cracks_group_has_a_download_url(make_cfg):
    run = to_run_config(make_cfg("dataset=concrete_cracks", tiny=False))
    assert run.dataset.name == "concrete_cracks"
    assert run.dataset.url.endswith(".zip") and run.dataset.path is None


def test_tracking_uri_follows_the_environment_variable(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert to_run_config(compose("config")).tracking.uri == "sqlite:////tmp/elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert to_run_config(compose("config")).tracking.uri == "sqlite:///mlflow.db"


def test_typo_in_a_key_fails_naming_it(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("optimizer.lrr=0.1")
    assert "optimizer.lrr" in str(err.value)
    assert "lrr" in str(err.value.__cause__)


def test_unknown_top_level_key_fails(make_cfg):
    with pytest.raises(ConfigCompositionException, match="epochs"):
        make_cfg("epochs=3")


def test_wrong_type_fails_naming_the_key(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("optimizer.lr=fast")
    assert "optimizer.lr" in str(err.value)
    assert "fast" in str(err.value.__cause__)


def test_unknown_group_option_lists_the_valid_ones(make_cfg):
    with pytest.raises(MissingConfigException) as err:
        make_cfg("model=resnet5")
    assert "model/resnet5" in str(err.value) and "linear" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.batch_size=-1", "trainer.batch_size"),
        ("trainer.feature_cache_gb=-1", "trainer.feature_cache_gb"),
        ("trainer.precision=16", "trainer.precision"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.momentum=1.5", "optimizer.momentum"),
        ("dataset.val_fraction=0", "dataset.val_fraction"),
        ("dataset.test_fraction=0.9", "dataset.val_fraction + dataset.test_fraction"),
        ("dataset.image_size=2", "dataset.image_size"),
        ("dataset.limit=0", "dataset.limit"),
        ("dataset.in_memory_gb=-1", "dataset.in_memory_gb"),
        ("freeze_depth=140", "freeze_depth"),
        ("fine_tune_lr=1e-5", "fine_tune_lr"),
        ("objective=speed", "objective"),
    ],
)
def test_out_of_range_values_fail_naming_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        to_run_config(make_cfg(override))
    assert str(err.value).startswith(f"{key}:")


def test_keras_keys_with_linear_say_why(make_cfg):
    with pytest.raises(ConfigError, match="only applies to Keras"):
        to_run_config(make_cfg("freeze_depth=10"))


def test_image_folder_without_path_says_which_key(make_cfg):
    with pytest.raises(ConfigError, match=r"dataset\.path has no value"):
        to_run_config(make_cfg("dataset=image_folder", tiny=False))


def test_every_default_lives_in_the_yaml_alone():
    """The schema types and checks the keys; their values come from conf/ only, so the two can never disagree."""
    from runner.config.schema import _SCHEMAS, RunConfig, TrackingConfig, TrainerConfig

    with_values = []
    for schema in [RunConfig, TrainerConfig, TrackingConfig, *(s for group in _SCHEMAS.values() for s in group.values())]:
        for f in dataclasses.fields(schema):
            fixed = f.name in ("name", "framework")  # what a schema is (checked by _fixed), not a setting
            if not fixed and (f.default is not MISSING or f.default_factory is not dataclasses.MISSING):
                with_values.append(f"{schema.__name__}.{f.name}")
    assert with_values == []
