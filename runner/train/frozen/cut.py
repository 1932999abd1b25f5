"""Where to cut a Keras classifier so its frozen layers can run once per image: the cut and its graph rewrites.

Frozen layers compute the same thing in every epoch. :func:`cut_after_frozen` splits the
classifier at the last point where nothing trainable comes before it and one tensor crosses
it, into a ``prefix`` that runner.train.frozen.store runs once per image (an inference copy
with BatchNormalization folded into the convolutions, :func:`fold_batch_norm`) and the
classifier's own ``rest``, which trains on the stored output. These read Keras' graph
through private attributes (Keras has no public graph API), which is why they live here,
beside the speed machinery, and not in models/.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from crack_runner.models.keras_backbones import POOL, PREPROCESS


@dataclass(frozen=True)
class CutModel:
    """The classifier cut in two where its frozen layers end.

    ``prefix(pixels)`` is what the frozen layers compute (in inference mode: the activations at
    ``cut``); ``rest(prefix(pixels))`` equals the classifier's output, and training ``rest``
    trains the classifier itself, since it is made of the classifier's own layer objects.
    The prefix, a copy of the frozen layers, is made on first use: a fine-tune run's head phase
    trains on pooled vectors computed another way (:func:`tail_after`) and never needs its own.
    Its layers are frozen, so it copies the same weights whenever it is made.
    """

    rest: keras.Model
    cut: str  # the layer whose output is stored ("pool": the whole base frozen)
    make_prefix: Callable[[], keras.Model]

    @functools.cached_property
    def prefix(self) -> keras.Model:
        return self.make_prefix()


def _last_consumers(base: keras.Model) -> list[int]:
    """Per base layer: the index of the last base layer that reads its output (len(layers): an output of the base)."""
    index = {id(layer): i for i, layer in enumerate(base.layers)}
    last = list(range(len(base.layers)))
    for nodes in base._nodes_by_depth.values():  # Keras has no public graph API
        for node in nodes:
            consumer = index.get(id(node.operation))
            if consumer is None:
                continue
            for tensor in node.input_tensors:
                producer = index[id(tensor._keras_history.operation)]
                last[producer] = max(last[producer], consumer)
    for tensor in base.outputs:
        last[index[id(tensor._keras_history.operation)]] = len(base.layers)
    return last


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of the functional ``model`` for inference, each BatchNormalization folded into the convolution before it.

    In inference mode ``bn(conv(x))`` is ``conv'(x)`` with the kernel scaled per output channel
    by ``gamma / sqrt(variance + epsilon)`` and the bias shifted to match: the same function up
    to float rounding, without a multiply and an add over every activation after each
    convolution (53 of them in ResNet50), and a convolution TensorFlow fuses with its bias,
    residual add and ReLU. The copy has new layers (``model``'s are untouched) and serves only
    to compute frozen features; nothing trains or is saved through it.
    """
    consumers: dict[int, int] = {}
    producer_of: dict[int, keras.Layer] = {}
    for nodes in model._nodes_by_depth.values():  # Keras has no public graph API
        for node in nodes:
            for tensor in node.input_tensors:
                source = tensor._keras_history.operation
                consumers[id(source)] = consumers.get(id(source), 0) + 1
                producer_of[id(node.operation)] = source
    for tensor in model.outputs:
        consumers[id(tensor._keras_history.operation)] = consumers.get(id(tensor._keras_history.operation), 0) + 1
    folds: dict[str, keras.layers.BatchNormalization] = {}  # convolution name -> its BatchNormalization
    for layer in model.layers:
        conv = producer_of.get(id(layer))
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and type(conv) is keras.layers.Conv2D
            and layer.axis in (-1, 3)
            and conv.get_config()["activation"] == "linear"
            and conv.data_format == "channels_last"
            and consumers[id(conv)] == 1
        ):
            folds[conv.name] = layer
    folded_bn = {bn.name for bn in folds.values()}

    def clone(layer: keras.Layer) -> keras.Layer:
        config = layer.get_config()
        if layer.name in folds:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer: keras.Layer, *args, **kwargs):
        return args[0] if layer.name in folded_bn else layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        if layer.name in folded_bn or not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if layer.name not in folds:
            target.set_weights(layer.get_weights())
            continue
        bn = folds[layer.name]
        kernel = np.asarray(layer.kernel, dtype=np.float64)
        bias = np.asarray(layer.bias, dtype=np.float64) if layer.use_bias else 0.0
        channels = kernel.shape[-1]
        gamma = np.asarray(bn.gamma, dtype=np.float64) if bn.scale else np.ones(channels)
        beta = np.asarray(bn.beta, dtype=np.float64) if bn.center else np.zeros(channels)
        mean, variance = np.asarray(bn.moving_mean, dtype=np.float64), np.asarray(bn.moving_variance, dtype=np.float64)
        scale = gamma / np.sqrt(variance + bn.epsilon)
        target.set_weights([(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)])
    return copy


def cut_after_frozen(model: keras.Model, base: keras.Model) -> CutModel | None:
    """Cut ``model`` (models.keras_backbones.build, after freeze) after its frozen layers; None if nothing is worth storing.

    Frozen here means holding no trainable weight: the first ``freeze_depth`` base layers, and
    after them any BatchNormalization or weightless layers up to the first trainable one. With
    the whole base frozen, the cut is after the global pooling (one vector per image). Else it
    is the last layer before the first trainable one whose output is the only tensor that
    crosses from the earlier layers to the later ones (ResNet's skip connections allow a cut
    only at a block's output); frozen layers after that cut run in ``trainable``, still frozen.

    ``rest`` is made of the classifier's own layers, so training it trains the classifier.
    ``prefix`` is an inference copy of the layers before the cut with BatchNormalization folded
    into the convolutions (:func:`fold_batch_norm`): the same values up to float rounding, faster.
    """
    layers = base.layers
    first_trainable = next((i for i, layer in enumerate(layers) if layer.trainable_weights), len(layers))
    whole = first_trainable == len(layers)
    if whole:
        cut = len(layers) - 1
    else:
        last = _last_consumers(base)
        crossing = 0  # max of last[:cut]: the last layer that reads any output of the layers before the cut
        cuts = []
        for index in range(first_trainable):
            if index > 0 and crossing <= index:
                cuts.append(index)
            crossing = max(crossing, last[index])
        cuts = [index for index in cuts if any(layer.weights for layer in layers[: index + 1])]  # before any weights: nothing saved
        if not cuts:
            return None
        cut = cuts[-1]
    if whole:
        rest = keras.Model(model.get_layer(POOL).output, model.outputs[0], name="trainable_part")
    else:
        boundary = layers[cut].output
        suffix = keras.Model(boundary, base.outputs[0])
        head = keras.Model(model.get_layer(POOL).input, model.outputs[0])
        activations = keras.Input(shape=boundary.shape[1:], dtype=boundary.dtype)
        rest = keras.Model(activations, head(suffix(activations)), name="trainable_part")
    return CutModel(rest, POOL if whole else layers[cut].name, functools.partial(_prefix, model, base, None if whole else cut))


def _prefix(model: keras.Model, base: keras.Model, cut: int | None) -> keras.Model:
    """Pixels to the output of base layer ``cut`` (None: the pooled output of the whole base), BatchNormalization folded."""
    pixels = model.inputs[0]
    preprocess = keras.Model(pixels, model.get_layer(PREPROCESS).output)
    frozen = fold_batch_norm(base if cut is None else keras.Model(base.inputs, base.layers[cut].output))
    raw = keras.Input(shape=pixels.shape[1:], dtype=pixels.dtype)
    features = frozen(preprocess(raw))
    if cut is None:
        features = keras.layers.GlobalAveragePooling2D()(features)  # the head's pooling, which has no weights
    return keras.Model(raw, features, name="frozen_part")


def tail_after(base: keras.Model, cut: str) -> keras.Model:
    """The base's layers after ``cut`` and the head's pooling, BatchNormalization folded: for inference only.

    With the whole base frozen, ``tail_after(base, cut)`` applied to the frozen output at
    ``cut`` (a fine-tune phase's cut) gives the pooled vectors :func:`cut_after_frozen` would, up
    to float rounding: so a fine-tune run runs the layers before ``cut`` once per image for
    both of its phases.
    """
    boundary = base.get_layer(cut).output
    suffix = fold_batch_norm(keras.Model(boundary, base.outputs[0]))
    maps = keras.Input(shape=boundary.shape[1:], dtype="float32")
    return keras.Model(maps, keras.layers.GlobalAveragePooling2D()(suffix(maps)), name="frozen_tail")
