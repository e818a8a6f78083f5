"""tome: ToMe's bipartite soft matching (Bolya et al., ICLR 2023) applied to the projector's inputs: rounds of
:func:`tpsvit.core.reducers.bipartite_merge` (each merges up to half the tokens, by cosine similarity of the scoring
layer's keys, merged alongside the features) until k tokens remain; merged tokens are size-weighted means."""

from __future__ import annotations

import torch

from tpsvit.core.reducers import bipartite_merge
from tpsvit.vlm.methods.base import sort_by_rep


def tome(x, k, ctx):
    keys = ctx.keys(x).to(x.dtype)
    channels = x.shape[-1]
    tokens = torch.cat([x, keys], dim=-1)
    rep = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    size = None
    while tokens.shape[1] > k:
        r = min(tokens.shape[1] - k, tokens.shape[1] // 2)
        out = bipartite_merge(tokens, tokens[..., channels:], size, r)
        tokens, size, rep = out.tokens, out.size, rep.gather(1, out.kept)
    return sort_by_rep(tokens[..., :channels], rep)
