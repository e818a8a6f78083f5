"""tps: keep the k best-scored tokens and squeeze every other one into its most similar kept token (TPS, Wei et al.,
CVPR 2023), on the projector's inputs; the squeeze is :func:`tpsvit.core.squeeze.squeeze_with_hosts`."""

from __future__ import annotations

from tpsvit.core.reducers import squeeze_reduce
from tpsvit.core.scoring import top_k_split
from tpsvit.vlm.methods.base import Selection

TEMPERATURE = 1.0


def tps(x, k, ctx):
    kept, pruned = top_k_split(ctx.scores(), k)
    return Selection(squeeze_reduce(x, kept, pruned, TEMPERATURE).tokens, kept)
