"""Pictures of what a trained model looks at, logged beside its scores.

- The linear model (torch): its weights per class drawn as images, the template each class's
  score matches (one weight per pixel and channel, so they can be shown as they are).
- Keras models: Grad-CAM (Selvaraju et al., 2017) over a few test images, correct and wrong:
  the gradient of the predicted class's logit with respect to a late feature map of the base,
  averaged per channel, weighs those channels into a heatmap of where the evidence lies.

Neither framework is imported here unless the model is of it, so a linear run still never
imports TensorFlow and a Keras run never imports torch.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from crack_runner.datasets import DataSplits
from runner.report import plots

GRADCAM_PER_KIND = 4  # test images shown of each kind: correct, wrong
MIN_CELLS = 7  # a heatmap layer's least height: the last block's map at 224 px (ResNet50, VGG16)


def explanation_figures(model: Any, data: DataSplits, probs: np.ndarray, names: list[str]) -> list[tuple[str, Figure]]:
    """(artifact name, figure) of the pictures that explain ``model`` (a trainer's TrainedModel); none for other models.

    ``probs``: the model's test probabilities, ``names``: the test files as the other plots name them.
    """
    module = getattr(model, "module", None)  # runner.train.torch_trainer.TorchModel
    if module is not None and hasattr(module, "linear"):
        weights = module.linear.weight.detach().float().cpu().numpy().reshape(len(data.classes), *data.image_shape)
        return [("plots/linear_weights.png", plots.linear_weights_figure(weights, data.classes))]
    keras = sys.modules.get("keras")
    network = getattr(model, "model", None)  # runner.train.keras_trainer.KerasModel
    if keras is not None and isinstance(network, keras.Model):
        chosen = pick_examples(data.test.labels, probs, GRADCAM_PER_KIND)
        images = np.asarray(data.test.images[chosen])
        heatmaps, layer = grad_cam(network, images, probs[chosen].argmax(axis=1))
        figure = plots.gradcam_grid(images, heatmaps, data.test.labels[chosen], probs[chosen], data.classes,
                                    [names[i] for i in chosen], layer)
        return [("plots/grad_cam.png", figure)]
    return []


def pick_examples(labels: np.ndarray, probs: np.ndarray, per_kind: int) -> np.ndarray:
    """Indices of up to ``per_kind`` correct predictions (taking each true class in turn, most confident first),
    then up to ``per_kind`` wrong ones (most confident first: the mistakes worth a look)."""
    preds = probs.argmax(axis=1)
    order = np.argsort(-probs.max(axis=1), kind="stable")
    correct = order[preds[order] == labels[order]]
    wrong = order[preds[order] != labels[order]][:per_kind]
    per_class = [correct[labels[correct] == c] for c in np.unique(labels[correct])]
    taking_turns = [i for group in itertools.zip_longest(*per_class) for i in group if i is not None][:per_kind]
    return np.asarray([*taking_turns, *wrong], dtype=np.int64)


def heatmap_layer(base: Any) -> str:
    """The deepest layer of ``base`` whose output is a feature map at least ``MIN_CELLS`` high.

    At 224 px that is the base's last block (the layer Grad-CAM usually takes); at smaller
    inputs the last block's map has a cell or two, so an earlier block's map is drawn instead.
    """
    for layer in reversed(base.layers):
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] is not None and shape[1] >= MIN_CELLS:
            return layer.name
    return base.layers[-1].name


def grad_cam(model: Any, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, str]:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] of class ``targets[i]`` for each image, and the layer they come from.

    ``model``: a classifier of ``models.keras_backbones.build`` (pixels, preprocessing, base, head
    ending in a softmax Dense layer). The class score is the logit before that softmax, whose
    gradient does not vanish on confident predictions as the probability's does.
    """
    import keras
    import tensorflow as tf

    from crack_runner.models.keras_backbones import POOL, PREPROCESS

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    layer = heatmap_layer(base)
    preprocess = keras.Model(model.inputs[0], model.get_layer(PREPROCESS).output)
    inner = keras.Model(base.inputs[0], [base.get_layer(layer).output, base.outputs[0]])
    output = model.layers[-1]  # Dense(classes, softmax)
    penultimate = keras.Model(model.get_layer(POOL).input, output.input)
    x = preprocess(images.astype(np.float32), training=False)
    with tf.GradientTape() as tape:
        maps, features = inner(x, training=False)
        hidden = tf.cast(penultimate(features, training=False), tf.float32)
        logits = tf.matmul(hidden, tf.cast(output.kernel, tf.float32)) + tf.cast(output.bias, tf.float32)
        score = tf.gather(logits, tf.constant(targets, dtype=tf.int32), axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(score, maps), tf.float32)
    maps = tf.cast(maps, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), layer
