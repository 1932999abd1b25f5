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
    """

    def __init__(
        self, image_shape: Sequence[int], num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        features = math.prod(image_shape)
        repeats = features // len(mean)  # channels are the last axis: the pattern repeats per pixel
        mean_t = torch.as_tensor(mean, dtype=torch.float32).repeat(repeats)
        std_t = torch.as_tensor(std, dtype=torch.float32).repeat(repeats)
        # (pixels / 255 - mean) / std = pixels * scale + shift over the flattened image
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)
        self.linear = nn.Linear(features, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # w . (x * scale + shift) + b == (w * scale) . x + (w . shift + b): the normalisation folded
        # into the weights costs 2 x features multiply-adds a batch instead of batch x features.
        weight = self.linear.weight
        return nn.functional.linear(pixels.flatten(1), weight * self.scale, self.linear.bias + weight @ self.shift)
