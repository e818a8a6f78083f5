"""timm ``Eva`` (EVA-02, DINOv3, Perception Encoder, RoPE ViTs): rotary angles follow the tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from tpsvit.core.attention import allowed_keys
from tpsvit.errors import UnsupportedModelError
from tpsvit.families.base import Family
from tpsvit.families.registry import register
from tpsvit.families.timm_common import TimmModel, check_blocks


def gather_rope(rope: Tensor | None, positions: Tensor | None) -> Tensor | None:
    """The rotary embedding rows of the current patch tokens.

    ``rope`` is what timm's ``Eva`` hands each block for the patch tokens entering the first block: (N, 2D),
    (heads, N, 2D) (mixed RoPE, per block) or with a leading batch dim (patch dropout); the layout is
    ``cat([sin, cos], -1)`` (``apply_rot_embed_cat``). ``positions`` (B, N') indexes those tokens (-1: a token with no
    grid cell, EViT's fused token, which gets the identity rotation: sin 0, cos 1). Returns (B, heads or 1, N', 2D).
    """
    if rope is None or positions is None:
        return rope
    table = rope
    while table.ndim < 4:
        table = table.unsqueeze(0)
    batch, count = positions.shape
    table = table.expand(batch, *table.shape[1:])
    index = positions.clamp(min=0)[:, None, :, None].expand(batch, table.shape[1], count, table.shape[-1])
    rows = table.gather(2, index)
    half = table.shape[-1] // 2
    identity = torch.cat([rows.new_zeros(half), rows.new_ones(table.shape[-1] - half)])
    return torch.where((positions < 0)[:, None, :, None], identity, rows)


class _EvaBlock:
    """Mixed into a timm ``EvaBlock``: each block receives the rotary rows of its surviving tokens."""

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        runtime = self._tps_runtime
        state = runtime.ensure_state(self)
        extras = {"rope": gather_rope(rope, state.positions)}
        placement = self._tps_placement
        if placement == "before":
            x = runtime.reduce(self, x, extras)
            extras = {"rope": gather_rope(rope, state.positions)}
        x_attn = runtime.attend(self, self.norm1(x), extras, attn_mask, is_causal)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        if placement == "inside":
            x = runtime.reduce(self, x, extras)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)


def _capture_as(name: str) -> Callable:
    def hook(module: nn.Module, args, output: Tensor) -> None:
        module.__dict__[name] = output

    return hook


_Q, _K = "_tps_q", "_tps_k"
_EVA_HOOKS: dict[str, Callable] = {_Q: _capture_as(_Q), _K: _capture_as(_K)}


class EvaFamily(Family):
    """timm ``Eva`` with pre-norm ``EvaBlock`` and ``EvaAttention`` / ``AttentionRope`` (rotary embeddings carried
    per token). q and k are captured after ``q_norm`` / ``k_norm`` and rotated with the block's rope rows, exactly as
    timm's attention does, so the scorers see what attention saw."""

    name = "timm Eva"
    block_mixin = _EvaBlock
    model_mixin = TimmModel

    def matches(self, model):
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def check(self, model):
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock

        block = check_blocks(model, EvaBlock, (EvaAttention, AttentionRope),
                              "tpsvit supports Eva's pre-norm EvaBlock (not use_post_norm=True: a post-norm block "
                              "would need its own block wrapper)",
                              "tpsvit supports EvaAttention and AttentionRope")
        if int(block.attn.num_prefix_tokens) != int(model.num_prefix_tokens):
            raise UnsupportedModelError("the attention's prefix-token count differs from the model's")

    def install(self, block):
        block.attn.q_norm.register_forward_hook(_EVA_HOOKS[_Q])
        block.attn.k_norm.register_forward_hook(_EVA_HOOKS[_K])

    def uninstall(self, block):
        for module, name in ((block.attn.q_norm, _Q), (block.attn.k_norm, _K)):
            hooks = module._forward_hooks
            for key in [k for k, fn in hooks.items() if fn is _EVA_HOOKS[name]]:
                del hooks[key]
            module.__dict__.pop(name, None)

    def take_capture(self, block):
        q = block.attn.q_norm.__dict__.pop(_Q, None)
        k = block.attn.k_norm.__dict__.pop(_K, None)
        return None if q is None or k is None else (q, k)

    def query_key(self, block, capture, extras):
        from timm.layers import apply_rot_embed_cat

        attn = block.attn
        q, k = capture
        rope = extras.get("rope")
        if rope is not None:
            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: head h uses kv head h // groups, as timm does
            k = k.repeat_interleave(groups, dim=1)
        return q, k

    def fresh_query_key(self, block, x, extras):
        attn = block.attn
        hooks = [attn.q_norm.register_forward_hook(_EVA_HOOKS[_Q]), attn.k_norm.register_forward_hook(_EVA_HOOKS[_K])]
        try:
            attn(x, rope=extras.get("rope"))
        finally:
            for hook in hooks:
                hook.remove()
        return self.query_key(block, self.take_capture(block), extras)

    def attention(self, block, x, extras, attn_mask, is_causal):
        return block.attn(x, rope=extras.get("rope"), attn_mask=attn_mask, is_causal=is_causal)

    def masked_attention(self, block, x, policy, extras):
        """timm's own (unfused) attention with DynamicViT's masked softmax: the softmax weights w become
        ``w * allowed / sum(w * allowed)`` just before timm's ``attn_drop``, which equals the masked softmax of the
        logits and passes straight-through gradients to ``policy``."""
        attn = block.attn
        allowed = allowed_keys(policy)

        def mask_weights(module, args):
            weights = args[0] * allowed.to(args[0].dtype)
            return (weights / weights.sum(dim=-1, keepdim=True),)

        hook = attn.attn_drop.register_forward_pre_hook(mask_weights)
        fused = attn.fused_attn
        attn.fused_attn = False
        try:
            return attn(x, rope=extras.get("rope"))
        finally:
            attn.fused_attn = fused
            hook.remove()


register(EvaFamily())
