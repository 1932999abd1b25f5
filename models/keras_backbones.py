"""The capstone's Keras models: a ``keras.applications`` base (ResNet50, VGG16) with a new head.

Built as in the Keras transfer-learning guide: the base without its top, then global
average pooling, an optional hidden Dense layer, dropout and a softmax over the classes.
The base's BatchNormalization layers always run in inference mode (see :func:`freeze`).

The model takes raw pixels, float32 (N, H, W, 3) with values 0..255 (the input of the torch
model too), and applies the base's own ``preprocess_input`` inside. Everything in it is a
built-in Keras layer, so the saved model loads in any process without this project's code.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from runner.config import KerasBackboneConfig
from runner.errors import ConfigError


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` constructor and the preprocessing its ImageNet weights expect."""

    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[[np.ndarray], np.ndarray]


BACKBONES = {
    "resnet50": Backbone(keras.applications.ResNet50, keras.applications.resnet50.preprocess_input),
    "vgg16": Backbone(keras.applications.VGG16, keras.applications.vgg16.preprocess_input),
}


def backbone(name: str) -> Backbone:
    """The backbone called ``name`` (the ``model.name`` of conf/model/<name>.yaml)."""
    if name not in BACKBONES:
        raise ConfigError(f"model.name: no Keras backbone named {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_base(name: str, weights: str | None, input_shape: tuple[int, int, int]) -> keras.Model:
    """The base without its top, initialised as ``model.weights`` says.

    ``imagenet``: Keras' ImageNet weights (downloaded once into ~/.keras/models); None: random;
    anything else: the path of a weights file of this base without its top, loaded into the
    base (the ``*_notop.h5`` file Keras downloads, or ``base.save_weights(...)`` output).
    Weights that cannot be had are a ConfigError naming ``model.weights`` and the fix.
    """
    constructor = backbone(name).constructor
    if weights is None:
        return constructor(include_top=False, weights=None, input_shape=input_shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as err:  # keras.utils.get_file raises a bare Exception when the download fails
            raise ConfigError(
                f"model.weights=imagenet: the ImageNet weights of {name} could not be downloaded ({err}). "
                f"Set model.weights=null (random init) or model.weights=/path/to/a local {name} weights file "
                "without the top (e.g. the *_notop.h5 file copied from ~/.keras/models of a machine with a network)."
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.weights: no weights file at {str(path)!r}. Give the path of a {name} weights file without "
            "the top (*_notop.h5 or *.weights.h5), or model.weights=imagenet, or model.weights=null (random init)."
        )
    base = constructor(include_top=False, weights=None, input_shape=input_shape)
    try:
        with warnings.catch_warnings():
            # Keras only warns about parts of a file that match no layer and keeps their random
            # weights; a file that fits the base only in part is as wrong as one that does not fit.
            warnings.simplefilter("error", UserWarning)
            base.load_weights(path)
    except (ValueError, OSError, UserWarning) as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"model.weights: {str(path)!r} does not hold weights of the {name} base without its top ({reason}). "
            f"Use a {name} *_notop.h5 / *.weights.h5 file, or model.weights=imagenet, or model.weights=null."
        ) from None
    return base


def preprocessing_layer(preprocess_input: Callable[[np.ndarray], np.ndarray]) -> keras.layers.Dense:
    """``preprocess_input`` as a frozen Dense layer over each pixel's channels.

    The ``preprocess_input`` of these backbones (Keras' 'caffe' mode: RGB to BGR, minus the
    ImageNet mean) is an affine map of each pixel's channels, read off here by applying it to
    a black pixel and one unit per channel. A built-in layer holding it, unlike a Lambda or
    custom layer, needs no Python code of this project to be deserialised.
    """
    basis = np.vstack([np.zeros(3), np.eye(3)])[None, None]  # (1, 1, 4, 3): black, then red, green, blue
    mapped = np.asarray(preprocess_input(basis.copy()), dtype=np.float64)[0, 0]  # it may work in place
    bias, kernel = mapped[0], mapped[1:] - mapped[0]  # kernel row c: what one unit of input channel c adds
    probe = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3))
    if not np.allclose(preprocess_input(probe.copy()), probe @ kernel + bias, atol=1e-3):
        raise ValueError(f"{preprocess_input.__module__}.preprocess_input is not a per-pixel affine map")
    layer = keras.layers.Dense(3, name="preprocess_input", trainable=False)
    layer.build((None, 3))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer


POOL = "pool"  # the head's first layer: global average pooling of the base's output
PREPROCESS = "preprocess_input"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Layers built inside get the dtype policy ``name`` (``keras.applications`` constructors take none); restored after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build(
    cfg: KerasBackboneConfig, input_shape: tuple[int, int, int], num_classes: int, policy: str = "float32"
) -> tuple[keras.Model, keras.Model]:
    """The classifier (raw pixels in, class probabilities out) and its base, which the trainer freezes.

    ``policy``: Keras' dtype policy of every layer, e.g. ``mixed_bfloat16`` (bfloat16 compute,
    float32 weights), but for the softmax, kept in float32 as the mixed-precision guide says.
    """
    with dtype_policy(policy):
        base = load_base(cfg.name, cfg.weights, input_shape)
        pixels = keras.Input(shape=input_shape, dtype="float32", name="pixels")
        x = preprocessing_layer(backbone(cfg.name).preprocess_input)(pixels)
        x = base(x, training=False)  # as in the guide; what keeps BatchNormalization in inference mode is freeze()
        x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
        if cfg.head_units:
            x = keras.layers.Dense(cfg.head_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
        probabilities = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=f"{cfg.name}_classifier"), base


def frozen_layer_count(base: keras.Model, freeze_depth: int | None) -> int:
    """How many base layers, from the input, ``freeze_depth`` freezes (None: all of them).

    Checked before any training so that a wrong value fails at once, not after phase 1.
    """
    count = len(base.layers)
    if freeze_depth is None:
        return count
    if not 0 <= freeze_depth <= count:
        raise ConfigError(
            f"freeze_depth: must be in 0..{count} (or null to freeze the whole base), got {freeze_depth}: "
            f"the {base.name} base has {count} layers."
        )
    return freeze_depth


def freeze(base: keras.Model, frozen: int) -> None:
    """Freeze the first ``frozen`` layers of ``base``; make the rest trainable, except BatchNormalization.

    The guide keeps BatchNormalization in inference mode by calling the base with
    ``training=False``, but Keras 3's ``fit`` passes ``training=True`` down into nested models
    over it (keras-team/keras#20285): a BatchNormalization layer runs in inference mode only
    while it is not trainable. So these layers stay frozen wherever they are, keeping their
    pre-trained statistics, scale and offset. Recompile the model after calling this.
    """
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= frozen and not isinstance(layer, keras.layers.BatchNormalization)


@dataclass(frozen=True)
class FrozenSplit:
    """The classifier cut in two where its frozen part ends, made of the classifier's own layers.

    ``frozen(pixels)`` is what the frozen layers compute (in inference mode: the activations at
    ``cut``); ``trainable(frozen(pixels))`` equals the classifier's output, and training
    ``trainable`` trains the classifier itself, since they share the layer objects and weights.
    """

    frozen: keras.Model
    trainable: keras.Model
    cut: str  # the layer whose output is cached ("pool": the whole base frozen)


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


def split_frozen(model: keras.Model, base: keras.Model) -> FrozenSplit | None:
    """Split ``model`` (from :func:`build`, after :func:`freeze`) after its frozen part; None if nothing is worth caching.

    Frozen here means holding no trainable weight: the first ``freeze_depth`` base layers, and
    after them any BatchNormalization or weightless layers up to the first trainable one. With
    the whole base frozen, the cut is after the global pooling (one vector per image). Else it
    is the last layer before the first trainable one whose output is the only tensor that
    crosses from the earlier layers to the later ones (ResNet's skip connections allow a cut
    only at a block's output); frozen layers after that cut run in ``trainable``, still frozen.

    ``trainable`` is made of the classifier's own layers, so training it trains the classifier.
    ``frozen`` is an inference copy of the layers before the cut with BatchNormalization folded
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
    pixels = model.inputs[0]
    preprocess = keras.Model(pixels, model.get_layer(PREPROCESS).output)
    prefix = fold_batch_norm(base if whole else keras.Model(base.inputs, layers[cut].output))
    raw = keras.Input(shape=pixels.shape[1:], dtype=pixels.dtype)
    features = prefix(preprocess(raw))
    if whole:
        features = keras.layers.GlobalAveragePooling2D()(features)  # the head's pooling, which has no weights
        trainable = keras.Model(model.get_layer(POOL).output, model.outputs[0], name="trainable_part")
    else:
        boundary = layers[cut].output
        suffix = keras.Model(boundary, base.outputs[0])
        head = keras.Model(model.get_layer(POOL).input, model.outputs[0])
        activations = keras.Input(shape=boundary.shape[1:], dtype=boundary.dtype)
        trainable = keras.Model(activations, head(suffix(activations)), name="trainable_part")
    return FrozenSplit(keras.Model(raw, features, name="frozen_part"), trainable, POOL if whole else layers[cut].name)


def frozen_tail(base: keras.Model, cut: str) -> keras.Model:
    """The base's layers after ``cut`` and the head's pooling, BatchNormalization folded: for inference only.

    With the whole base frozen, ``frozen_tail(base, cut)`` applied to the frozen output at
    ``cut`` (a fine-tune phase's cut) gives the pooled vectors :func:`split_frozen` would, up
    to float rounding: so a fine-tune run runs the layers before ``cut`` once per image for
    both of its phases.
    """
    boundary = base.get_layer(cut).output
    suffix = fold_batch_norm(keras.Model(boundary, base.outputs[0]))
    maps = keras.Input(shape=boundary.shape[1:], dtype="float32")
    return keras.Model(maps, keras.layers.GlobalAveragePooling2D()(suffix(maps)), name="frozen_tail")
