"""random: keep k tokens drawn uniformly at random (torch's global generator: seed it for repeatable draws),
discard the rest. The floor any scorer has to beat."""

from __future__ import annotations

from tpsvit.core.scoring import random_scores, top_k_split
from tpsvit.vlm.methods.base import Selection, gather_rows


def random_keep(x, k, ctx):
    kept, _ = top_k_split(random_scores(x.shape[:2], x.device), k)
    return Selection(gather_rows(x, kept), kept)
