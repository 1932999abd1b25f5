"""The capstone's PyTorch model: one linear layer over the flattened, normalised image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LinearClassifier(nn.Module):
    """Logits from raw pixels.

    Input: float images (N, H, W, C) with values 0..255, the layout both frameworks share.
    Normalisation (per-channel mean and std of the training split) lives in buffers of
    the module, so the logged model takes raw pixels and nobody re-types the preprocessing.

    The normalised pixels are also divided by sqrt(number of inputs): a gradient step then
    moves the logits by about ``lr`` whatever the image size, where on raw normalised pixels
    it moves them by lr x 154,587 at 227 px (why SGD at 0.1 there ends with losses in the
    hundreds). A rate of the runner is a rate of the capstone's model times the number of
    inputs: the capstone's SGD 0.1 is optimizer.lr=15458.7 here, this runner's 0.1 is 6.5e-7 there.
    """

    def __init__(
        self, image_shape: Sequence[int], num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        features = math.prod(image_shape)
        self.pixels = features // len(mean)  # channels are the last axis: the per-channel pattern repeats per pixel
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        # ((pixels / 255 - mean) / std) / sqrt(features) = pixels * scale + shift, per channel
        # (kept per channel: per input they would double the size of the model and its checkpoints)
        root = math.sqrt(features)
        self.register_buffer("scale", 1.0 / (255.0 * std_t * root))
        self.register_buffer("shift", -mean_t / (std_t * root))
        self.linear = nn.Linear(features, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # w . (x * scale + shift) + b == (w * scale) . x + (w . shift + b): the normalisation folded
        # into the weights costs 2 x features multiply-adds a batch instead of batch x features.
        weight = self.linear.weight
        scale, shift = self.scale.repeat(self.pixels), self.shift.repeat(self.pixels)
        return nn.functional.linear(pixels.flatten(1), weight * scale, self.linear.bias + weight @ shift)
