"""Reducers: what happens to the patch tokens a scorer did not keep.

Every reducer returns the new patch tokens and, for the trace, which input tokens survive (``kept``, in output
order), which were removed (``pruned``) and where each removed token went (``host``: an index into the output patch
tokens, or -1 when it was dropped outright).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tpsvit.squeeze import squeeze_with_hosts


@dataclass
class Reduction:
    """The result of one reduction step on the patch tokens of a batch."""

    tokens: Tensor  # (B, N_out, C) new patch tokens
    kept: Tensor  # (B, K) input indices that survive as themselves, in output order (output index = position here)
    pruned: Tensor  # (B, P) input indices removed
    host: Tensor  # (B, P) output index each removed token went into, -1 if dropped
    extra: int = 0  # tokens appended after the kept ones (EViT's fused token)
    size: Tensor | None = None  # (B, N_out, 1) tokens represented by each output token (ToMe)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, C), index (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def squeeze_reduce(x: Tensor, kept: Tensor, pruned: Tensor, temperature: float) -> Reduction:
    """TPS: squeeze each pruned token into its most similar kept token."""
    tokens, host = squeeze_with_hosts(gather_tokens(x, kept), gather_tokens(x, pruned), temperature)
    return Reduction(tokens, kept, pruned, host)


def drop_reduce(x: Tensor, kept: Tensor, pruned: Tensor) -> Reduction:
    """DynamicViT: keep the kept tokens, discard the rest."""
    return Reduction(gather_tokens(x, kept), kept, pruned, torch.full_like(pruned, -1))


def fuse_one_reduce(x: Tensor, kept: Tensor, pruned: Tensor, scores: Tensor) -> Reduction:
    """EViT: keep the kept tokens and append one token, the score-weighted mean of the pruned ones."""
    if pruned.shape[1] == 0:
        return Reduction(gather_tokens(x, kept), kept, pruned, pruned.clone())
    weight = scores.gather(1, pruned).float().clamp_min(0)
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    fused = (gather_tokens(x, pruned).float() * weight.unsqueeze(-1)).sum(dim=1, keepdim=True).to(x.dtype)
    host = torch.full_like(pruned, kept.shape[1])
    return Reduction(torch.cat([gather_tokens(x, kept), fused], dim=1), kept, pruned, host, extra=1)


def bipartite_merge(x: Tensor, metric: Tensor, size: Tensor | None, r: int) -> Reduction:
    """ToMe: split tokens alternately into sets A and B, merge the ``r`` A tokens most similar to some B token.

    Merging is a size-weighted mean; ``size`` (B, N, 1) counts the original tokens each token stands for.
    Output order: the unmerged A tokens, then every B token.
    """
    batch, n, _ = x.shape
    r = min(r, n // 2)
    if size is None:
        size = x.new_ones(batch, n, 1)
    a_idx = torch.arange(0, n, 2, device=x.device)
    b_idx = torch.arange(1, n, 2, device=x.device)
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # (B, Na, Nb)
    best, best_b = similarity.max(dim=-1)
    order = best.argsort(dim=1, descending=True)
    src, unmerged = order[:, :r], order[:, r:].sort(dim=1).values
    dst = best_b.gather(1, src)

    weighted = (x * size)[:, a_idx]
    dst_index = dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    b_sum = (x * size)[:, b_idx].scatter_add(1, dst_index, gather_tokens(weighted, src))
    b_size = size[:, b_idx].scatter_add(1, dst.unsqueeze(-1), size[:, a_idx].gather(1, src.unsqueeze(-1)))
    tokens = torch.cat([gather_tokens(x[:, a_idx], unmerged), b_sum / b_size], dim=1)
    new_size = torch.cat([size[:, a_idx].gather(1, unmerged.unsqueeze(-1)), b_size], dim=1)

    kept = torch.cat([a_idx[unmerged], b_idx.expand(batch, -1)], dim=1)
    return Reduction(tokens, kept, a_idx[src], unmerged.shape[1] + dst, size=new_size)
