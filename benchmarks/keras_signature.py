"""The cost of the one prediction that gives a logged Keras model its MLflow signature.

``model.predict`` traces a graph of the whole network before it computes anything; calling the
model once, eagerly, gives the same output. Run: ``python benchmarks/keras_signature.py [resnet50|vgg16] [size]``.
"""

from __future__ import annotations

import sys
import time

from runner.train import keras_trainer  # noqa: F401,I001  (first: it puts Keras on TensorFlow)
import keras
import numpy as np

from crack_runner.models.keras_backbones import build


def main(name: str = "resnet50", size: int = 32) -> None:
    model, _ = build(name, None, (size, size, 3), 2)
    example = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    for label, predict in (
        ("one eager call", lambda m: keras.ops.convert_to_numpy(m([example], training=False))),  # first: no kernel warmed for it
        ("model.predict", lambda m: m.predict(example, verbose=0)),
    ):
        inference = keras.Model(model.inputs, model.outputs, name=model.name)  # a fresh model each, as log_model makes
        start = time.perf_counter()
        out = predict(inference)
        print(f"{name} at {size} px, {label}: {time.perf_counter() - start:.2f} s, output {out.shape} {out.dtype}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet50", int(sys.argv[2]) if len(sys.argv) > 2 else 32)
