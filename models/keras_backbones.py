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
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from crack_runner.models.errors import ModelError


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` constructor, the preprocessing its ImageNet weights expect, and where Keras gets those."""

    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[[np.ndarray], np.ndarray]
    imagenet_url: str  # the base's weights without the top; Keras keeps them in ~/.keras/models under the URL's file name


KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications"
BACKBONES = {
    "resnet50": Backbone(
        keras.applications.ResNet50, keras.applications.resnet50.preprocess_input,
        f"{KERAS_WEIGHTS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "vgg16": Backbone(
        keras.applications.VGG16, keras.applications.vgg16.preprocess_input,
        f"{KERAS_WEIGHTS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
}


def backbone(name: str) -> Backbone:
    """The backbone called ``name`` (the ``model.name`` of conf/model/<name>.yaml)."""
    if name not in BACKBONES:
        raise ModelError(f"model.name: no Keras backbone named {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_weights(name: str, weights: str | None) -> None:
    """Find weights that cannot be had before anything is built or logged: a ModelError naming the fix.

    ``imagenet``: in Keras' cache, or its download answers (a HEAD request); a path: a file there.
    Whether a file fits the base is known only when it is loaded (:func:`load_base`).
    """
    if weights is None:
        return
    if weights != "imagenet":
        _weights_file(name, weights)
        return
    url = backbone(name).imagenet_url
    cached = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise _no_imagenet(name, f"{url} does not answer: {getattr(err, 'reason', err)}") from None


def _no_imagenet(name: str, why: str) -> ModelError:
    return ModelError(
        f"model.weights=imagenet: the ImageNet weights of {name} could not be downloaded ({why}). "
        f"Set model.weights=null (random init) or model.weights=/path/to/a local {name} weights file "
        "without the top (e.g. the *_notop.h5 file copied from ~/.keras/models of a machine with a network)."
    )


def _weights_file(name: str, weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.weights: no weights file at {str(path)!r}. Give the path of a {name} weights file without "
            "the top (*_notop.h5 or *.weights.h5), or model.weights=imagenet, or model.weights=null (random init)."
        )
    return path


def load_base(name: str, weights: str | None, input_shape: tuple[int, int, int]) -> keras.Model:
    """The base without its top, initialised as ``model.weights`` says.

    ``imagenet``: Keras' ImageNet weights (downloaded once into ~/.keras/models); None: random;
    anything else: the path of a weights file of this base without its top, loaded into the
    base (the ``*_notop.h5`` file Keras downloads, or ``base.save_weights(...)`` output).
    Weights that cannot be had are a ModelError naming ``model.weights`` and the fix.
    """
    constructor = backbone(name).constructor
    if weights is None:
        return constructor(include_top=False, weights=None, input_shape=input_shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as err:  # keras.utils.get_file raises a bare Exception when the download fails
            raise _no_imagenet(name, str(err)) from None
    path = _weights_file(name, weights)
    base = constructor(include_top=False, weights=None, input_shape=input_shape)
    try:
        with warnings.catch_warnings():
            # Keras only warns about parts of a file that match no layer and keeps their random
            # weights; a file that fits the base only in part is as wrong as one that does not fit.
            warnings.simplefilter("error", UserWarning)
            base.load_weights(path)
    except (ValueError, OSError, UserWarning) as err:
        reason = str(err).strip().splitlines()[0]
        raise ModelError(
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
PREPROCESS = "preprocess_input"  # the layer that applies the base's preprocess_input


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
    name: str,
    weights: str | None,
    input_shape: tuple[int, int, int],
    num_classes: int,
    head_units: int = 256,
    dropout: float = 0.5,
    policy: str = "float32",
) -> tuple[keras.Model, keras.Model]:
    """The classifier (raw pixels in, class probabilities out) and its base, which the trainer freezes.

    ``policy``: Keras' dtype policy of every layer, e.g. ``mixed_bfloat16`` (bfloat16 compute,
    float32 weights), but for the softmax, kept in float32 as the mixed-precision guide says.
    """
    with dtype_policy(policy):
        base = load_base(name, weights, input_shape)
        pixels = keras.Input(shape=input_shape, dtype="float32", name="pixels")
        x = preprocessing_layer(backbone(name).preprocess_input)(pixels)
        x = base(x, training=False)  # as in the guide; what keeps BatchNormalization in inference mode is freeze()
        x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
        if head_units:
            x = keras.layers.Dense(head_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
        probabilities = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=f"{name}_classifier"), base


def frozen_layer_count(base: keras.Model, freeze_depth: int | None) -> int:
    """How many base layers, from the input, ``freeze_depth`` freezes (None: all of them).

    Checked before any training so that a wrong value fails at once, not after phase 1.
    """
    count = len(base.layers)
    if freeze_depth is None:
        return count
    if not 0 <= freeze_depth <= count:
        raise ModelError(
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
