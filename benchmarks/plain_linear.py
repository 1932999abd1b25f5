"""The capstone's PyTorch linear classifier, written the plain way (the benchmark's baseline).

A Dataset that opens, decodes and normalises each image with PIL in ``__getitem__``, every
epoch, behind a DataLoader; ``nn.Linear`` over the flattened image, SGD, cross-entropy.
It is deliberately the notebook's shape, not the runner's: no decode cache, no tracking.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class CrackDataset(Dataset):
    """Positive/Negative files, decoded per item (ToTensor + Normalize done by hand: no torchvision here)."""

    def __init__(self, files: list[Path], labels: list[int], size: int) -> None:
        self.files, self.labels, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.files[index]).convert("RGB").resize((self.size, self.size))
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), self.labels[index]


def train(files: list[Path], labels: list[int], size: int, epochs: int, batch_size: int, lr: float) -> list[float]:
    """Train for ``epochs``; returns the seconds of each epoch."""
    torch.manual_seed(0)
    loader = DataLoader(CrackDataset(files, labels, size), batch_size=batch_size, shuffle=True)
    model = nn.Linear(size * size * 3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x.view(x.shape[0], -1)), y)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds
