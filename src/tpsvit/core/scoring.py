"""Scorers: which patch tokens matter. Higher score = more important."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpsvit.core.methods import keep_count
from tpsvit.core.squeeze import full_precision
from tpsvit.errors import InvalidArgumentError


def split_qkv(attn: nn.Module, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split the output of a timm ``Attention.qkv`` (B, N, 3 * H * D) into normalised q, k and v of (B, H, N, D)."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def class_attention(attn: nn.Module, qkv: Tensor, num_prefix: int, bias: Tensor | None = None) -> Tensor:
    """Attention the class token pays each patch token, averaged over heads: (B, N_patch), in float32 (autocast off).

    Only the class token's row is computed (``q_cls @ K^T``, O(N)), so the block itself keeps fused attention.
    ``bias`` is the additive attention bias the block used (or None).
    """
    batch, tokens, _ = qkv.shape
    heads, dim = attn.num_heads, attn.head_dim
    parts = qkv.reshape(batch, tokens, 3, heads, dim)
    q_cls = attn.q_norm(parts[:, :1, 0].transpose(1, 2))  # (B, H, 1, D)
    keys = attn.k_norm(parts[:, :, 1].transpose(1, 2))  # (B, H, N, D)
    return class_attention_qk(q_cls, keys, attn.scale, num_prefix, bias)


def class_attention_qk(q: Tensor, keys: Tensor, scale: float, num_prefix: int, bias: Tensor | None = None) -> Tensor:
    """:func:`class_attention` from q (B, H, >=1, D) and keys (B, H, N, D) as the attention uses them (normed,
    rotated): the first query's softmax row over all keys, averaged over heads, patch columns only (float32)."""
    with full_precision(keys):
        logits = (q[:, :, :1].float() * scale) @ keys.float().transpose(-2, -1)  # (B, H, 1, N)
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]


# Elements of one (B, H, queries, N) chunk of attention logits in attention_received (float32: 4 bytes each).
RECEIVED_CHUNK_ELEMENTS = 1 << 24


def attention_received(
    q: Tensor, keys: Tensor, scale: float, num_prefix: int, bias: Tensor | None = None,
    chunk_elements: int = RECEIVED_CHUNK_ELEMENTS,
) -> Tensor:
    """Attention each patch token *receives*, averaged over every query (prefix included) and every head:
    (B, N_patch), float32. The class-free scorer (``scorer="attention_received"``; beyond the paper, which scores
    eTPS by the class token's attention).

    ``mean_q softmax(q K^T)`` needs each query's own softmax normaliser, so the full N x N map is never built at
    once: queries are taken in chunks of at most ``chunk_elements / (B * H * N)`` rows, each chunk's softmax summed
    over its queries. Cost: one extra ``Q K^T`` product (N^2 x heads x head_dim MACs). ``bias`` (B or 1, 1, 1, N):
    the additive key bias the block used (ToMe's sizes), or None.
    """
    batch, heads, tokens, _ = q.shape
    rows = max(1, min(tokens, chunk_elements // max(1, batch * heads * keys.shape[-2])))
    with full_precision(keys):
        keys_t = keys.float().transpose(-2, -1)
        received = keys_t.new_zeros(batch, keys.shape[-2])
        for start in range(0, tokens, rows):
            logits = (q[:, :, start : start + rows].float() * scale) @ keys_t  # (B, H, rows, N)
            if bias is not None:
                logits = logits + bias.float()
            received = received + logits.softmax(dim=-1).sum(dim=(1, 2))
        return (received / (heads * tokens))[:, num_prefix:]


def mean_keys(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Keys averaged over heads (B, N, D): ToMe's similarity metric."""
    return split_qkv(attn, qkv)[1].mean(dim=1)


class TokenPredictor(nn.Module):
    """The DynamicViT / dTPS keep predictor: local + keep-weighted global features -> (keep, drop) log-probs.

    LayerNorm, Linear(C, C), GELU; the first half of the channels stays per token, the second half is averaged over
    the tokens still kept; then C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax. Output index 0 is "keep".
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4:
            raise InvalidArgumentError(f"the token predictor needs an embedding dim >= 4, got {dim}")
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )  # fmt: skip
        self.apply(_release_init)

    def forward(self, tokens: Tensor, keep: Tensor | None = None) -> Tensor:
        """tokens (B, N, C) patch tokens; keep (B, N) current keep mask or None (all kept) -> (B, N, 2) log-probs."""
        hidden = self.embed(tokens)
        half = hidden.shape[-1] // 2
        local, glob = hidden[..., :half], hidden[..., half:]
        if keep is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            weight = keep.unsqueeze(-1).to(glob.dtype)
            glob = (glob * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.head(torch.cat([local, glob.expand(-1, local.shape[1], -1)], dim=-1))


def _release_init(module: nn.Module) -> None:
    """The release's ViT init: trunc-normal(std 0.02) linear weights, zero biases (keep probability ~0.5 at start)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def masked_class_attention(attn: nn.Module, x: Tensor, alive: Tensor, num_prefix: int) -> Tensor:
    """Class-token attention over the alive tokens of a full-length sequence, averaged over heads: (B, N_patch).

    ``x`` is the attention's input (after ``norm1``), ``alive`` (B, N_patch) the keep mask of the patch tokens (prefix
    tokens always count as alive). Dead tokens get 0. The target of the predictors' class-attention distillation.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x)
    alive = torch.cat([alive.new_ones(batch, num_prefix), alive], dim=1).float()
    bias = torch.zeros_like(alive).masked_fill(alive <= 0, float("-inf"))[:, None, None, :]
    return class_attention(attn, qkv, num_prefix, bias)


def gumbel_keep(log_probs: Tensor, prev_keep: Tensor) -> Tensor:
    """Training decisions: a hard Gumbel-softmax sample with a straight-through gradient, times the previous mask."""
    return F.gumbel_softmax(log_probs, hard=True)[..., 0] * prev_keep


def random_scores(shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform random scores, for the robustness study (a scorer that knows nothing)."""
    return torch.rand(shape, device=device)


def top_k_split(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` highest scores and of the rest, each sorted ascending (spatial order kept)."""
    order = scores.argsort(dim=1, descending=True)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values


def top_k_mask(scores: Tensor, alive: Tensor, keep_rate: float) -> Tensor:
    """Masked-path decisions without sampling: per image, keep ceil(rate * alive) of the alive tokens by score."""
    counts = alive.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise InvalidArgumentError(
            "top-k decisions on the masked path need the same number of alive tokens in every image"
        )
    k = keep_count(int(counts[0].item()), keep_rate)
    ranked = scores.float().masked_fill(alive <= 0, float("-inf"))
    keep_idx, _ = top_k_split(ranked, k)
    return torch.zeros_like(alive).scatter(1, keep_idx, 1.0)
