"""Reducers: what happens to the patch tokens a scorer did not keep.

Every reducer returns the new patch tokens and, for the trace, which input tokens survive (``kept``, in output
order), which were removed (``pruned``) and where each removed token went (``host``: an index into the output patch
tokens, or -1 when it was dropped outright).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tpsvit.core.squeeze import full_precision, importance, importance_log_weight, squeeze_with_hosts


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


def squeeze_reduce(x: Tensor, kept: Tensor, pruned: Tensor, temperature: float, scores: Tensor | None = None,
                   config=None) -> Reduction:
    """TPS: squeeze each pruned token into its most similar kept token.

    With a :class:`~tpsvit.core.config.TPSConfig` whose squeeze options are set (beyond the paper; ``scores`` (B, N)
    are then the scorer's): ``squeeze_weighting="importance"`` multiplies each donor's weight by ``n * a_i``
    (:func:`~tpsvit.core.squeeze.importance`); with ``squeeze_floor``, a pruned token whose best host's cosine is
    below the floor is dropped (host -1) or, with ``squeeze_floor_action="fuse"``, summed with the others below the
    floor into one extra token weighted by their importance shares (EViT's rule; the zero token when none is below),
    appended after the kept tokens.
    """
    if config is None or (not config.floor_active and config.squeeze_weighting == "similarity"):
        tokens, host = squeeze_with_hosts(gather_tokens(x, kept), gather_tokens(x, pruned), temperature)
        return Reduction(tokens, kept, pruned, host)
    share = importance(scores, log_probs=scores_are_log_probs(config)).gather(1, pruned) if pruned.shape[1] else None
    log_weight = None
    if config.squeeze_weighting == "importance" and share is not None:
        log_weight = importance_log_weight(share, x.shape[1])
    floor = config.squeeze_floor if config.floor_active else None
    donors = gather_tokens(x, pruned)
    tokens, host = squeeze_with_hosts(gather_tokens(x, kept), donors, temperature, floor=floor, log_weight=log_weight)
    if not config.floor_fuses or pruned.shape[1] == 0:
        return Reduction(tokens, kept, pruned, host)
    below = host < 0
    weight = torch.where(below, share, torch.zeros_like(share))
    extra = (donors.float() * weight.unsqueeze(-1)).sum(dim=1, keepdim=True).to(x.dtype)
    host = host.masked_fill(below, kept.shape[1])
    return Reduction(torch.cat([tokens, extra], dim=1), kept, pruned, host, extra=1)


def scores_are_log_probs(config) -> bool:
    """True when the config's scorer gives log-probabilities (a learned predictor) rather than attention / random."""
    return config.spec.scorer == "predictor" and config.scorer != "random"


def drop_reduce(x: Tensor, kept: Tensor, pruned: Tensor) -> Reduction:
    """DynamicViT: keep the kept tokens, discard the rest."""
    return Reduction(gather_tokens(x, kept), kept, pruned, torch.full_like(pruned, -1))


def fuse_one_reduce(x: Tensor, kept: Tensor, pruned: Tensor, scores: Tensor, fuse: str = "sum") -> Reduction:
    """EViT: keep the kept tokens and append one token that fuses the pruned ones.

    ``fuse="sum"`` (the authors' release): the fused token is ``sum_i a_i * x_i`` over the pruned tokens, ``a_i`` the
    class-token attention (averaged over heads) of token ``i``, *not* renormalised, so the fused token's scale is the
    attention mass the pruned tokens held. ``fuse="mean"`` (not in the release): the same weights renormalised to sum
    to one, a weighted mean.

    As in the release, the fused token is appended after the kept tokens and, at a later location, counts as one more
    token to score, keep or fuse again (keep = ceil(rate * tokens alive)). One difference: the release protects only
    the class token, so on a distilled DeiT it would score and prune the distillation token; tpsvit never prunes
    any prefix token (class, distillation, registers).
    """
    if pruned.shape[1] == 0:
        return Reduction(gather_tokens(x, kept), kept, pruned, pruned.clone())
    weight = scores.gather(1, pruned).float()
    if fuse == "mean":
        weight = weight.clamp_min(0)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    fused = (gather_tokens(x, pruned).float() * weight.unsqueeze(-1)).sum(dim=1, keepdim=True).to(x.dtype)
    host = torch.full_like(pruned, kept.shape[1])
    return Reduction(torch.cat([gather_tokens(x, kept), fused], dim=1), kept, pruned, host, extra=1)


# Reducers of scored tokens, by Method.reducer name: (patches, kept, pruned, scores, config) -> Reduction. ToMe's
# "merge" pairs tokens by matching instead of scores and is run by the runtime itself.
SCORED_REDUCERS: dict[str, Callable[..., Reduction]] = {
    "squeeze": lambda x, kept, pruned, scores, config: squeeze_reduce(x, kept, pruned, config.temperature, scores,
                                                                      config),
    "drop": lambda x, kept, pruned, scores, config: drop_reduce(x, kept, pruned),
    "fuse_one": lambda x, kept, pruned, scores, config: fuse_one_reduce(x, kept, pruned, scores, config.fuse),
}


def register_reducer(name: str, reducer: Callable[..., Reduction]) -> None:
    """Add a reducer of scored tokens under ``name`` (a :class:`~tpsvit.core.methods.Method`'s ``reducer``).

    ``reducer(patches, kept, pruned, scores, config)`` gets the patch tokens (B, N, C), the top-k split by score and
    the patch's :class:`~tpsvit.core.config.TPSConfig`, and returns a :class:`Reduction` whose tokens are the kept
    ones (plus ``extra`` appended tokens) in ``kept`` order.
    """
    if name in SCORED_REDUCERS or name == "merge":
        raise ValueError(f"reducer {name!r} exists already")
    SCORED_REDUCERS[name] = reducer


def bipartite_split(length: int, num_prefix: int, device=None) -> tuple[Tensor, Tensor]:
    """ToMe's two sets over a whole sequence of ``length`` tokens, prefix tokens included: (A, B) sequence indices.

    As in the authors' release, the split alternates over the *whole* sequence: A = even positions, B = odd ones.
    With a class token at position 0, the patch tokens at odd sequence positions (patch index 1, 3, ...) are in A
    (the sources that may merge away) and those at even positions are in B (the destinations).
    """
    return torch.arange(0, length, 2, device=device), torch.arange(1, length, 2, device=device)


def bipartite_merge(x: Tensor, metric: Tensor, size: Tensor | None, r: int, num_prefix: int = 0) -> Reduction:
    """ToMe's bipartite soft matching, with the semantics of the authors' release.

    Args:
        x: (B, T, C) the whole sequence, prefix tokens first.
        metric: (B, T, D) the similarity metric (keys averaged over heads).
        size: (B, T, 1) original tokens each token stands for, or None (all ones).
        r: tokens to merge away, capped at ``(T - num_prefix) // 2``.
        num_prefix: leading class / distillation / register tokens; never merged and never merged into.

    The sequence is split alternately into A (even positions) and B (odd positions), see :func:`bipartite_split`.
    Each A token finds its most cosine-similar B token; the ``r`` A tokens with the highest such similarity merge
    into their B token as a size-weighted mean. Prefix tokens in A never merge, and nothing merges into a prefix
    token in B (the release protects the class token and the distillation token this way; register tokens are
    protected the same way here). Output order, as in the release: the prefix tokens in their order, then the
    unmerged A tokens in sequence order (in descending similarity order when there are no prefix tokens, as the
    release leaves them), then every B token.

    Returns a :class:`Reduction` on the patch tokens (indices exclude the prefix), with ``tokens`` and ``size`` the
    output patch tokens (prefix tokens are unchanged and keep size 1).
    """
    batch, length, channels = x.shape
    n = length - num_prefix
    r = max(0, min(r, n // 2))
    if size is None:
        size = x.new_ones(batch, length, 1)
    a_idx, b_idx = bipartite_split(length, num_prefix, x.device)
    a_prefix, b_prefix = (num_prefix + 1) // 2, num_prefix // 2  # protected tokens at the head of A and of B

    with full_precision(metric):  # float32 matching whatever autocast is on
        unit = metric.float()
        unit = unit / unit.norm(dim=-1, keepdim=True)
        scores = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # (B, Na, Nb)
    scores[:, :a_prefix, :] = float("-inf")  # prefix tokens in A are never sources
    scores[:, :, :b_prefix] = float("-inf")  # nothing merges into a prefix token in B
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, unmerged = order[:, :r], order[:, r:]
    if num_prefix > 0:
        unmerged = unmerged.sort(dim=-1).values  # prefix tokens (-inf) come first again, the rest in sequence order
    dst = best_b.gather(1, src)

    weighted = x * size
    a_w, b_w = weighted[:, a_idx], weighted[:, b_idx]
    b_w = b_w.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, channels), gather_tokens(a_w, src))
    a_size, b_size = size[:, a_idx], size[:, b_idx]
    b_size = b_size.scatter_add(1, dst.unsqueeze(-1), a_size.gather(1, src.unsqueeze(-1)))
    a_unm = gather_tokens(a_w, unmerged)
    a_unm_size = a_size.gather(1, unmerged.unsqueeze(-1))

    # patch tokens out: unmerged A patches, then B patches (the prefix tokens ahead of them are unchanged)
    tokens = torch.cat([a_unm[:, a_prefix:], b_w[:, b_prefix:]], dim=1)
    new_size = torch.cat([a_unm_size[:, a_prefix:], b_size[:, b_prefix:]], dim=1)
    num_unmerged = unmerged.shape[1] - a_prefix
    kept = torch.cat([a_idx[unmerged[:, a_prefix:]], b_idx[b_prefix:].expand(batch, -1)], dim=1) - num_prefix
    pruned = a_idx[src] - num_prefix
    host = num_unmerged + dst - b_prefix
    return Reduction(tokens / new_size, kept, pruned, host, size=new_size)
