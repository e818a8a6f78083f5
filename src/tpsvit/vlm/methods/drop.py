"""drop: keep the k best-scored tokens (class attention of the scoring layer, or attention received on class-free
towers), discard the rest, nothing merged (the pruning half of TPS; FastV-style dropping on the vision side)."""

from __future__ import annotations

from tpsvit.core.scoring import top_k_split
from tpsvit.vlm.methods.base import Selection, gather_rows


def drop(x, k, ctx):
    kept, _ = top_k_split(ctx.scores(), k)
    return Selection(gather_rows(x, kept), kept)
