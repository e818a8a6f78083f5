"""Patch a model in place with any registered method, and undo it (any family, no per-family branch).

The model's class and each block's class are swapped for thin subclasses (never copies of the library's code): the
block subclass (the family's block mixin) reduces tokens before its attention or between its attention and MLP;
everything else (LayerScale, q/k norm, drop-path, prefix tokens, fused attention, rotary embeddings) is the model's
own. What differs between model families sits behind the adapter interface of :mod:`tpsvit.families`; the
per-forward engine is :mod:`tpsvit.runtime`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tpsvit.core.config import DEFAULT_LOCATIONS, TPSConfig, make_config
from tpsvit.core.methods import CLASS_FREE_SCORER
from tpsvit.core.scoring import TokenPredictor
from tpsvit.core.trace import RESTORE_MODES, Trace
from tpsvit.errors import InvalidArgumentError
from tpsvit.families import PREDICTORS, PatchedModel, family_of
from tpsvit.runtime import ForwardState, Runtime

__all__ = ["PREDICTORS", "ForwardState", "forward_state", "is_patched", "patch", "set_keep_rate",
           "set_predictor_training", "tracing", "unpatch"]


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    key = (base, mixin)
    if key not in _CLASS_CACHE:
        cls = type(f"TPS{base.__name__}", (mixin, base), {"_tps_base": base})
        cls.__module__ = __name__
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


# ----------------------------------------------------------------------------------------------------- public API


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` is currently patched by tpsvit."""
    return isinstance(model, PatchedModel)


def patch(
    model: nn.Module,
    method: str = "etps",
    keep_rate=0.7,
    locations=DEFAULT_LOCATIONS,
    *,
    r=None,
    temperature: float = 1.0,
    scorer: str = "default",
    fuse: str = "sum",
    restore: str = "host",
    squeeze_floor: float | None = None,
    squeeze_floor_action: str = "drop",
    squeeze_weighting: str = "similarity",
) -> nn.Module:
    """Patch a timm VisionTransformer or Eva, or a transformers ViT, in place with a token-reduction method; returns
    the model.

    Args:
        model: a timm ``VisionTransformer`` (DeiT, ViT, DeiT-III, distilled DeiT, register-token ViTs, CLIP, SigLIP,
            ...), a timm ``Eva`` (EVA-02, DINOv3, Perception Encoder, RoPE ViTs: rotary angles follow the tokens) or
            a Hugging Face ViT / DeiT, DINOv2 (+registers, backbones), CLIP or SigLIP vision model (:mod:`tpsvit.hf`).
        method: ``"etps"``, ``"dtps"`` (TPS) or a baseline: ``"evit"``, ``"dynamicvit"``, ``"tome"``.
        keep_rate: keep rate in (0, 1], one for all locations or one per location, relative to the patch tokens
            alive at that location (kept = ceil(keep_rate * n)). The DynamicViT / TPS releases count from the initial
            tokens instead (floor(N * ratio^i)); :func:`tpsvit.core.methods.release_keep_rates` converts.
        locations: 0-based block indices where tokens are reduced (paper: 3, 6, 9).
        r: ToMe only: tokens merged per location instead of a keep rate; with the default locations, ToMe's usual
            "r in every block".
        temperature: similarity temperature of the squeeze (etps, dtps): a donor weighs ``exp(cos / temperature)``
            against its host's ``e``; the paper's is 1.
        scorer: ``"random"`` replaces the method's scorer by random scores (robustness studies);
            ``"attention_received"`` (etps / evit, beyond the paper) scores each patch token by the attention it
            receives, averaged over all queries and heads, instead of the class token's row. It is the default, with
            a warning, on a model without a class token (SigLIP-style, ``class_token=False``, ``global_pool='avg'``).
        fuse: EViT only: ``"sum"`` (the release: the pruned tokens' class-attention-weighted sum) or ``"mean"``
            (those weights renormalised to a weighted mean; not in the release).
        restore: models that return feature maps on the patch grid (``Dinov2Backbone``): what a removed patch's
            cell holds, ``"host"`` (its host's feature), ``"frozen"`` (its own feature where it left) or ``"zeros"``
            (:func:`tpsvit.restore`). Other models return tokens; call :func:`tpsvit.restore` on them.
        squeeze_floor: etps / dtps, beyond the paper: a pruned token whose most similar kept token has cosine
            similarity below this floor (in [-1, 1]) is not squeezed into it; ``None`` (default, the paper) or -1
            squeezes every pruned token.
        squeeze_floor_action: beyond the paper: ``"drop"`` (default) discards a token below the floor, ``"fuse"``
            sums the tokens below the floor, weighted by their importance shares, into one extra token after the
            kept ones (EViT's rule), at every location.
        squeeze_weighting: ``"similarity"`` (default, the paper) or ``"importance"`` (beyond the paper: a donor's
            weight ``exp(cos / temperature)`` is multiplied by ``n * a_i``, its share ``a_i`` of the importance
            (class attention, predictor keep probability) of the ``n`` tokens alive there).

    Re-patching a patched model unpatches it first; learned predictors at locations that stay are kept.
    """
    family = family_of(model)
    blocks = family.blocks(model)
    config = make_config(
        method, len(blocks), family.num_prefix_tokens(model), keep_rate, locations, r, temperature, scorer, fuse,
        class_token=family.has_class_token(model), squeeze_floor=squeeze_floor,
        squeeze_floor_action=squeeze_floor_action, squeeze_weighting=squeeze_weighting,
    )
    grid = family.grid_size(model)
    if config.r is not None and grid is not None and max(config.r) > grid[0] * grid[1] // 2:
        raise InvalidArgumentError(
            f"r={max(config.r)} is more than ToMe can merge in one block: at most half of the {grid[0] * grid[1]} "
            f"patch tokens ({grid[0] * grid[1] // 2}); later blocks merge at most half of what is left"
        )
    if scorer == "default" and config.scorer == CLASS_FREE_SCORER:
        warnings.warn(
            f"tpsvit: this model has no class token, so {config.method} scores tokens by the attention they receive "
            f"(scorer={CLASS_FREE_SCORER!r}, beyond the paper) instead of class-token attention",
            UserWarning, stacklevel=2,
        )
    if restore not in RESTORE_MODES:
        raise InvalidArgumentError(f"restore={restore!r}; allowed: {', '.join(RESTORE_MODES)}")
    if restore != "host" and not family.returns_grid(model):
        raise InvalidArgumentError(
            f"restore={restore!r} applies to models that return feature maps (Dinov2Backbone); "
            f"{type(model).__name__} returns tokens: use tpsvit.restore(tokens, trace, mode={restore!r})"
        )
    previous = getattr(model, PREDICTORS, None) if is_patched(model) else None
    unpatch(model)  # only once the new patch is known to be valid: a bad call leaves the model as it was
    runtime = Runtime(config, family.grid_size(model), family)
    runtime.restore_mode = restore
    predictors = _make_predictors(model, config, previous, family.embed_dim(model))
    model.__class__ = _subclass(type(model), family.model_mixin)
    model._tps_runtime = runtime
    if predictors is not None:
        setattr(model, PREDICTORS, predictors)
    captures = config.spec.scorer in ("cls_attention", "matching") and config.scorer in ("default", CLASS_FREE_SCORER)
    for index, block in enumerate(blocks):
        block.__class__ = _subclass(type(block), family.block_mixin)
        block._tps_runtime = runtime
        block._tps_index = index
        block._tps_placement = config.spec.placement if index in config.locations else None
        if predictors is not None and index in config.locations:
            object.__setattr__(block, "_tps_predictor", predictors[str(index)])  # not registered: no duplicate keys
        if captures and index in config.locations:
            family.install(block)
    family.attach(model, runtime)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock timm model in place (classes, state_dict keys); learned predictors are removed."""
    if not is_patched(model):
        return model
    family = model._tps_runtime.family
    family.detach(model)
    for block in family.blocks(model):
        block.__class__ = block._tps_base
        for name in ("_tps_runtime", "_tps_index", "_tps_placement", "_tps_predictor"):
            block.__dict__.pop(name, None)
        family.uninstall(block)
    if PREDICTORS in model._modules:
        del model._modules[PREDICTORS]
    del model._tps_runtime
    model.__class__ = model._tps_base
    return model


def set_predictor_training(model: nn.Module, decisions: str = "gumbel", record_class_attention: bool = False) -> None:
    """How a patched dtps/dynamicvit model decides in train mode: ``"gumbel"`` (the paper's straight-through samples)
    or ``"topk"`` (the inference decisions); ``record_class_attention`` fills :attr:`ForwardState.ranking` for the
    predictors' class-attention distillation (:func:`tpsvit.train.losses.attention_ranking_loss`)."""
    if decisions not in ("gumbel", "topk"):
        raise ValueError(f"decisions {decisions!r}; allowed: gumbel, topk")
    runtime = _runtime(model)
    runtime.training_decisions, runtime.record_class_attention = decisions, bool(record_class_attention)


def set_keep_rate(model: nn.Module, keep_rate) -> TPSConfig:
    """Change the keep rates of a patched model without touching its weights (e.g. to anneal while fine-tuning)."""
    runtime = _runtime(model)
    runtime.config = runtime.config.with_keep_rate(keep_rate)
    return runtime.config


def forward_state(model: nn.Module) -> ForwardState:
    """The :class:`ForwardState` of the last forward pass of a patched model (keep decisions, positions, sizes)."""
    state = _runtime(model).state
    if state is None:
        raise ValueError("the patched model has not run a forward pass yet")
    return state


@contextmanager
def tracing(model: nn.Module) -> Iterator[Trace]:
    """Record what the patched model does to its tokens; the yielded :class:`Trace` holds the last forward pass.

    >>> with tpsvit.tracing(model) as trace:
    ...     model(images)
    >>> trace.locations[0].kept, trace.locations[0].host
    """
    runtime = _runtime(model)
    trace, before = Trace(), runtime.trace
    runtime.trace = trace
    try:
        yield trace
    finally:
        runtime.trace = before


def _runtime(model: nn.Module) -> Runtime:
    if not is_patched(model):
        raise ValueError("this model is not patched; call tpsvit.patch(model, ...) first")
    return model._tps_runtime


def _make_predictors(
    model: nn.Module, config: TPSConfig, previous: nn.ModuleDict | None, dim: int
) -> nn.ModuleDict | None:
    if not config.spec.learned:
        return None
    reference = next(model.parameters())
    predictors = nn.ModuleDict()
    for loc in config.locations:
        old = previous[str(loc)] if previous is not None and str(loc) in previous else None
        predictors[str(loc)] = old if old is not None else TokenPredictor(dim).to(reference.device, reference.dtype)
    return predictors
