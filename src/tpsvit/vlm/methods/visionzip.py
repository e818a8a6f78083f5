"""visionzip: VisionZip (Yang et al., CVPR 2025). Keep the best-scored "dominant" tokens, then merge the others into a
few "contextual" tokens: targets picked at a uniform stride among the remaining tokens, every other remaining token
assigned to its most key-similar target, each contextual token = its target + the mean of the tokens assigned to it
(the release's rule). The split follows the release's LLaVA settings, 54 dominant : 10 contextual."""

from __future__ import annotations

import torch

from tpsvit.core.scoring import top_k_split
from tpsvit.vlm.methods.base import Selection, gather_rows, sort_by_rep

CONTEXTUAL_SHARE = 10 / 64


def contextual_count(k: int) -> int:
    """Contextual tokens out of ``k`` (the rest are dominant): round(k * 10 / 64), at least 1 when k >= 2."""
    return 0 if k < 2 else min(k - 1, max(1, round(k * CONTEXTUAL_SHARE)))


def visionzip(x, k, ctx):
    c = contextual_count(k)
    dominant, rest = top_k_split(ctx.scores(), k - c)
    if c == 0:
        return Selection(gather_rows(x, dominant), dominant)
    keys = ctx.keys(x)
    unit = gather_rows(keys, rest)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    remaining = rest.shape[1]
    step = max(1, remaining // c)
    targets = torch.arange(0, remaining, step, device=x.device)[:c]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=x.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)
    choice = (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=-1)  # (B, n_others)
    rest_x = gather_rows(x, rest).float()
    sums = torch.zeros(x.shape[0], c, x.shape[-1], device=x.device).scatter_add(
        1, choice.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rest_x[:, others])
    ones = torch.ones(choice.shape, device=x.device)
    counts = torch.zeros(x.shape[0], c, device=x.device).scatter_add(1, choice, ones)
    contextual = rest_x[:, targets] + sums / counts.clamp_min(1).unsqueeze(-1)
    tokens = torch.cat([gather_rows(x, dominant), contextual.to(x.dtype)], dim=1)
    return sort_by_rep(tokens, torch.cat([dominant, rest[:, targets]], dim=1))
