"""prumerge: LLaVA-PruMerge (Shang et al., 2024). Per image, keep the tokens whose score is an upper outlier of the
image's scores (above Q3 + 1.5 IQR: an adaptive count), add to each kept token the score-weighted sum of its 32 most
key-similar other tokens, and append one token holding the score-weighted sum of all unkept tokens (the release's
inference rule). ``tokens`` / ``keep_rate``, if given, cap the count. The count per image is reported by
:func:`tpsvit.vlm.kept_counts`."""

from __future__ import annotations

import torch

from tpsvit.vlm.methods.base import Selection

NEIGHBOURS = 32
IQR_FACTOR = 1.5


def outlier_count(scores) -> int:
    """Scores (n,) above Q3 + 1.5 * IQR (at least one)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return max(1, int((scores > q3 + IQR_FACTOR * (q3 - q1)).sum()))


def _one(x, s, keys, cap):
    n = x.shape[0]
    count = min(outlier_count(s), max(1, cap - 1) if cap < n else n)
    kept = s.topk(count).indices.sort().values
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = unit[kept] @ unit.T  # (count, n)
    sim[torch.arange(count, device=x.device), kept] = float("-inf")
    m = min(NEIGHBOURS, n - 1)
    xf, sf = x.float(), s.float()
    tokens = xf[kept]
    if m > 0:
        near = sim.topk(m, dim=-1).indices  # (count, m)
        tokens = tokens + (xf[near] * sf[near].unsqueeze(-1)).sum(dim=1)
    unkept = torch.ones(n, dtype=torch.bool, device=x.device)
    unkept[kept] = False
    rep = kept
    if unkept.any() and count < cap:
        extra = (xf[unkept] * sf[unkept].unsqueeze(-1)).sum(dim=0, keepdim=True)
        tokens = torch.cat([tokens, extra])
        rep = torch.cat([kept, unkept.nonzero()[-1]])  # the extra token sits at the last unkept token's place
        rep, order = rep.sort()
        tokens = tokens[order]
    return tokens.to(x.dtype), rep


def prumerge(x, k, ctx):
    scores, keys = ctx.scores(), ctx.keys(x)
    outs = [_one(x[i], scores[i], keys[i], k) for i in range(x.shape[0])]
    width = max(t.shape[0] for t, _ in outs)
    tokens = x.new_zeros(x.shape[0], width, x.shape[-1])
    rep = torch.full((x.shape[0], width), -1, dtype=torch.long, device=x.device)
    for i, (t, r) in enumerate(outs):
        tokens[i, : t.shape[0]], rep[i, : r.shape[0]] = t, r
    return Selection(tokens, rep, torch.tensor([t.shape[0] for t, _ in outs], device=x.device))
