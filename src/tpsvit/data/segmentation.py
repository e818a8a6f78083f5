"""Segmentation on the cluttered canvas: per-pixel labels from the same generator as the classifier's images.

A pixel is labelled with its garment's class + 1 where the garment alone covers it (value > ``threshold``), and 0
(background) elsewhere; clutter counts as background. Classes: 0 background, 1..10 the Fashion-MNIST classes, so
mIoU is over 11 classes. The images are exactly :class:`~tpsvit.data.datasets.ClutteredFashionMNIST`'s fixed
compositions (test split: the benchmark; training split: the fixed training view), so the same train/test split.
"""

from __future__ import annotations

import os

import torch

from tpsvit.data.cluttered import TEST_SEED, TRAIN_VIEW_SEED, ClutterSpec, compose_fixed_layers
from tpsvit.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST, normalize_uint8

SEG_CLASSES = ("background", *FASHION_MNIST_CLASSES)
GARMENT_THRESHOLD = 25  # uint8: fainter garment pixels (antialiased edges) count as background


def segmentation_split(train: bool, root: str | os.PathLike | None = None, limit: int | None = None,
                       spec: ClutterSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised images (N, 1, S, S), pixel labels (N, S, S) long in 0..10, image labels (N,)) of a split."""
    split = FashionMNIST(root, train=train)
    spec = spec or ClutterSpec()
    canvases, alone = compose_fixed_layers(split.images, TRAIN_VIEW_SEED if train else TEST_SEED, spec)
    canvases, alone, labels = canvases[:limit], alone[:limit], split.labels[:limit]
    pixels = torch.where(alone > GARMENT_THRESHOLD, labels[:, None, None] + 1, 0)
    return normalize_uint8(canvases), pixels, labels


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int = len(SEG_CLASSES)) -> torch.Tensor:
    """(classes, classes) counts, rows the true class: add them over batches, then :func:`miou`."""
    return torch.bincount(target.flatten() * classes + pred.flatten(), minlength=classes * classes).view(classes, -1)


def miou(counts: torch.Tensor) -> tuple[float, float]:
    """(mean IoU over the classes present in the targets or predictions, pixel accuracy), in percent."""
    counts = counts.double()
    hit = counts.diag()
    union = counts.sum(0) + counts.sum(1) - hit
    present = union > 0
    return float(100 * (hit[present] / union[present]).mean()), float(100 * hit.sum() / counts.sum())
