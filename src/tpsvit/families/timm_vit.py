"""timm ``VisionTransformer`` (DeiT, DeiT-III, AugReg, CLIP, DINOv2, SigLIP, register-token ViTs, ...)."""

from __future__ import annotations

from torch import Tensor, nn

from tpsvit.core.attention import masked_softmax_attention
from tpsvit.core.scoring import split_qkv
from tpsvit.families.base import Family
from tpsvit.families.registry import register
from tpsvit.families.timm_common import TimmModel, check_blocks


class _ViTBlock:
    """Mixed into a timm ``Block``: reduce tokens at this block's location, else behave exactly as the block."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        runtime = self._tps_runtime
        runtime.ensure_state(self)
        extras: dict = {}
        placement = self._tps_placement
        if placement == "before":
            x = runtime.reduce(self, x, extras)
        x = x + self.drop_path1(self.ls1(runtime.attend(self, self.norm1(x), extras, attn_mask, is_causal)))
        if placement == "inside":
            x = runtime.reduce(self, x, extras)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def masked_attention(attn: nn.Module, x: Tensor, policy: Tensor) -> Tensor:
    """timm ``Attention`` where each query sees only kept tokens and itself (DynamicViT's masked softmax).

    ``policy`` (B, N) is multiplied into the exponentiated logits, so straight-through gradients reach the keep
    decisions. Used on the full-length training path only; inference keeps timm's fused attention.
    """
    batch, tokens, _ = x.shape
    q, k, v = split_qkv(attn, attn.qkv(x))
    out = masked_softmax_attention(q, k, v, attn.scale, policy, attn.attn_drop)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _capture_qkv(module: nn.Module, args, output: Tensor) -> None:
    module._tps_qkv = output  # popped by take_capture of the same block


class ViTFamily(Family):
    """timm ``VisionTransformer`` with pre-norm ``Block`` and ``Attention`` (no RoPE)."""

    name = "timm VisionTransformer"
    block_mixin = _ViTBlock
    model_mixin = TimmModel

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check(self, model):
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        check_blocks(model, Block, Attention,
                      "tpsvit supports timm's pre-norm Block (not parallel or post-norm blocks)",
                      "tpsvit supports timm's Attention in a VisionTransformer (RoPE ViTs are timm Eva models, which "
                      "are supported)")

    def install(self, block):
        block.attn.qkv.register_forward_hook(_capture_qkv)

    def uninstall(self, block):
        hooks = block.attn.qkv._forward_hooks
        for key in [k for k, fn in hooks.items() if fn is _capture_qkv]:
            del hooks[key]
        block.attn.qkv.__dict__.pop("_tps_qkv", None)

    def take_capture(self, block):
        return block.attn.qkv.__dict__.pop("_tps_qkv", None)

    def query_key(self, block, capture, extras):
        q, k, _ = split_qkv(block.attn, capture)
        return q, k

    def fresh_query_key(self, block, x, extras):
        q, k, _ = split_qkv(block.attn, block.attn.qkv(x))
        return q, k

    def attention(self, block, x, extras, attn_mask, is_causal):
        return block.attn(x, attn_mask=attn_mask, is_causal=is_causal)

    def masked_attention(self, block, x, policy, extras):
        return masked_attention(block.attn, x, policy)


register(ViTFamily())
