"""The validated configuration of a VLM patch (``model.tps_vlm``) and the per-image token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpsvit.core.methods import keep_count
from tpsvit.errors import InvalidArgumentError

POSITIONS = ("original", "compact")


@dataclass(frozen=True)
class VLMConfig:
    """What :func:`tpsvit.vlm.patch` applied.

    Attributes:
        method: one of :data:`tpsvit.vlm.METHODS`.
        tokens: visual tokens the language model receives per image (prefix tokens such as LLaVA's class token
            under ``vision_feature_select_strategy="full"`` included), or None when ``keep_rate`` is set. For
            ``prumerge`` (adaptive) an upper bound, and None means no bound.
        keep_rate: the same as a fraction of the image's full token count (kept = ceil(rate * n)), or None.
        layer: 0-based index of the vision layer whose q/k score the tokens (negative counts from the end).
        positions: ``"original"`` (kept tokens keep the position they had in the full sequence) or ``"compact"``
            (the shortened sequence is renumbered, as VisionZip does).
        model: the patched model class.
    """

    method: str
    tokens: int | None
    keep_rate: float | None
    layer: int
    positions: str
    model: str

    def budget(self, full: int) -> int:
        """Tokens to keep out of ``full`` for one image (``full`` when nothing is to be reduced)."""
        if self.tokens is not None:
            return min(self.tokens, full)
        if self.keep_rate is not None:
            return keep_count(full, self.keep_rate)
        return full


def validate(method: str, tokens, keep_rate, positions: str, methods) -> tuple[int | None, float | None]:
    """Check the user's arguments; returns (tokens, keep_rate) with exactly one set (both None only for prumerge)."""
    if not isinstance(method, str) or method not in methods:
        raise InvalidArgumentError(f"unknown tpsvit.vlm method {method!r}; choose one of {', '.join(methods)}")
    if positions not in POSITIONS:
        raise InvalidArgumentError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if tokens is not None and keep_rate is not None:
        raise InvalidArgumentError(f"give tokens or keep_rate, not both (got tokens={tokens!r}, "
                                   f"keep_rate={keep_rate!r})")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise InvalidArgumentError(f"tokens must be a positive int (visual tokens per image), got {tokens!r}")
    elif keep_rate is not None:
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not (0 < keep_rate <= 1) \
                or math.isnan(keep_rate):
            raise InvalidArgumentError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
        keep_rate = float(keep_rate)
    elif method != "prumerge":
        raise InvalidArgumentError(f"method {method!r} needs tokens=N (visual tokens per image) or keep_rate=r "
                                   "in (0, 1]")
    return tokens, keep_rate


def resolve_layer(layer, depth: int, default: int) -> int:
    """The 0-based scoring layer: ``layer`` (negative from the end) or ``default``, checked against ``depth``."""
    if layer is None:
        layer = default
    if isinstance(layer, bool) or not isinstance(layer, int) or not (-depth <= layer < depth):
        raise InvalidArgumentError(f"layer must be an int in [{-depth}, {depth - 1}] (the vision tower has {depth} "
                                   f"layers), got {layer!r}")
    return layer % depth
