"""Every key has a checked range: a bad value is a ConfigError naming the key, the valid range and a fix that
works; too few images for the split fractions get advice that works too."""

from __future__ import annotations

import re

import numpy as np
import pytest

from crack_runner.datasets.split import stratified_split
from runner.config.schema import to_run_config
from runner.errors import ConfigError, DataError

KERAS = ("model=resnet50",)
CONCRETE = ("dataset=concrete_cracks",)

# (the overrides that select the groups, the bad override, the key the error must name)
CASES = [
    ((), "seed=-1", "seed"),
    ((), "seed=4294967296", "seed"),
    ((), "dataset.seed=-1", "dataset.seed"),
    ((), "dataset.samples_per_class=2", "dataset.samples_per_class"),
    ((), "dataset.source_size=8", "dataset.source_size"),
    ((), "dataset.source_size=5000", "dataset.source_size"),
    ((), "dataset.image_size=7", "dataset.image_size"),
    ((), "dataset.image_size=4097", "dataset.image_size"),
    ((), "dataset.val_fraction=1.0", "dataset.val_fraction"),
    ((), "dataset.test_fraction=0", "dataset.test_fraction"),
    ((), "dataset.test_fraction=0.9", "dataset.val_fraction + dataset.test_fraction"),
    ((), "dataset.limit=0", "dataset.limit"),
    ((), "dataset.decode_workers=0", "dataset.decode_workers"),
    ((), "dataset.cache_dir=''", "dataset.cache_dir"),
    (("dataset=image_folder",), "dataset.path=''", "dataset.path"),
    ((), "dataset.in_memory_gb=-1", "dataset.in_memory_gb"),
    ((), "dataset.in_memory_gb=nan", "dataset.in_memory_gb"),
    ((), "dataset.name=image_folder", "dataset.name"),
    (("dataset=image_folder",), "dataset.path=null", "dataset.path"),
    (CONCRETE, "dataset.url=cracks.zip", "dataset.url"),
    (CONCRETE, "dataset.sha256=abc123", "dataset.sha256"),
    ((), "model.name=resnet50", "model.name"),
    ((), "model.framework=keras", "model.framework"),
    (KERAS, "model.weights=''", "model.weights"),
    (KERAS, "model.head_units=-1", "model.head_units"),
    (KERAS, "model.dropout=1.0", "model.dropout"),
    (KERAS, "model.min_image_size=16", "model.min_image_size"),
    (KERAS, "dataset.image_size=16", "dataset.image_size"),
    (KERAS, "freeze_depth=-1", "freeze_depth"),
    (KERAS, "fine_tune_lr=0", "fine_tune_lr"),
    ((), "optimizer.name=adam", "optimizer.name"),
    ((), "optimizer.lr=0", "optimizer.lr"),
    ((), "optimizer.lr=inf", "optimizer.lr"),
    ((), "optimizer.lr=nan", "optimizer.lr"),
    ((), "optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ((), "optimizer.momentum=1.0", "optimizer.momentum"),
    (("optimizer=adam",), "optimizer.beta1=1.0", "optimizer.beta1"),
    (("optimizer=adam",), "optimizer.beta2=-0.1", "optimizer.beta2"),
    ((), "trainer.epochs=0", "trainer.epochs"),
    ((), "trainer.fine_tune_epochs=0", "trainer.fine_tune_epochs"),
    ((), "trainer.batch_size=0", "trainer.batch_size"),
    ((), "trainer.num_threads=0", "trainer.num_threads"),
    ((), "trainer.precision=16", "trainer.precision"),
    ((), "trainer.feature_cache_dir=''", "trainer.feature_cache_dir"),
    ((), "trainer.feature_cache_gb=-1", "trainer.feature_cache_gb"),
    ((), "tracking.uri=''", "tracking.uri"),
    ((), "tracking.experiment=''", "tracking.experiment"),
    ((), "tracking.experiment='  '", "tracking.experiment"),
    ((), "tracking.artifact_root=''", "tracking.artifact_root"),
    ((), "tracking.run_name=''", "tracking.run_name"),
    ((), "resume=''", "resume"),
    ((), "objective=speed", "objective"),
]


@pytest.mark.parametrize("groups, bad, key", CASES, ids=[case[1] for case in CASES])
def test_out_of_range_value_names_the_key_the_range_and_a_fix_that_works(make_cfg, groups, bad, key):
    tiny = not any(group.startswith("dataset=") for group in groups)  # the tiny overrides are synthetic_cracks keys
    with pytest.raises(ConfigError) as err:
        to_run_config(make_cfg(*groups, bad, tiny=tiny))
    message = str(err.value)
    assert message.startswith(f"{key}: ") and re.search(r"(must be|needs at least) .*, got ", message), message
    fix = re.search(r"Set e\.g\. (.+)$", message)
    assert fix, f"no example fix in: {message}"
    to_run_config(make_cfg(*groups, bad, *fix.group(1).split(), tiny=tiny))  # the suggested setting is accepted


def test_the_command_line_reports_a_bad_seed_without_a_traceback(cli):
    result = cli("seed=-1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "seed: must be >= 0 and <= 4294967295" in result.stderr and "seed=42" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# (images per class, dataset.val_fraction, dataset.test_fraction): too few for the fractions
TOO_FEW = [
    ([3, 3], 0.15, 0.15),
    ([5, 40], 0.15, 0.15),
    ([6, 100, 100], 0.05, 0.05),
    ([5, 5], 0.6, 0.3),  # the smallest share is training's: raising val/test would not do
    ([4, 4], 0.34, 0.4),  # passes the count check, refused by scikit-learn
    ([2, 10], 0.15, 0.15),  # no fractions can do: only more images
]


@pytest.mark.parametrize("counts, val, test", TOO_FEW, ids=[str(case) for case in TOO_FEW])
def test_split_advice_when_following_it_works(counts, val, test):
    labels = np.repeat(np.arange(len(counts)), counts)
    with pytest.raises(DataError) as err:
        stratified_split(labels, val, test, seed=0)
    message = str(err.value)
    assert "lower the fractions" not in message  # lower fractions need more images, not fewer
    needed = int(re.search(r"every class has at least (\d+)", message).group(1))
    more = np.repeat(np.arange(len(counts)), np.maximum(counts, needed))
    assert len(stratified_split(more, val, test, seed=0).test) > 0
    fractions = re.search(r"dataset\.val_fraction=(\S+) dataset\.test_fraction=(\S+)\.$", message)
    if min(counts) < 3:
        assert fractions is None and "no fractions" in message
    else:
        split = stratified_split(labels, float(fractions.group(1)), float(fractions.group(2)), seed=0)
        for part in (split.train, split.val, split.test):
            assert set(labels[part]) == set(range(len(counts)))  # every class in every split
