"""Scores and keys of a vision layer's tokens from the q and k that layer's attention used (captured by forward
hooks on its projections, so the tower keeps its fused SDPA attention and no N x N map is kept)."""

from __future__ import annotations

from torch import Tensor

from tpsvit.core.scoring import attention_received, class_attention_qk


def token_scores(q: Tensor, k: Tensor, scale: float, class_token: bool) -> Tensor:
    """(B, N) importance of every token of the layer (class token included), from q, k (B, H, N, D):
    the class token's attention row averaged over heads, or, without a class token, the attention each token
    receives averaged over all queries and heads (:func:`tpsvit.core.scoring.attention_received`)."""
    if class_token:
        return class_attention_qk(q, k, scale, 0)
    return attention_received(q, k, scale, 0)


def mean_keys(k: Tensor) -> Tensor:
    """(B, N, D) keys averaged over heads (ToMe's and VisionZip's similarity metric)."""
    return k.float().mean(dim=1)
