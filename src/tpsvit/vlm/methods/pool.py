"""pool: 2-D average pooling of the patch grid to an a x b grid with a * b = k (the aspect closest to the image's),
as LLaVA-style pooled connectors do. Each pooled token takes the place of the centre token of its window."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpsvit.errors import InvalidArgumentError
from tpsvit.vlm.methods.base import Selection


def pool_grid(k: int, h: int, w: int) -> tuple[int, int]:
    """The pooled grid (a, b): a * b == k, a <= h, b <= w, aspect closest to h / w; a clear error if none."""
    pairs = [(a, k // a) for a in range(1, h + 1) if k % a == 0 and k // a <= w]
    if not pairs:
        valid = sorted({a * b for a in range(1, h + 1) for b in range(1, w + 1)})
        near = sorted(valid, key=lambda v: (abs(v - k), v))[:4]
        raise InvalidArgumentError(f"pool needs tokens = a * b with a <= {h} and b <= {w} (the {h}x{w} patch grid); "
                                   f"{k} is not, nearest: {', '.join(map(str, sorted(near)))}")
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - math.log(h / w)), p[0]))


def _centres(size: int, out: int) -> list[int]:
    """Centre index of each of adaptive pooling's ``out`` windows over ``size`` positions."""
    return [(math.floor(i * size / out) + math.ceil((i + 1) * size / out) - 1) // 2 for i in range(out)]


def pool(x, k, ctx):
    if ctx.grid is None:
        raise InvalidArgumentError("pool needs the patch grid of the image, which this model does not give")
    h, w = ctx.grid
    if h * w != x.shape[1]:
        raise InvalidArgumentError(f"pool: {x.shape[1]} patch tokens do not form the {h}x{w} grid")
    a, b = pool_grid(k, h, w)
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    tokens = F.adaptive_avg_pool2d(grid.float(), (a, b)).flatten(2).transpose(1, 2).to(x.dtype)
    rep = torch.tensor([r * w + c for r in _centres(h, a) for c in _centres(w, b)], device=x.device)
    return Selection(tokens, rep.expand(x.shape[0], -1))
