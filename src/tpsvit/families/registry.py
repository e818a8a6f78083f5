"""The family registry: every family module registers its adapter here; :func:`family_of` finds a model's."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tpsvit.errors import UnsupportedModelError
from tpsvit.families.base import Family

FAMILIES: list[Family] = []  # in registration order; the first that matches a model is its family
_REFUSALS: list[Callable[[nn.Module], None]] = []


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a family module calls this once, at import); returns it."""
    if any(type(known) is type(family) for known in FAMILIES):
        raise ValueError(f"family {family.name!r} ({type(family).__name__}) is registered already")
    FAMILIES.append(family)
    return family


def unregister(family: Family) -> None:
    """Remove ``family`` from the registry (tests that add a toy family)."""
    FAMILIES.remove(family)


def register_refusal(refuse: Callable[[nn.Module], None]) -> None:
    """Add a check that raises :class:`UnsupportedModelError` for models of a library no family matched."""
    _REFUSALS.append(refuse)


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
    for family in FAMILIES:
        if family.matches(model):
            family.check(model)
            return family
    for refuse in _REFUSALS:
        refuse(model)
    for cls in type(model).__mro__:
        if cls.__name__ in REFUSED:
            raise UnsupportedModelError(f"tpsvit cannot patch a timm {cls.__name__}: {REFUSED[cls.__name__]}")
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP, DINOv2, SigLIP, "
        "register-token ViTs) nor a timm Eva (EVA-02, DINOv3, Perception Encoder, RoPE ViTs); tpsvit cannot patch it"
    )
