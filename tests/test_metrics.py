"""The test metrics on small examples worked out by hand: perfect, all wrong, one class predicted, an absent class,
multi-class macro averages, ties. Any warning fails a test: none may leak into a run's log."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.train import metrics

pytestmark = pytest.mark.filterwarnings("error")

BINARY = ["Negative", "Positive"]
KEYS = ["accuracy", "balanced_accuracy", "precision", "recall", "f1", "loss", "roc_auc"]


def test_keys_and_the_positive_class():
    out = metrics.classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), BINARY)
    assert list(out) == KEYS and all(type(v) is float for v in out.values())
    assert metrics.positive_index(BINARY) == 1
    assert metrics.positive_index(["Positive", "Negative"]) == 0
    assert metrics.positive_index(["cat", "dog"]) == 1


def test_a_perfect_classifier_scores_one():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    out = metrics.classification_metrics(labels, probs, BINARY)
    assert {k: v for k, v in out.items() if k != "loss"} == dict.fromkeys(KEYS[:5] + ["roc_auc"], 1.0)
    assert out["loss"] == pytest.approx(-np.log([0.9, 0.8, 0.6, 0.7]).mean())
    np.testing.assert_array_equal(metrics.confusion(labels, probs, 2), [[2, 0], [0, 2]])
    assert metrics.degenerate(probs, BINARY) is None


def test_an_all_wrong_classifier_scores_zero_and_its_loss_is_not_capped():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = metrics.classification_metrics(labels, probs, BINARY)
    assert {k: v for k, v in out.items() if k != "loss"} == dict.fromkeys(KEYS[:5] + ["roc_auc"], 0.0)
    assert out["loss"] == pytest.approx(-math.log(np.finfo(np.float64).tiny))  # 708: no clipping at 1e-7 or eps
    np.testing.assert_array_equal(metrics.confusion(labels, probs, 2), [[0, 2], [2, 0]])


def test_one_class_predicted_gives_precision_zero_and_says_so():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1]] * 4)  # always Negative, with one score for every image
    out = metrics.classification_metrics(labels, probs, BINARY)
    assert out["accuracy"] == 0.75 and out["balanced_accuracy"] == 0.5  # recall 1 for Negative, 0 for Positive
    assert out["precision"] == out["recall"] == out["f1"] == 0.0  # nothing called positive: 0, not a warning
    assert out["roc_auc"] == 0.5
    assert "'Negative' for all 4 test images" in metrics.degenerate(probs, BINARY)


def test_an_absent_class():
    labels = np.array([0, 0, 2, 2])  # class b absent from the test split, yet predicted once
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    out = metrics.classification_metrics(labels, probs, ["a", "b", "c"])
    assert out["accuracy"] == 0.75
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # the classes present only
    assert out["precision"] == pytest.approx((1 + 0 + 1) / 3)  # macro: the absent class counts, as 0
    assert out["recall"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert out["f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert math.isnan(out["roc_auc"])  # no curve for b against the rest
    np.testing.assert_array_equal(metrics.confusion(labels, probs, 3), [[1, 1, 0], [0, 0, 0], [0, 0, 2]])
    only_positive = metrics.classification_metrics(np.array([1, 1]), np.array([[0.4, 0.6], [0.1, 0.9]]), BINARY)
    assert math.isnan(only_positive["roc_auc"]) and only_positive["accuracy"] == 1.0


def test_multi_class_macro_averages():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]])
    out = metrics.classification_metrics(labels, probs, ["a", "b", "c"])  # predicted: a b b b c a
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert out["recall"] == out["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert out["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert out["roc_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)  # a vs the rest: 0.3 is below one of the four others
    assert out["loss"] == pytest.approx(-np.log([0.6, 0.3, 0.7, 0.8, 0.6, 0.4]).mean())
    np.testing.assert_array_equal(metrics.confusion(labels, probs, 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_curves():
    truth = np.array([False, False, True, True])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    fpr, tpr, thresholds = metrics.roc_curve(truth, score)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert metrics.area_under(fpr, tpr) == metrics.roc_auc(truth, score) == pytest.approx(0.75)
    precision, recall, thresholds = metrics.precision_recall_curve(truth, score)
    np.testing.assert_allclose(precision, [0.5, 2 / 3, 0.5, 1, 1])
    np.testing.assert_allclose(recall, [1, 1, 0.5, 0.5, 0])
    np.testing.assert_allclose(thresholds, [0.1, 0.35, 0.4, 0.8])
    assert metrics.average_precision(precision, recall) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # One score for every image (ties): the diagonal, and the share of positives at every recall.
    fpr, tpr, _ = metrics.roc_curve(truth, np.full(4, 0.5))
    np.testing.assert_allclose([fpr, tpr], [[0, 1], [0, 1]])
    precision, recall, _ = metrics.precision_recall_curve(truth, np.full(4, 0.5))
    assert metrics.average_precision(precision, recall) == 0.5
