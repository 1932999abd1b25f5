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
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.linear = nn.Linear(math.prod(image_shape), num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels / 255.0 - self.mean) / self.std
        return self.linear(x.flatten(1))
