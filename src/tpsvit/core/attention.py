"""Attention pieces the reductions need, on plain tensors: the keep mask of the masked (training) path, its masked
softmax, and ToMe's proportional-attention bias."""

from __future__ import annotations

import torch
from torch import Tensor


def allowed_keys(policy: Tensor) -> Tensor:
    """(B, 1, N, N) mask of the keys each query may see: kept tokens, and always itself."""
    allowed = policy.float()[:, None, None, :]
    eye = torch.eye(policy.shape[1], device=policy.device, dtype=allowed.dtype)
    return allowed + (1.0 - allowed) * eye


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, policy: Tensor, dropout=None) -> Tensor:
    """Attention (B, H, N, D) where each query sees only kept tokens and itself (DynamicViT's masked softmax).

    ``policy`` (B, N) is multiplied into the exponentiated logits, so straight-through gradients reach the keep
    decisions; ``dropout`` (a callable, e.g. the attention's dropout module) is applied to the weights.
    """
    logits = ((q * scale) @ k.transpose(-2, -1)).float()  # (B, H, N, N)
    allowed = allowed_keys(policy)
    peak = logits.masked_fill(allowed <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(logits - peak) * allowed
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v


def size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """ToMe's proportional attention: log(size) added to every key's logit, (B, 1, 1, N)."""
    return size.log().to(dtype)[:, None, None, :, 0]
