"""A segmenter: a (patched) timm ViT, :func:`tpsvit.restore` back to the full patch grid, a dense head, and bilinear
upsampling to the image size."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import tpsvit
from tpsvit.core.trace import RESTORE_MODES
from tpsvit.dense.heads import tokens_to_grid
from tpsvit.errors import InvalidArgumentError
from tpsvit.families import PREDICTORS, family_of


class Segmenter(nn.Module):
    """Per-pixel logits (B, classes, H, W) of ``head`` on the backbone's final patch tokens.

    An unpatched backbone gives the full grid directly; a patched one is traced and its grid rebuilt by
    ``tpsvit.restore(mode=restore)`` (``"frozen"`` applies the backbone's final norm to the frozen features, as the
    tokens come after it). The head's output (B, classes, h, w) is upsampled bilinearly to the input's H x W.

    The backbone's classifier never runs here, so its weights are frozen. ``freeze_backbone``: no backbone weight
    gets a gradient and the backbone stays in eval mode (only the head trains; its features are computed without
    autograd). A backbone patched with a learned method (dtps, dynamicvit) takes its inference (gather) path in
    training too: the masked training path removes no token, so there would be no trace to restore. Its predictors
    are frozen (top-k decisions pass no gradient to them anyway), and only the backbone's own ``training`` flag,
    which picks the path, stays off: its blocks' dropout and drop-path follow :meth:`train` as usual.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, restore: str = "host", freeze_backbone: bool = False):
        super().__init__()
        if restore not in RESTORE_MODES:
            raise InvalidArgumentError(f"restore={restore!r} is not allowed; expected one of "
                                       f"{', '.join(RESTORE_MODES)}")
        family = family_of(backbone)
        if not hasattr(backbone, "forward_features") or family.grid_size(backbone) is None:
            raise InvalidArgumentError(f"{type(backbone).__name__} has no patch grid with forward_features; a "
                                       "segmenter needs a timm ViT-style model")
        if restore == "frozen" and not callable(getattr(backbone, "norm", None)):
            raise InvalidArgumentError("restore=frozen applies the backbone's final norm, and this one has none; "
                                       "use restore=host or zeros")
        self.backbone, self.head = backbone, head
        self.restore, self.freeze_backbone = restore, bool(freeze_backbone)
        self.prefix = family.num_prefix_tokens(backbone)
        self.grid = family.grid_size(backbone)
        if self.freeze_backbone:
            backbone.requires_grad_(False)
        heads, pool = family.head_parts(backbone)
        for unused in [*heads, pool, getattr(backbone, "fc_norm", None)]:
            if isinstance(unused, nn.Module):  # the classifier never runs here: frozen, so that DDP sees no idle weight
                unused.requires_grad_(False)
        predictors = getattr(backbone, PREDICTORS, None)
        if predictors is not None:
            predictors.requires_grad_(False)
        self.train(self.training)

    @property
    def gather_only(self) -> bool:
        """Whether the backbone is patched with a learned method, kept on its gather path in training too."""
        return tpsvit.is_patched(self.backbone) and self.backbone.tps.spec.learned

    def train(self, mode: bool = True):
        """Train mode for the head (and the backbone unless frozen); see the class docstring for learned methods."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        elif self.gather_only:
            self.backbone.training = False  # the path switch only (tpsvit.runtime: masked = learned and training)
        return self

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's final patch tokens of ``x`` on the full grid: (B, num_patches, C), restored if patched."""
        with torch.no_grad() if self.freeze_backbone else contextlib.nullcontext():
            if not tpsvit.is_patched(self.backbone):
                return self.backbone.forward_features(x)[:, self.prefix:]
            with tpsvit.tracing(self.backbone) as trace:
                tokens = self.backbone.forward_features(x)
            norm = self.backbone.norm if self.restore == "frozen" else None
            return tpsvit.restore(tokens, trace, mode=self.restore, norm=norm)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, classes, H, W) logits."""
        grid = tokens_to_grid(self.patch_grid(x), *self.grid)
        return F.interpolate(self.head(grid), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def gmacs(self, img_size=None) -> float:
        """Multiply-accumulates per image, in G: the backbone's (:func:`tpsvit.gmacs`, current patch) + the head's."""
        h, w = self.grid
        if img_size is not None:
            side = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
            h, w = family_of(self.backbone).input_grid(self.backbone, int(side[0]), int(side[1]))
        return float(tpsvit.gmacs(self.backbone, img_size=img_size)) + self.head.macs(h, w) / 1e9
