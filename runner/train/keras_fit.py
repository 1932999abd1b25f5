"""``model.fit`` with Keras' training step traced once per compile instead of twice.

``tf.function`` traces a function a second time when its first trace made variables, and
Keras makes some inside its first training step: the optimizer's slots and the state of the
compiled loss and metrics. A second trace of a deep base's step (all of ResNet50 and its
gradients) is wasted work, so :func:`fit` makes that state beforehand, eagerly, from a zero
prediction: no layer runs, no weight, statistic or random state moves, and the metrics it
touched are reset. The training itself is ``model.fit``'s, unchanged. Which state Keras makes
lazily is Keras' own business: tests/test_keras.py and tests/test_best_model_keras.py count the
traces, so a Keras release that makes more fails there, not silently.
"""

from __future__ import annotations

from typing import Any

import keras


def fit(model: keras.Model, train: Any, **fit_args: Any) -> keras.callbacks.History:
    """``model.fit(train, **fit_args)`` of a compiled single-output classifier of sparse integer labels (as the
    trainers' datasets give them), its step traced once."""
    y = keras.ops.zeros((1,), dtype="int32")
    y_pred = keras.ops.zeros((1, model.output_shape[-1]))
    model.compute_loss(y=y, y_pred=y_pred)
    model.compute_metrics(None, y, y_pred, sample_weight=None)
    model.reset_metrics()
    if not model.optimizer.built:  # a resume may have built it already, to restore its state
        model.optimizer.build(model.trainable_variables)
    return model.fit(train, **fit_args)
