"""The runner's NumPy metrics give scikit-learn's numbers: binary and multi-class, ties, absent classes, tiny splits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from runner import metrics


def probabilities(rng: np.random.Generator, n: int, classes: int, ties: bool) -> np.ndarray:
    probs = rng.dirichlet(np.ones(classes), size=n)
    if ties:  # scores that repeat, as a model that saturates gives
        probs = np.round(probs, 1)
        probs[:, -1] = 1 - probs[:, :-1].sum(axis=1)
        probs = np.clip(probs, 0, 1)
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


CASES = [(n, classes, ties, seed) for n, classes in ((7, 2), (60, 2), (400, 2), (50, 3), (300, 4)) for ties in (False, True) for seed in (0, 1)]


@pytest.mark.parametrize("n, num_classes, ties, seed", CASES)
def test_classification_metrics_are_scikit_learns(n, num_classes, ties, seed):
    rng = np.random.default_rng(seed)
    probs = probabilities(rng, n, num_classes, ties)
    labels = rng.integers(0, num_classes, size=n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    classes = ["Negative", "Positive"] if num_classes == 2 else [f"c{i}" for i in range(num_classes)]
    preds = probs.argmax(axis=1)
    ours = metrics.classification_metrics(labels, probs, classes)

    if num_classes == 2:
        average, auc = {"average": "binary", "pos_label": 1}, sk.roc_auc_score(labels == 1, probs[:, 1])
    else:
        average = {"average": "macro", "labels": list(range(num_classes))}
        auc = sk.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(num_classes)))
    expected = {
        "accuracy": sk.accuracy_score(labels, preds),
        "balanced_accuracy": sk.balanced_accuracy_score(labels, preds),
        "precision": sk.precision_score(labels, preds, zero_division=0, **average),
        "recall": sk.recall_score(labels, preds, zero_division=0, **average),
        "f1": sk.f1_score(labels, preds, zero_division=0, **average),
        "roc_auc": auc,
    }
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    np.testing.assert_array_equal(metrics.confusion(labels, probs, num_classes), sk.confusion_matrix(labels, preds, labels=list(range(num_classes))))


@pytest.mark.parametrize("n, ties, seed", [(n, ties, seed) for n in (5, 80, 500) for ties in (False, True) for seed in (0, 1, 2)])
def test_curves_are_scikit_learns(n, ties, seed):
    rng = np.random.default_rng(seed)
    score = probabilities(rng, n, 2, ties)[:, 1]
    truth = rng.random(n) < 0.4
    truth[:2] = [True, False]
    for ours, theirs in zip(metrics.roc_curve(truth, score), sk.roc_curve(truth, score)):
        np.testing.assert_allclose(ours, theirs)
    curve = metrics.precision_recall_curve(truth, score)
    for ours, theirs in zip(curve, sk.precision_recall_curve(truth, score)):
        np.testing.assert_allclose(ours, theirs)
    assert metrics.average_precision(*curve[:2]) == pytest.approx(sk.average_precision_score(truth, score), abs=1e-12)
    assert metrics.roc_auc(truth, score) == pytest.approx(sk.roc_auc_score(truth, score), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_what_is_undefined_is_said_so():
    labels = np.array([0, 0, 2, 2])  # class 1 absent from the test split
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    out = metrics.classification_metrics(labels, probs, ["a", "b", "c"])
    assert np.isnan(out["roc_auc"])  # one class vs the rest has no curve for the absent class
    preds = probs.argmax(axis=1)
    assert out["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, preds))
    assert out["precision"] == pytest.approx(sk.precision_score(labels, preds, average="macro", labels=[0, 1, 2], zero_division=0))
    same_score = np.array([[0.5, 0.5]] * 4)  # a model that says the same for every image
    assert metrics.roc_auc(np.array([0, 1, 0, 1]) == 1, same_score[:, 1]) == pytest.approx(0.5)
    one_kind = metrics.classification_metrics(np.array([1, 1]), np.array([[0.4, 0.6], [0.1, 0.9]]), ["Negative", "Positive"])
    assert np.isnan(one_kind["roc_auc"]) and one_kind["accuracy"] == 1.0
