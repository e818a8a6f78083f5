"""``tpsvit.vlm.patch`` / ``unpatch``: swap the VLM's class for a thin subclass whose ``forward`` and ``generate``
reduce the visual tokens and shrink the prompt to match, then call the model's own ``forward`` / ``generate``."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.vlm.config import VLMConfig, resolve_layer, validate
from tpsvit.vlm.methods import METHODS, REGISTRY
from tpsvit.vlm.runtime import continue_positions, prepare, restore_prompt
from tpsvit.vlm.seams import SEAMS, refusal
from tpsvit.vlm.seams.base import VLMState


def _base(model: nn.Module) -> type:
    return getattr(type(model), "_tps_vlm_base", type(model))


def _call_kwargs(function, model, args, kwargs) -> dict:
    """``args`` / ``kwargs`` of a call to ``function(model, ...)`` as one dict by parameter name."""
    bound = inspect.signature(function).bind(model, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(inspect.signature(function).parameters)))  # self
    for name, param in inspect.signature(function).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def _has_images(kwargs: dict) -> bool:
    return kwargs.get("pixel_values") is not None and kwargs.get("mm_encoder_outputs") is None


class VLMPatched:
    """Mixed into the VLM's class by :func:`patch`."""

    @property
    def tps_vlm(self) -> VLMConfig:
        """The validated configuration of the patch."""
        return self._tps_vlm.config

    def forward(self, *args, **kwargs):
        base = type(self)._tps_vlm_base
        kwargs = _call_kwargs(base.forward, self, args, kwargs)
        if _has_images(kwargs):
            kwargs = prepare(self, kwargs, generating=False)
        elif self._tps_vlm.seam.continues_positions:
            kwargs = continue_positions(self, kwargs)
        return base.forward(self, **kwargs)

    def generate(self, inputs=None, *args, **kwargs):
        base = type(self)._tps_vlm_base
        if inputs is not None:
            if kwargs.get("input_ids") is not None:
                raise InvalidArgumentError("give the prompt as inputs or as input_ids, not both")
            kwargs["input_ids"] = inputs
        if not _has_images(kwargs):
            return base.generate(self, *args, **kwargs)
        prompt = kwargs["input_ids"]
        kwargs = prepare(self, kwargs, generating=True)
        kwargs.pop("pixel_values")
        return restore_prompt(base.generate(self, *args, **kwargs), prompt, kwargs["input_ids"].shape[1])


_CLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    if base not in _CLASSES:
        cls = type(base.__name__, (VLMPatched, base), {"_tps_vlm_base": base})
        cls.__module__ = base.__module__
        cls.__qualname__ = base.__qualname__
        forward = cls.forward
        # generate() asks forward's signature whether the model takes position_ids: keep the model's own
        cls.forward = lambda self, *args, **kwargs: VLMPatched.forward(self, *args, **kwargs)
        cls.forward.__signature__ = inspect.signature(base.forward)
        cls.forward.__doc__ = forward.__doc__
        _CLASSES[base] = cls
    return _CLASSES[base]


def is_patched(model: nn.Module) -> bool:
    """True for a model :func:`patch` reduced (and :func:`unpatch` has not restored)."""
    return isinstance(model, VLMPatched)


def patch(model: nn.Module, method: str = "tps", tokens: int | None = None, keep_rate: float | None = None,
          layer: int | None = None, positions: str = "original") -> nn.Module:
    """Reduce the visual tokens a VLM's language model receives, in place; returns the model.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``PaliGemmaForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` (see :func:`tpsvit.vlm.supported`).
        method: one of :data:`tpsvit.vlm.METHODS`.
        tokens: visual tokens per image the language model sees (for ``prumerge``, an upper bound, optional).
        keep_rate: instead of ``tokens``, the kept fraction of each image's tokens (ceil(rate * n)).
        layer: the vision layer whose q/k score the tokens (0-based, negative from the end); default: the layer
            that produces the features the projector reads.
        positions: ``"original"`` (kept tokens keep their positions in the full sequence) or ``"compact"``
            (renumbered); Qwen2.5-VL keeps its multimodal (t, h, w) positions and takes ``"original"`` only.

    A patched model takes the same calls: ``model(**processor(...))`` and ``model.generate(**processor(...))``.
    The placeholder runs in input_ids, attention_mask, labels, position ids (and token_type_ids /
    mm_token_type_ids) shrink to the kept counts, so logits and the KV cache have the reduced length; generate
    returns the user's full prompt followed by the new tokens. Patching a patched model replaces its patch.
    """
    if is_patched(model):
        unpatch(model)
    tokens, keep_rate = validate(method, tokens, keep_rate, positions, METHODS)
    seam = _seam(model)
    if positions not in seam.positions:
        raise InvalidArgumentError(f"{_base(model).__name__} takes positions {seam.positions}, got {positions!r}")
    config = VLMConfig(method, tokens, keep_rate, resolve_layer(layer, seam.depth(model), seam.default_layer(model)),
                       positions, _base(model).__name__)
    full = seam.full_tokens(model)
    if tokens is not None and full is not None and tokens > full and method != "prumerge":
        raise InvalidArgumentError(f"tokens={tokens} exceeds the {full} visual tokens per image of this model")
    seam.check(model, config)
    state = VLMState(config, seam, REGISTRY[method])
    seam.attach(model, state)
    model._tps_vlm = state
    model.__class__ = _subclass(type(model))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original class, no hooks left; returns the model."""
    if not is_patched(model):
        raise InvalidArgumentError(f"{type(model).__name__} is not patched by tpsvit.vlm")
    state = model.__dict__.pop("_tps_vlm")
    state.seam.detach(model, state)
    model.__class__ = type(model)._tps_vlm_base
    return model


@contextmanager
def reduced(model: nn.Module, method: str = "tps", **kwargs) -> Iterator[nn.Module]:
    """``model`` patched as :func:`patch` (``method``, ``tokens=``, ``keep_rate=``, ...) inside the block; afterwards,
    error or not, as it was before: unpatched, or patched as it was.

    >>> with tpsvit.vlm.reduced(model, "tps", tokens=64):
    ...     ids = model.generate(**inputs)
    """
    before = model._tps_vlm.config if is_patched(model) else None
    patch(model, method, **kwargs)
    try:
        yield model
    finally:
        if before is None:
            unpatch(model)
        else:
            patch(model, before.method, tokens=before.tokens, keep_rate=before.keep_rate, layer=before.layer,
                  positions=before.positions)


def kept_counts(model: nn.Module) -> list[int]:
    """Visual tokens each image of the last forward / generate kept, in the order of the images."""
    if not is_patched(model):
        raise InvalidArgumentError(f"{type(model).__name__} is not patched by tpsvit.vlm")
    return list(model._tps_vlm.last_counts)


def kept_indices(model: nn.Module) -> list:
    """Per image of the last forward / generate: the indices (K,) of the visual tokens whose places the kept
    tokens take (the kept token itself, a squeeze host, a pooling window's centre, ...), ascending."""
    if not is_patched(model):
        raise InvalidArgumentError(f"{type(model).__name__} is not patched by tpsvit.vlm")
    return list(model._tps_vlm.last_kept)


def _seam(model: nn.Module):
    name = _base(model).__name__
    for seam in SEAMS:
        if name in seam.classes:
            return seam
    raise UnsupportedModelError(refusal(model))
