"""Per-pixel classification heads on a patch grid (B, C, h, w) -> (B, classes, h, w), with analytic MACs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpsvit.errors import InvalidArgumentError


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """Patch tokens (B, h*w, C) in row-major grid order -> a feature map (B, C, h, w)."""
    width = height if width is None else width
    return tokens.transpose(1, 2).reshape(len(tokens), -1, height, width)


class LinearHead(nn.Module):
    """One linear layer per grid cell (a 1x1 convolution)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.proj = nn.Linear(dim, classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> (B, classes, h, w)."""
        return self.proj(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def macs(self, h: int, w: int) -> int:
        """Multiply-accumulates on an h x w grid, per image."""
        return h * w * self.proj.in_features * self.proj.out_features


class ConvHead(nn.Module):
    """A 3x3 convolution to ``hidden`` channels, GELU, then a 1x1 convolution to the classes."""

    def __init__(self, dim: int, classes: int, hidden: int = 64):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(dim, hidden, 3, padding=1), nn.Conv2d(hidden, classes, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> (B, classes, h, w)."""
        return self.conv2(F.gelu(self.conv1(grid)))

    def macs(self, h: int, w: int) -> int:
        """Multiply-accumulates on an h x w grid, per image (zero padding counted as the flop counter does)."""
        conv1, conv2 = self.conv1, self.conv2
        return h * w * (conv1.in_channels * conv1.out_channels * 9 + conv2.in_channels * conv2.out_channels)


HEAD_CLASSES = {"linear": LinearHead, "conv": ConvHead}
HEADS = tuple(HEAD_CLASSES)


def make_head(kind: str, dim: int, classes: int) -> nn.Module:
    """A new head by name: ``"linear"`` (:class:`LinearHead`) or ``"conv"`` (:class:`ConvHead`)."""
    if kind not in HEAD_CLASSES:
        raise InvalidArgumentError(f"seg_head={kind!r} is not allowed; expected one of {', '.join(HEADS)}")
    return HEAD_CLASSES[kind](dim, classes)


def head_kind(head: nn.Module) -> str:
    """The name :func:`make_head` builds ``head`` from."""
    for kind, cls in HEAD_CLASSES.items():
        if isinstance(head, cls):
            return kind
    raise InvalidArgumentError(f"{type(head).__name__} is not a tpsvit dense head; allowed: {', '.join(HEADS)}")
