"""The VLM reduction methods, one file each, by name (:data:`METHODS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tpsvit.vlm.methods.drop import drop
from tpsvit.vlm.methods.pool import pool
from tpsvit.vlm.methods.prumerge import prumerge
from tpsvit.vlm.methods.random_keep import random_keep
from tpsvit.vlm.methods.tome import tome
from tpsvit.vlm.methods.tps import tps
from tpsvit.vlm.methods.visionzip import visionzip


@dataclass(frozen=True)
class VLMMethod:
    """A reduction of one image's visual tokens: ``fn(x, k, ctx) -> Selection`` (see :mod:`.base`)."""

    name: str
    fn: Callable
    summary: str
    paper: str
    scores: bool = False  # reads ctx.scores()
    adaptive: bool = False  # chooses its own count (k is an upper bound)


REGISTRY: dict[str, VLMMethod] = {m.name: m for m in (
    VLMMethod("tps", tps, "keep the top-N by score, squeeze each pruned token into its most similar kept token",
              "Wei et al., Joint Token Pruning and Squeezing, CVPR 2023", scores=True),
    VLMMethod("drop", drop, "keep the top-N by score, discard the rest", "pruning without squeeze (TPS ablation)",
              scores=True),
    VLMMethod("random", random_keep, "keep N tokens drawn at random", "baseline"),
    VLMMethod("pool", pool, "2-D average pooling of the patch grid to a x b = N tokens", "baseline"),
    VLMMethod("visionzip", visionzip, "dominant tokens by score + contextual tokens merged by key similarity",
              "Yang et al., VisionZip, CVPR 2025", scores=True),
    VLMMethod("prumerge", prumerge, "adaptive count (IQR outliers of the scores), neighbours merged into them",
              "Shang et al., LLaVA-PruMerge, 2024", scores=True, adaptive=True),
    VLMMethod("tome", tome, "bipartite soft matching on keys until N tokens remain",
              "Bolya et al., Token Merging, ICLR 2023"),
)}
METHODS: tuple[str, ...] = tuple(REGISTRY)
