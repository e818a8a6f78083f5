"""What the Hugging Face ``transformers`` families share: the layer and model mixins, q/k capture, attention.

The families themselves are :mod:`tpsvit.families.hf_vit`, :mod:`~tpsvit.families.hf_dinov2` and
:mod:`~tpsvit.families.hf_clip`.

Supported: ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification``,
``DeiTForImageClassificationWithTeacher``), DINOv2 with or without registers (``Dinov2Model``,
``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``, ``Dinov2WithRegistersForImageClassification`` and
the ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone`` feature extractors) and the CLIP / SigLIP vision towers
(``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``).

How it works, without copying transformers code:

- the layer list is found by the class of its elements (``ViTLayer``, ``Dinov2Layer``, ``CLIPEncoderLayer``, ...), not
  by a module path, so the attribute reorganisations between transformers releases do not matter;
- each layer's class is swapped for a thin subclass whose forward composes the layer's own modules (pre-attention
  norm, attention, its residual branch, then the MLP branch) and reduces tokens before the layer (dtps, dynamicvit) or
  between attention and MLP (etps, evit, tome); the attention itself is transformers' (SDPA by default);
- q and k for the scorers are captured by forward hooks on the attention's ``q_proj`` / ``k_proj`` (transformers 5)
  or ``query`` / ``key`` (transformers 4) linear layers, so no attention map is materialised;
- these models add position embeddings once, before the first layer, and their heads read the class token (index 0),
  the mean of the patch tokens (DINOv2 classifiers) or pool by attention over all tokens (SigLIP), so a shorter
  sequence runs through unchanged. Prefix tokens (class, DeiT's distillation token, DINOv2 registers) are protected;
- backbones reshape every stage's tokens to the patch grid: their encoder's hidden states are put back on the full
  grid first (:func:`tpsvit.restore`: a pruned patch takes the feature of the token it went into), so the feature
  maps keep their shape while the layers run on fewer tokens.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpsvit.core.attention import masked_softmax_attention
from tpsvit.core.trace import Trace, restore
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.families.base import PREDICTORS, Family, PatchedModel, model_name
from tpsvit.families.registry import FAMILIES, register_refusal


def _base_type(module: nn.Module) -> type:
    return getattr(type(module), "_tps_base", type(module))


# --------------------------------------------------------------------------------------------- the layer and model


class _HFBlock:
    """Mixed into a transformers encoder layer: reduce tokens at this layer's location, else behave as the layer."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        runtime = self._tps_runtime
        runtime.ensure_state(self)
        family = runtime.family
        extras = {"kwargs": kwargs}
        x = hidden_states
        placement = self._tps_placement
        if placement == "before":
            x = runtime.reduce(self, x, extras)
        mask = _mask_for(attention_mask, x.shape[1])
        y = runtime.attend(self, family.attn_input(self, x), extras, mask, False)
        x = x + family.attention_residual(self, y)
        if placement == "inside":
            x = runtime.reduce(self, x, extras)
        x = x + family.mlp_residual(self, x)
        return (x,) if _returns_tuple(self._tps_base) else x


def _mask_for(attention_mask: Tensor | None, tokens: int) -> Tensor | None:
    """The layer's attention mask for ``tokens`` tokens. These encoders have no padding: transformers passes None in
    eager mode but materialises an all-visible mask for the full sequence while tracing (torch.export), which no
    longer fits once tokens are reduced and is then dropped; a real mask for the full sequence is refused."""
    if attention_mask is None or attention_mask.shape[-1] == tokens:
        return attention_mask
    if torch.compiler.is_compiling():
        return None
    raise InvalidArgumentError(f"an attention_mask for {attention_mask.shape[-1]} tokens cannot apply after tpsvit "
                               f"reduced them to {tokens}; run the patched model without attention_mask")


_TUPLE: dict[type, bool] = {}
_MASK: dict[type, bool] = {}


def _takes_mask(attention_cls: type) -> bool:
    """True for attention modules whose forward takes ``attention_mask`` (transformers 5; not 4's ViT / DINOv2)."""
    if attention_cls not in _MASK:
        _MASK[attention_cls] = "attention_mask" in inspect.signature(attention_cls.forward).parameters
    return _MASK[attention_cls]


def _returns_tuple(layer_cls: type) -> bool:
    """True for layers whose forward returns ``(hidden_states, ...)`` (CLIP / SigLIP in transformers 4)."""
    if layer_cls not in _TUPLE:
        annotation = inspect.signature(layer_cls.forward).return_annotation
        _TUPLE[layer_cls] = "tuple" in str(annotation).lower()
    return _TUPLE[layer_cls]


# heads that pool over every token: on the masked (full-length) training path they would see the masked tokens
_POOL_ALL = {
    "Dinov2ForImageClassification": "averages all patch tokens",
    "Dinov2WithRegistersForImageClassification": "averages all patch tokens",
    "SiglipVisionModel": "pools by attention over all tokens",
}


# backbones reshape every stage's tokens to the full patch grid: their hidden states are restored to it first
BACKBONES = ("Dinov2Backbone", "Dinov2WithRegistersBackbone")


def masked_path_refusal(model: nn.Module, method: str) -> str | None:
    """Why ``model`` cannot take the masked training path of a learned ``method`` (its head pools every token),
    or None."""
    name = _base_type(model).__name__
    if name not in _POOL_ALL:
        return None
    return (f"{name}'s head {_POOL_ALL[name]}, which the masked training path of {method} (train mode: full length, "
            "keep mask in attention) does not restrict to kept tokens; train its base model (e.g. Dinov2Model) with "
            "your own head, use etps / evit / tome, or run in eval mode")


class _HFModel(PatchedModel):
    """Mixed into the transformers model: a fresh forward state per call of ``model(...)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = cls.__dict__.get("_tps_base")
        if base is not None:  # keep the model's own signature (pixel_values, ...) for torch.export and friends

            def forward(self, *args, **kwargs):
                return _HFModel.forward(self, *args, **kwargs)

            forward.__signature__ = inspect.signature(base.forward)
            cls.forward = forward

    def forward(self, *args, **kwargs):
        runtime = self._tps_runtime
        images = kwargs.get("pixel_values", args[0] if args else None)
        runtime.begin(self, images)
        config = runtime.config
        if runtime.state.masked and any(rate < 1 for rate in config.keep_rate or ()):  # keep 1 masks nothing
            refusal = masked_path_refusal(self, config.method)
            if refusal is not None:
                raise InvalidArgumentError(refusal)
        runtime.family.check_images(self, images, interpolate=bool(kwargs.get("interpolate_pos_encoding")))
        return super().forward(*args, **kwargs)


def _parent(model: nn.Module, child: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if any(c is child for c in m.children()))


def _hidden_states_on_full_grid(module, args, output):
    """Encoder hook of a patched backbone: each layer's output, restored to the full patch grid (:func:`restore` in
    the patch's ``restore`` mode; by default a pruned patch takes its host's feature, a dropped one zeros), so the
    backbone's feature maps keep their shape."""
    runtime = module._tps_backbone_runtime
    hidden = getattr(output, "hidden_states", None)
    if hidden is None or runtime.state is None or runtime.state.masked:
        return output
    blocks = [step.block for step in runtime.trace.locations]
    restored = [hidden[0]]
    for index, tokens in enumerate(hidden[1:]):
        prefix, grid = restore(tokens, runtime.trace, upto=sum(1 for b in blocks if b <= index),
                               mode=runtime.restore_mode)
        restored.append(torch.cat([prefix, grid], dim=1))
    output.hidden_states = tuple(restored)
    return output


# ------------------------------------------------------------------------------------------------ attention parts


def _attention(block: nn.Module) -> nn.Module:
    return block.self_attn if hasattr(block, "self_attn") else block.attention


def _self_attention(block: nn.Module) -> nn.Module:
    """The module holding the q/k/v projections (transformers 4 nests it as ``attention.attention``)."""
    attn = _attention(block)
    inner = getattr(attn, "attention", None)
    return inner if isinstance(inner, nn.Module) else attn


def _proj(inner: nn.Module, kind: str) -> nn.Linear:
    for name in (f"{kind}_proj", {"q": "query", "k": "key", "v": "value"}[kind]):
        module = getattr(inner, name, None)
        if isinstance(module, nn.Linear):
            return module
    raise UnsupportedModelError(
        f"{type(inner).__name__} has neither {kind}_proj nor a {kind!r} projection named query/key/value"
    )


def _head_dim(inner: nn.Module) -> int:
    head_dim = getattr(inner, "head_dim", None) or getattr(inner, "attention_head_size", None)
    if head_dim is None:
        raise UnsupportedModelError(f"{type(inner).__name__} exposes neither head_dim nor attention_head_size")
    return int(head_dim)


def _heads(t: Tensor, head_dim: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    return t.view(*t.shape[:2], -1, head_dim).transpose(1, 2)


def _dropout_p(inner: nn.Module) -> float:
    p = getattr(inner, "attention_dropout", None)
    if p is None:
        p = getattr(inner, "dropout", 0.0)
    return float(p.p if isinstance(p, nn.Dropout) else p)


def _output(block: nn.Module, context: Tensor) -> Tensor:
    """The attention's output projection on (B, N, H*D)."""
    attn = _attention(block)
    for name in ("o_proj", "out_proj"):
        module = getattr(attn, name, None)
        if isinstance(module, nn.Linear):
            return module(context)
    output = getattr(attn, "output", None)  # transformers 4: ViTSelfOutput (dense, dropout)
    if output is not None and hasattr(output, "dense"):
        return output.dropout(output.dense(context))
    raise UnsupportedModelError(f"{type(attn).__name__} has no o_proj / out_proj / output.dense")


_Q, _K = "_tps_q", "_tps_k"


def _capture_q(module, args, output):
    module.__dict__[_Q] = output


def _capture_k(module, args, output):
    module.__dict__[_K] = output


# ------------------------------------------------------------------------------------------------------- families


class HFFamily(Family):
    """A transformers vision encoder with pre-norm layers; subclasses name the classes and the layer's modules."""

    block_mixin = _HFBlock
    model_mixin = _HFModel
    models: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    norm1 = norm2 = ""

    def matches(self, model):
        return _base_type(model).__name__ in self.models

    def attach(self, model, runtime):
        """Backbones reshape each stage's tokens to the full grid: record every pass (a trace of the runtime's own,
        kept under :func:`tpsvit.tracing`) and restore the encoder's hidden states to the grid."""
        if _base_type(model).__name__ not in BACKBONES:
            return
        runtime.trace = Trace()
        encoder = _parent(model, _parent(model, self.blocks(model)[0]))  # the module that runs the layer list
        encoder._tps_backbone_runtime = runtime
        encoder.register_forward_hook(_hidden_states_on_full_grid)

    def returns_grid(self, model):
        return _base_type(model).__name__ in BACKBONES

    def detach(self, model):
        for module in model.modules():
            if module.__dict__.pop("_tps_backbone_runtime", None) is not None:
                hooks = module._forward_hooks
                for key in [k for k, fn in hooks.items() if fn is _hidden_states_on_full_grid]:
                    del hooks[key]

    def check(self, model):
        self.blocks(model)
        attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attn_impl is not None and "flash" in str(attn_impl):
            raise UnsupportedModelError(
                f"attention implementation {attn_impl!r}: ToMe's size bias and the masked path need an additive mask; "
                "load the model with attn_implementation='sdpa' (the default) or 'eager'"
            )

    def blocks(self, model):
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) and all(
                _base_type(m).__name__ in self.layers for m in module
            ):
                return list(module)
        raise UnsupportedModelError(f"no list of {' / '.join(self.layers)} found in {type(model).__name__}")

    def _config(self, model):
        config = model.config
        return getattr(config, "vision_config", None) or config

    def _embeddings(self, model) -> nn.Module:
        for module in model.modules():
            if type(module).__name__.endswith("Embeddings") and (
                hasattr(module, "patch_embeddings") or hasattr(module, "patch_embedding")
            ):
                return module
        raise UnsupportedModelError(f"no patch embeddings found in {type(model).__name__}")

    def num_prefix_tokens(self, model):
        emb = self._embeddings(model)
        count = int(self.has_class_token(model))
        if getattr(emb, "distillation_token", None) is not None:
            count += 1
        registers = getattr(emb, "register_tokens", None)
        if registers is not None:
            count += int(registers.shape[1])
        return count

    def has_class_token(self, model):
        emb = self._embeddings(model)
        return getattr(emb, "cls_token", None) is not None or getattr(emb, "class_embedding", None) is not None

    def grid_size(self, model):
        config = self._config(model)
        size, patch = config.image_size, config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))

    any_image_size = False  # DINOv2 interpolates its position embeddings for every input size

    def check_images(self, model, images, interpolate: bool = False) -> None:
        own = self._check_channels(model, images)
        if own is None:
            return
        if not (interpolate or self.any_image_size) and tuple(images.shape[2:]) != own[1:]:
            raise InvalidArgumentError(f"images of {images.shape[2]}x{images.shape[3]} pixels; "
                                       f"{model_name(model)} takes {own[1]}x{own[2]} (or pass "
                                       f"interpolate_pos_encoding=True)")

    def input_size(self, model):
        config = self._config(model)
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.num_channels), int(h), int(w)

    def embed_dim(self, model):
        return int(self._config(model).hidden_size)

    def num_classes(self, model):
        if "ForImageClassification" not in _base_type(model).__name__:
            return None
        return int(self._config(model).num_labels)

    def reset_head(self, model, num_classes: int) -> None:
        """New classifier layer(s) for ``num_classes`` (ViT / DeiT / DINOv2 classifiers), config updated."""
        heads = [name for name in ("classifier", "cls_classifier", "distillation_classifier")
                 if isinstance(getattr(model, name, None), nn.Linear)]
        if not heads:
            raise UnsupportedModelError(f"{_base_type(model).__name__} has no classifier layer to replace")
        for name in heads:
            old = getattr(model, name)
            setattr(model, name, nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype))
        labels = {i: f"LABEL_{i}" for i in range(num_classes)}
        model.config.id2label, model.config.label2id = labels, {v: k for k, v in labels.items()}

    def logits_and_features(self, model, x):
        """The classifier's logits and its base model's ``last_hidden_state`` (after the final layernorm), caught
        by a hook on the way."""
        if self.num_classes(model) is None:
            raise UnsupportedModelError(f"{_base_type(model).__name__} has no classification head to train")
        caught = []
        hook = model.base_model.register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
        try:
            logits = model(pixel_values=x).logits
        finally:
            hook.remove()
        return logits, caught[0]

    # ---- what tpsvit.flops counts

    def patch_projection(self, model):
        emb = self._embeddings(model)
        patches = getattr(emb, "patch_embeddings", None)
        return getattr(patches, "projection", None) if patches is not None else emb.patch_embedding

    def attention_shape(self, block):
        inner = _self_attention(block)
        head_dim = _head_dim(inner)
        return _proj(inner, "q").out_features // head_dim, head_dim

    def block_parts(self, block):
        if hasattr(block, "mlp"):
            return _attention(block), [block.mlp]
        return _attention(block), [block.intermediate, block.output]  # transformers 4 ViT / DeiT

    def head_parts(self, model):
        """Every module outside the embeddings and the layers runs on the pooled token(s) (classifiers, ViT's pooler,
        CLIP's projection), except an attention-pool head over all tokens (SigLIP's ``head``)."""
        pool = next((m for m in model.modules() if isinstance(getattr(m, "attention", None), nn.MultiheadAttention)
                     and hasattr(m, "probe")), None)
        skip = {id(m) for part in (self._embeddings(model), pool, getattr(model, PREDICTORS, None), *self.blocks(model))
                if part is not None for m in part.modules()}
        heads = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in skip]
        return heads, pool

    def attn_scale(self, block):
        inner = _self_attention(block)
        scale = getattr(inner, "scaling", None) or getattr(inner, "scale", None)
        return float(scale) if scale is not None else _head_dim(inner) ** -0.5

    def attn_input(self, block, x):
        return getattr(block, self.norm1)(x)

    def attention_residual(self, block, y):  # pragma: no cover - interface
        raise NotImplementedError

    def mlp_residual(self, block, x):  # pragma: no cover - interface
        raise NotImplementedError

    # ---- q / k for the scorers

    def install(self, block):
        inner = _self_attention(block)
        _proj(inner, "q").register_forward_hook(_capture_q)
        _proj(inner, "k").register_forward_hook(_capture_k)

    def uninstall(self, block):
        inner = _self_attention(block)
        for module, fn, name in ((_proj(inner, "q"), _capture_q, _Q), (_proj(inner, "k"), _capture_k, _K)):
            hooks = module._forward_hooks
            for key in [k for k, hook in hooks.items() if hook is fn]:
                del hooks[key]
            module.__dict__.pop(name, None)

    def take_capture(self, block):
        inner = _self_attention(block)
        q = _proj(inner, "q").__dict__.pop(_Q, None)
        k = _proj(inner, "k").__dict__.pop(_K, None)
        return None if q is None or k is None else (q, k)

    def query_key(self, block, capture, extras):
        head_dim = _head_dim(_self_attention(block))
        return _heads(capture[0], head_dim), _heads(capture[1], head_dim)

    def fresh_query_key(self, block, x, extras):
        inner = _self_attention(block)
        head_dim = _head_dim(inner)
        return _heads(_proj(inner, "q")(x), head_dim), _heads(_proj(inner, "k")(x), head_dim)

    # ---- attention

    def attention(self, block, x, extras, attn_mask, is_causal):
        attn = _attention(block)
        if _takes_mask(type(attn)):
            out = attn(x, attention_mask=attn_mask, **extras.get("kwargs", {}))
        elif attn_mask is None:
            out = attn(x)  # transformers 4 ViT / DINOv2: (hidden_states, head_mask)
        else:
            return self._explicit(block, x, bias=attn_mask)  # an additive mask the attention cannot take
        return out[0] if isinstance(out, tuple) else out  # (output, weights) in transformers 5

    def _explicit(self, block, x, bias=None, policy=None):
        inner = _self_attention(block)
        head_dim = _head_dim(inner)
        q, k, v = (_heads(_proj(inner, kind)(x), head_dim) for kind in "qkv")
        p = _dropout_p(inner) if block.training else 0.0
        if policy is not None:
            out = masked_softmax_attention(q, k, v, self.attn_scale(block), policy, lambda w: F.dropout(w, p, True))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.attn_scale(block))
        return _output(block, out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def masked_attention(self, block, x, policy, extras):
        """DynamicViT's masked softmax over the layer's own q/k/v projections and output projection (the full-length
        training path of dtps / dynamicvit); inference keeps transformers' attention."""
        return self._explicit(block, x, policy=policy)




def supported_classes() -> tuple[str, ...]:
    """The transformers model classes the registered HF families patch."""
    return tuple(name for family in FAMILIES if isinstance(family, HFFamily) for name in family.models)


def refuse_hf(model: nn.Module) -> None:
    """Raise the one-line error for a transformers model that no HF family supports (no-op for other models)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is not installed: the model is not one of its classes
        return
    if not isinstance(model, PreTrainedModel):
        return
    raise UnsupportedModelError(
        f"tpsvit cannot patch transformers {_base_type(model).__name__}; supported transformers classes: "
        f"{', '.join(supported_classes())}"
    )


register_refusal(refuse_hf)
