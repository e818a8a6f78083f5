"""Model families: what the patch needs from a kind of ViT, behind one small interface.

A :class:`Family` tells :mod:`tpsvit.patch` which blocks to wrap and how (the block mixin decides where in the block a
reduction happens: before it, or between attention and MLP), how many leading prefix tokens are protected, whether
there is a class token, the patch grid, how to read q and k *as the attention uses them* (after q/k norm and rotary
embedding) for the scorers, how to run attention with a keep mask (the full-length training path of dTPS /
DynamicViT) and which per-token extras follow the tokens through a reduction (rotary angles for Eva). The engine
(scorers, reducers, schedule, trace) is family-free; adding a family (e.g. Hugging Face ViTs) is adding an adapter.

Families today: timm ``VisionTransformer`` (DeiT, DeiT-III, AugReg, CLIP, DINOv2, SigLIP, ...), timm ``Eva``
(EVA-02, DINOv3, Perception Encoder, RoPE ViTs) and, in :mod:`tpsvit.hf` (looked up only once ``transformers`` is
imported), Hugging Face ViT / DeiT, DINOv2 (+ registers), CLIP and SigLIP vision models. Other timm ViT-like classes
are refused by :func:`family_of` with the reason and what support would need.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tpsvit.errors import UnsupportedModelError
from tpsvit.scoring import split_qkv


class Family:
    """The adapter interface (one instance per family, stateless)."""

    name = ""
    block_mixin: type = object  # mixed into each block class; calls runtime.attend / runtime.reduce
    model_mixin: type | None = None  # mixed into the model class; None: timm's (tpsvit.patch._TPSModel)

    def matches(self, model: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` when a variant of the family cannot be patched."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def attn_scale(self, block: nn.Module) -> float:
        """The softmax scale of the block's attention (q k^T * scale)."""
        return block.attn.scale

    def attn_input(self, block: nn.Module, x: Tensor) -> Tensor:
        """The attention's input for the block input ``x`` (the pre-attention norm)."""
        return block.norm1(x)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None

    def grid_size(self, model: nn.Module) -> tuple[int, int] | None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return tuple(int(g) for g in grid) if grid is not None else None

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(channels, height, width) of the images the model was built for; None when it cannot tell."""
        embed = getattr(model, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        chans = getattr(getattr(embed, "proj", None), "in_channels", None)
        if size is None or chans is None:
            return None
        return int(chans), int(size[0]), int(size[1])

    def num_classes(self, model: nn.Module) -> int | None:
        """Classes the model's head predicts; None for a feature extractor."""
        classes = getattr(model, "num_classes", None)
        return int(classes) if classes else None

    def reset_head(self, model: nn.Module, num_classes: int) -> None:
        """A new classifier for ``num_classes`` (fine-tuning on other data)."""
        model.reset_classifier(num_classes)

    def logits_and_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits, the final tokens the head reads, after the last norm) of one forward pass (training)."""
        features = model.forward_features(x)
        return model.forward_head(features), features

    # ---- what tpsvit.flops counts

    def patch_projection(self, model: nn.Module) -> nn.Module | None:
        """The patch embedding's projection (an ``nn.Conv2d`` for the MAC count)."""
        return getattr(getattr(model, "patch_embed", None), "proj", None)

    def attention_shape(self, block: nn.Module) -> tuple[int, int]:
        """(heads, head_dim) of the block's attention."""
        return int(block.attn.num_heads), int(block.attn.head_dim)

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """(the attention, the MLP's modules): their linear layers run once per token each."""
        return block.attn, [block.mlp]

    def head_parts(self, model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
        """(modules run once per image on the pooled token(s), an attention-pool head over all tokens or None)."""
        heads = [getattr(model, name, None) for name in ("head", "head_dist")]
        return [h for h in heads if isinstance(h, nn.Module)], getattr(model, "attn_pool", None)

    def attach(self, model: nn.Module, runtime) -> None:
        """Called once the model is patched (model-level hooks); :meth:`detach` undoes it before unpatching."""

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`."""

    def install(self, block: nn.Module) -> None:
        """Start capturing what :meth:`query_key` needs from this block's attention (at scored locations only)."""

    def uninstall(self, block: nn.Module) -> None:
        """Undo :meth:`install` and drop any capture."""

    def take_capture(self, block: nn.Module):
        """Pop the capture of the last attention call of this block (None if nothing was captured)."""
        return None

    def query_key(self, block: nn.Module, capture, extras: dict) -> tuple[Tensor, Tensor]:
        """(q, k), each (B, H, N, D), as the attention used them (normed, rotated, kv heads expanded)."""
        raise NotImplementedError

    def fresh_query_key(self, block: nn.Module, x: Tensor, extras: dict) -> tuple[Tensor, Tensor]:
        """(q, k) for the attention input ``x`` (after ``norm1``) without running the block."""
        raise NotImplementedError

    def attention(self, block: nn.Module, x: Tensor, extras: dict, attn_mask, is_causal) -> Tensor:
        """The block's own attention on ``x`` (after ``norm1``), with an optional additive mask."""
        raise NotImplementedError

    def masked_attention(self, block: nn.Module, x: Tensor, policy: Tensor, extras: dict) -> Tensor:
        """Attention where each query sees only kept tokens and itself; ``policy`` (B, N) carries gradients."""
        raise NotImplementedError


def logits_of(output) -> Tensor:
    """The class logits of a model's output: the tensor itself (timm) or its ``logits`` (transformers)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise UnsupportedModelError(
            f"the model returns {type(output).__name__} without logits: it is a feature extractor, not a classifier"
        )
    return logits


def _allowed(policy: Tensor) -> Tensor:
    """(B, 1, N, N) mask of the keys each query may see: kept tokens, and always itself."""
    allowed = policy.float()[:, None, None, :]
    eye = torch.eye(policy.shape[1], device=policy.device, dtype=allowed.dtype)
    return allowed + (1.0 - allowed) * eye


# ------------------------------------------------------------------------------------------ timm VisionTransformer


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


def _check_blocks(model: nn.Module, block_cls: type, attention_cls, block_hint: str, attention_hint: str) -> nn.Module:
    """Every block of a timm ``model`` is ``block_cls`` with its own forward (the block mixin composes that
    forward) and has an ``attention_cls`` attention; else :class:`UnsupportedModelError` with the hint. Returns the
    last block."""
    for index, block in enumerate(model.blocks):
        base = getattr(type(block), "_tps_base", type(block))
        if not issubclass(base, block_cls) or base.forward is not block_cls.forward:
            raise UnsupportedModelError(f"block {index} is a {base.__name__}; {block_hint}")
        if not isinstance(block.attn, attention_cls):
            raise UnsupportedModelError(f"block {index} uses {type(block.attn).__name__}; {attention_hint}")
    return block


def _capture_qkv(module: nn.Module, args, output: Tensor) -> None:
    module._tps_qkv = output  # popped by take_capture of the same block


class ViTFamily(Family):
    """timm ``VisionTransformer`` with pre-norm ``Block`` and ``Attention`` (no RoPE)."""

    name = "timm VisionTransformer"
    block_mixin = _ViTBlock

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check(self, model):
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        _check_blocks(model, Block, Attention,
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
        from tpsvit.patch import masked_attention

        return masked_attention(block.attn, x, policy)


# ------------------------------------------------------------------------------------------------------- timm Eva


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

    def matches(self, model):
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def check(self, model):
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock

        block = _check_blocks(model, EvaBlock, (EvaAttention, AttentionRope),
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
        allowed = _allowed(policy)

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


# ------------------------------------------------------------------------------------------------------- lookup

FAMILIES: tuple[Family, ...] = (ViTFamily(), EvaFamily())

# timm classes that look like ViTs but cannot be patched: why, and what support would need.
REFUSED: dict[str, str] = {
    "VisionTransformerRelPos": (
        "its blocks add a relative-position bias computed for the full patch grid (RelPosMlp / RelPosBias); "
        "support would need the bias rows and columns of the kept positions gathered after each reduction (and a "
        "bias for squeezed / merged tokens)"
    ),
    "Beit": (
        "its attention adds a relative-position bias table indexed by the full patch grid; support would need the "
        "bias rows and columns of the kept positions gathered after each reduction (and a bias for squeezed / "
        "merged tokens)"
    ),
    "VisionTransformerSAM": (
        "SAM's image encoder attends in fixed windows over the full spatial grid (and uses decomposed relative "
        "position terms); pruned tokens break the windows, so support would need masked windows instead of removal"
    ),
    "SwinTransformer": (
        "Swin is hierarchical: shifted-window attention and patch merging need the complete 2-D grid; support "
        "would need masked (not removed) tokens inside windows"
    ),
    "SwinTransformerV2": (
        "Swin V2 is hierarchical: shifted-window attention and patch merging need the complete 2-D grid; support "
        "would need masked (not removed) tokens inside windows"
    ),
    "NaFlexVit": (
        "NaFlexViT runs variable-resolution sequences with padding masks and its own embedding; support would need "
        "the padding mask carried through every reduction (an adapter for its blocks)"
    ),
}


def family_of(model) -> Family:
    """The adapter for ``model``, or :class:`UnsupportedModelError` saying why not and what would be needed."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a timm VisionTransformer or Eva model, got {type(model).__name__}")
    families = FAMILIES
    if "transformers" in sys.modules:  # a Hugging Face model implies transformers is imported already
        from tpsvit.hf import HF_FAMILIES, refuse_hf

        families = FAMILIES + HF_FAMILIES
    for family in families:
        if family.matches(model):
            family.check(model)
            return family
    if "transformers" in sys.modules:
        refuse_hf(model)
    for cls in type(model).__mro__:
        if cls.__name__ in REFUSED:
            raise UnsupportedModelError(f"tpsvit cannot patch a timm {cls.__name__}: {REFUSED[cls.__name__]}")
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP, DINOv2, SigLIP, "
        "register-token ViTs) nor a timm Eva (EVA-02, DINOv3, Perception Encoder, RoPE ViTs); tpsvit cannot patch it"
    )
