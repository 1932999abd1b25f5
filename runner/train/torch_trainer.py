"""The PyTorch trainer: a plain loop in the style of torchvision's reference scripts."""

from __future__ import annotations

import io
import logging
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crack_runner.datasets import DataSplits, Split, stopping
from crack_runner.models.linear import LinearClassifier
from runner.config.schema import OPTIMIZERS, PRECISIONS, AugmentConfig, OptimizerConfig, RunConfig
from runner.track.safe_load import UnreadableCheckpoint
from runner.track.tracking import Tracker
from runner.train.augment import augment
from runner.train.class_weights import class_weights
from runner.train.epochs import Epochs

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
CHECKPOINT_KEYS = frozenset({"epoch", "model", "optimizer", "shuffle_rng", "torch_rng"})  # what save_checkpoint writes


def versions() -> dict[str, str]:
    return {"framework": "torch", "torch_version": torch.__version__}


def seed(value: int) -> None:
    torch.manual_seed(value)


def check(run: RunConfig) -> None:
    """Nothing to find before a run opens: the linear model needs no files."""


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for the forward passes when ``dtype`` is bfloat16: matrix products in it, weights float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@dataclass
class TorchModel:
    """A trained module with what evaluation and MLflow need; ``dtype``: what it computes in (trainer.precision)."""

    module: nn.Module
    device: torch.device
    batch_size: int
    dtype: torch.dtype
    history: list[dict[str, Any]]

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Float64 probabilities, so that the test loss of a confidently wrong answer is not capped by float32's smallest number.

        Batches are converted into one buffer, as :class:`Batches` does: a fresh float batch
        each step left the memory allocator holding about the split's size again in floats.
        """
        self.module.eval()
        out = []
        floats = torch.empty((min(self.batch_size, len(images)), *images.shape[1:]), dtype=self.dtype, device=self.device)
        for i in range(0, len(images), self.batch_size):
            batch = floats[: len(images[i : i + self.batch_size])].copy_(torch.from_numpy(np.asarray(images[i : i + self.batch_size])))
            with autocast(self.device, self.dtype):
                logits = self.module(batch)
            out.append(torch.softmax(logits.double(), 1).cpu())
        return torch.cat(out).numpy()

    def log_model(self, tracker: Tracker, example: np.ndarray) -> str:
        """Log with mlflow.pytorch: the module plus a softmax, so pyfunc predicts class probabilities.

        Saved as a torch.export program (pt2), so loading needs no project code and no pickle
        (MLflow's default pickles it when the store is Databricks'); the export traces the model
        on the input example, which MLflow then need not validate.
        It computes in float32 whatever ``trainer.precision`` the run trained in.
        """
        probabilities = nn.Sequential(self.module, nn.Softmax(dim=1)).cpu().eval()
        example = example.astype(np.float32)

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return probabilities(torch.from_numpy(x)).numpy()

        return tracker.log_model(
            "pytorch",
            probabilities,
            example,
            predict,
            requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            # A tuple of one array: what torch.export traces, and no JSON copy of it beside the model
            # (MLflow saves no tuple as an example; a bare array became two files of megabytes of pixels).
            input_example=(example,),
            serialization_format="pt2",
        )


def build_optimizer(cfg: OptimizerConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer group's torch optimizer (config.OPTIMIZERS); weight decay added to the gradient."""
    name, arguments = OPTIMIZERS[cfg.name]["torch"]
    return getattr(torch.optim, name)(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **arguments(cfg))


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of pixels scaled to [0, 1] (the linear model's normalisation).

    From a 256-bin histogram per channel of at most 256 evenly spaced images: exact for
    those, and seconds faster than float sums over every pixel of a large training split
    (0.03 s for 256 images at 227 px).
    """
    sample = images[:: max(1, len(images) // 256)]
    pixels = torch.from_numpy(np.ascontiguousarray(sample)).view(-1, images.shape[-1])
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for channel in range(images.shape[-1]):  # torch counts uint8 as it is (numpy's bincount casts each to int64 first)
        counts = torch.bincount(pixels[:, channel].contiguous(), minlength=256).numpy()
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (values - m) ** 2 / counts.sum()))
    return np.asarray(mean, dtype=np.float32), np.maximum(np.asarray(std), 1e-3).astype(np.float32)


class Batches:
    """Mini-batches of a decoded split as ``dtype`` on ``device``, gathered by index in one step.

    The pixels are already in memory as one uint8 tensor, so a batch is a single indexing
    operation instead of a DataLoader collating image by image. Each batch is gathered and
    converted into buffers allocated once: a fresh 60 MB float tensor per batch costs more in
    page faults than the conversion itself (17 ms against 2 ms for 100 images at 227 px), so
    a yielded batch is overwritten by the next one. ``dtype``: float32, or bfloat16 under
    bf16-mixed (exact for 0..255, half the bytes). ``shuffle``: a generator that draws a new
    order every epoch (its state goes into checkpoints). ``augment``: training batches are
    changed at random (runner.train.augment) with a seed per batch drawn from ``shuffle``.
    """

    def __init__(
        self, split: Split, batch_size: int, device: torch.device, dtype: torch.dtype, shuffle: torch.Generator | None = None,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.images, self.labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.augment = augment if augment is not None and augment.enabled and shuffle is not None else None
        shape = (min(batch_size, len(self.labels)), *self.images.shape[1:])
        self.pixels = torch.empty(shape, dtype=torch.uint8)
        self.floats = torch.empty(shape, dtype=dtype, device=device)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.shuffle) if self.shuffle is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            pixels = torch.index_select(self.images, 0, index, out=self.pixels[: len(index)])
            if self.augment is not None:
                seed = int(torch.randint(2**62, (1,), generator=self.shuffle))
                pixels = torch.from_numpy(augment(pixels.numpy(), seed, self.augment))
            yield self.floats[: len(index)].copy_(pixels), self.labels[index].to(self.device)


def train_one_epoch(
    model: nn.Module, loader: Batches, optimizer: torch.optim.Optimizer, desc: str, progress: bool, epochs: Epochs,
    weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One pass over the training split; returns mean loss and accuracy. ``weights``: per class, in the loss (trainer.class_weights)."""
    model.train()
    criterion = nn.CrossEntropyLoss(weight=weights)
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        stopping.check()
        with autocast(loader.device, images.dtype):
            logits = model(images).float()
        loss = criterion(logits, labels)
        epochs.check_finite("training loss", loss.item(), f"during {desc}", "optimizer.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches) -> tuple[float, float]:
    """Mean loss and accuracy over a split, in eval mode."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        with autocast(loader.device, images.dtype):
            logits = model(images).float()
        total_loss += criterion(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator, epoch: int
) -> None:
    """Everything needed to continue exactly after ``epoch`` (weights, optimizer, RNGs)."""
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "shuffle_rng": shuffle.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    buffer = io.BytesIO()  # serialised first: torch turns a failed file write into an opaque RuntimeError
    torch.save(state, buffer)
    path.write_bytes(buffer.getbuffer())


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True``: tensors and plain values, never code.

    A resumed run's checkpoints come from its store, which others may write: one that is
    truncated, damaged or pickles objects is an UnreadableCheckpoint naming it.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpoint(path, weights_only_refusal(err)) from None
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise UnreadableCheckpoint(path, err) from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise UnreadableCheckpoint(path, f"it does not hold {', '.join(sorted(CHECKPOINT_KEYS))}")
    return state


TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def weights_only_refusal(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to load the file unsafely or allow its globals."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(err).splitlines()]
    said = next((line for line in lines if line and not line.startswith(TORCH_ADVICE)), "more than tensors and plain values")
    return f"torch.load(weights_only=True) refused it: {said.split('. Please')[0].rstrip('.')}"


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the epoch it ended."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    shuffle.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


def fit(run: RunConfig, data: DataSplits, tracker: Tracker, epochs: Epochs, resume_from: Path | None = None) -> TorchModel:
    """Train the linear classifier, closing each epoch (metrics, checkpoint) through ``epochs``.

    ``resume_from``: a folder with the ``last.pt`` of an interrupted run; training goes on
    after its epoch and ends with the same weights as an uninterrupted run.
    """
    torch.set_num_threads(run.trainer.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = channel_stats(data.train.images)
    model = LinearClassifier(data.image_shape, len(data.classes), mean, std).to(device)
    optimizer = build_optimizer(run.optimizer, model.parameters())
    tracker.log_params({"device": device.type, "trainable_params": sum(p.numel() for p in model.parameters())})
    shuffle = torch.Generator().manual_seed(run.seed)
    dtype = getattr(torch, PRECISIONS[run.trainer.precision]["torch"])
    train_loader = Batches(data.train, run.trainer.batch_size, device, dtype, shuffle, run.augment)
    val_loader = Batches(data.val, run.trainer.batch_size, device, dtype)
    done = load_checkpoint(resume_from / CHECKPOINT, model, optimizer, shuffle) if resume_from else 0
    epochs.rewind(done, resume_from)
    total = run.trainer.epochs
    weights = class_weights(data.train.labels, data.classes, run.trainer.class_weights, tracker)
    weights = None if weights is None else torch.from_numpy(weights).to(device)
    for epoch in range(done + 1, done + epochs.left("train", total) + 1):  # none when early stopping had ended the run
        rate = epochs.begin("train", run.optimizer.lr, total)
        for group in optimizer.param_groups:
            group["lr"] = rate
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, f"epoch {epoch}/{total}", run.trainer.progress, epochs, weights)
        val_loss, val_acc = evaluate(model, val_loader)
        if epochs.end(
            epoch,
            {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc},
            lambda path: save_checkpoint(path, model, optimizer, shuffle, epoch),
        ):
            break
    epochs.finish(lambda path: model.load_state_dict(read_checkpoint(path, device)["model"]))
    return TorchModel(model, device, run.trainer.batch_size, dtype, epochs.history)
