"""Shrinking the runs of image placeholder tokens to the kept counts, in every tensor aligned with ``input_ids``.

transformers fills the placeholders with the image features in row-major order (``masked_scatter``), one run of
``n`` placeholders per image; after a reduction an image gives ``K <= n`` features, so ``n - K`` of its placeholder
columns go. The columns kept are those of the kept tokens' representatives (see :mod:`tpsvit.vlm.methods.base`),
so a kept token keeps the position its column had. Rows that lose different numbers of columns are padded again on
the side the batch was padded on (left unless the mask shows right padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpsvit.errors import InvalidArgumentError


def keep_columns(input_ids: Tensor, image_token_id: int, images: list[tuple[int, Tensor]]) -> Tensor:
    """(B, L) bool: the columns that stay. ``images``: per image in order, (its placeholder count n, the indices
    (K,) of the placeholders among its n that stay)."""
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)  # row-major, the order features fill them
    expected = sum(n for n, _ in images)
    if rows.numel() != expected:
        per = sorted({n for n, _ in images})
        raise InvalidArgumentError(
            f"the prompt holds {rows.numel()} image placeholder tokens (id {image_token_id}) but its {len(images)} "
            f"image(s) give {expected} features ({'/'.join(map(str, per))} per image): the processor that built "
            f"input_ids must match the model's image size")
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    start = 0
    for n, kept in images:
        gone = torch.ones(n, dtype=torch.bool, device=input_ids.device)
        gone[kept.to(input_ids.device)] = False
        keep[rows[start:start + n][gone], cols[start:start + n][gone]] = False
        start += n
    return keep


def padding_side(attention_mask: Tensor | None) -> str:
    """"right" when the mask shows right padding only, else "left" (the side generation pads on)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return "left"
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return "right" if right and not left else "left"


def shrink(t: Tensor, keep: Tensor, pad, side: str) -> Tensor:
    """``t`` (..., B, L) with the columns ``keep`` (B, L) keeps, each row re-padded with ``pad`` to the longest."""
    lengths = keep.sum(dim=1).tolist()
    width = max(lengths)
    out = t.new_full((*t.shape[:-1], width), pad)
    for b, length in enumerate(lengths):
        start = width - length if side == "left" else 0
        out[..., b, start:start + length] = t[..., b, keep[b]]
    return out


def removed_before(keep: Tensor) -> Tensor:
    """(B, L) columns removed to the left of each column (what compact positions subtract)."""
    return (~keep).long().cumsum(dim=1)
