"""What the two timm families (``VisionTransformer``, ``Eva``) share: the model mixin and the block check."""

from __future__ import annotations

from torch import Tensor, nn

from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.families.base import PatchedModel


class TimmModel(PatchedModel):
    """Mixed into the model (timm ``VisionTransformer`` or ``Eva``): starts a fresh forward state per pass; exposes
    ``model.tps``; pools only the kept tokens on the masked path."""

    def _begin(self, args, kwargs) -> None:
        images = args[0] if args else kwargs.get("x")
        self._tps_runtime.family.check_images(self, images)
        self._tps_runtime.begin(self, images)

    def forward_features(self, *args, **kwargs):
        self._begin(args, kwargs)
        return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        self._begin(args, kwargs)
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        state = self._tps_runtime.state
        pool_type = self.global_pool if pool_type is None else pool_type
        if state is not None and state.policy is not None and pool_type == "avg" and self.attn_pool is None:
            keep = state.policy[:, self.num_prefix_tokens :, None].to(x.dtype)
            return (x[:, self.num_prefix_tokens :] * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        if state is not None and state.policy is not None and pool_type not in ("token", "avg", ""):
            raise InvalidArgumentError(
                f"pooling {pool_type!r} is not supported on the masked training path; use token or avg"
            )
        return super().pool(x, pool_type)


def check_blocks(model: nn.Module, block_cls: type, attention_cls, block_hint: str, attention_hint: str) -> nn.Module:
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
