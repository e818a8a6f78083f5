"""The family-adapter interface: what the patch needs from one kind of ViT.

A :class:`Family` tells :mod:`tpsvit.patch` which blocks to wrap and how (the block mixin decides where in the block a
reduction happens: before it, or between attention and MLP), how many leading prefix tokens are protected, whether
there is a class token, the patch grid, how to read q and k *as the attention uses them* (after q/k norm and rotary
embedding) for the scorers, how to run attention with a keep mask (the full-length training path of dTPS /
DynamicViT) and which per-token extras follow the tokens through a reduction (rotary angles for Eva). The engine
(:mod:`tpsvit.runtime`: scorers, reducers, schedule, trace) is family-free; a family is one file in this package that
subclasses :class:`Family` and calls :func:`tpsvit.families.registry.register`.
"""

from __future__ import annotations

from torch import Tensor, nn

from tpsvit.core.config import TPSConfig
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError

PREDICTORS = "tps_predictors"  # state_dict prefix of the learned predictors (dTPS, DynamicViT)


class PatchedModel:
    """Base of every model mixin (one per family): marks a model as patched and exposes ``model.tps``."""

    @property
    def tps(self) -> TPSConfig:
        """The validated configuration of the patch."""
        return self._tps_runtime.config


class Family:
    """The adapter interface (one instance per family, stateless)."""

    name = ""
    block_mixin: type = object  # mixed into each block class; calls runtime.attend / runtime.reduce
    model_mixin: type = PatchedModel  # mixed into the model class: starts the forward state, exposes model.tps

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

    def input_grid(self, model: nn.Module, height: int, width: int) -> tuple[int, int] | None:
        """The patch grid of a ``height`` x ``width`` input (models that accept other sizes than their own: timm's
        ``dynamic_img_size``, DINOv2's interpolated position embeddings); from the patch projection's stride."""
        stride = getattr(self.patch_projection(model), "stride", None)
        if stride is None:
            return self.grid_size(model)
        if getattr(getattr(model, "patch_embed", None), "dynamic_img_pad", False):  # timm pads up to whole patches
            return -(-height // int(stride[0])), -(-width // int(stride[1]))
        return height // int(stride[0]), width // int(stride[1])

    def check_images(self, model: nn.Module, images, interpolate: bool = False) -> None:
        """Raise :class:`InvalidArgumentError` naming the size when the model cannot take ``images`` (B, C, H, W)
        (timm's rules: its own size when ``strict_img_size``, else whole patches unless it pads); ``interpolate``:
        the call asked for interpolated position embeddings (Hugging Face)."""
        own = self._check_channels(model, images)
        if own is None:
            return
        height, width = images.shape[2:]
        embed = getattr(model, "patch_embed", None)
        if embed is None or getattr(embed, "img_size", None) is None:
            return
        if getattr(embed, "strict_img_size", False) and (height, width) != own[1:]:
            raise InvalidArgumentError(f"images of {height}x{width} pixels; {model_name(model)} takes "
                                       f"{own[1]}x{own[2]} only (build it with dynamic_img_size=True for others)")
        patch = tuple(int(p) for p in embed.patch_size)
        if not getattr(embed, "dynamic_img_pad", False) and (height % patch[0] or width % patch[1]):
            raise InvalidArgumentError(f"images of {height}x{width} pixels; {model_name(model)} takes sides "
                                       f"that are multiples of its {patch[0]}x{patch[1]} patches")

    def _check_channels(self, model: nn.Module, images) -> tuple[int, int, int] | None:
        """The model's own (channels, height, width) after checking ``images``' channels against it; None when
        ``images`` is not a (B, C, H, W) tensor or the model cannot tell its input size."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            return None
        own = self.input_size(model)
        if own is not None and images.shape[1] != own[0]:
            raise InvalidArgumentError(f"images with {images.shape[1]} channels; {model_name(model)} takes {own[0]}")
        return own

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(channels, height, width) of the images the model was built for; None when it cannot tell."""
        embed = getattr(model, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        chans = getattr(getattr(embed, "proj", None), "in_channels", None)
        if size is None or chans is None:
            return None
        return int(chans), int(size[0]), int(size[1])

    def returns_grid(self, model: nn.Module) -> bool:
        """True when the model's outputs are feature maps on the full patch grid (restored after a reduction)."""
        return False

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


def model_name(model: nn.Module) -> str:
    """The class name of the model as its library calls it (a patched model's own class is a tpsvit subclass)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, PatchedModel) and issubclass(c, nn.Module)).__name__
