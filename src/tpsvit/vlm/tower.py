"""q / k capture on one layer of a Hugging Face vision tower tpsvit knows (CLIP, SigLIP, ViT / DeiT, DINOv2), through
the family adapters' forward hooks on the attention's q and k projections."""

from __future__ import annotations

from torch import Tensor, nn

import tpsvit.families  # noqa: F401  (registers the families)
from tpsvit.errors import UnsupportedModelError
from tpsvit.families.registry import family_of
from tpsvit.vlm.scoring import mean_keys, token_scores

TOWERS = ("CLIPVisionModel", "SiglipVisionModel", "ViTModel")


class TowerCapture:
    """Hooks on layer ``layer`` of ``tower``; :meth:`take` returns the last forward's scores and keys."""

    def __init__(self, tower: nn.Module, layer: int):
        if type(tower).__name__ not in TOWERS:
            raise UnsupportedModelError(f"tpsvit.vlm scores the vision towers {', '.join(TOWERS)}; this model's "
                                        f"tower is {type(tower).__name__}")
        self.family = family_of(tower)
        self.block = self.family.blocks(tower)[layer]
        self.scale = self.family.attn_scale(self.block)
        self.class_token = bool(self.family.has_class_token(tower))
        self.family.install(self.block)

    @staticmethod
    def depth(tower: nn.Module) -> int:
        """Number of layers of ``tower``."""
        return len(family_of(tower).blocks(tower))

    def take(self) -> tuple[Tensor, Tensor]:
        """(q, k) of the layer's last forward pass, each (B, H, N, D) as its attention used them."""
        capture = self.family.take_capture(self.block)
        if capture is None:
            raise UnsupportedModelError("the vision layer tpsvit.vlm scores with did not run in this forward pass")
        return self.family.query_key(self.block, capture, {})

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """(B, N) scores of all the layer's tokens (class attention, or attention received without a class token)."""
        return token_scores(q, k, self.scale, self.class_token)

    keys = staticmethod(mean_keys)

    def remove(self) -> None:
        self.family.uninstall(self.block)
