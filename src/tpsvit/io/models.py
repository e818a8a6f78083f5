"""Small ViTs for the embedded Fashion-MNIST default, registered with timm so ``timm.create_model`` builds them."""

from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

MINI_DEIT = "deit_mini_patch4_28"
MINI_DEIT_CLUTTERED = "deit_mini_patch8_56"


@register_model
def deit_mini_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny's depth (12 blocks, so locations 3/6/9 apply), 64 wide, 2 heads, 4x4 patches on 28x28 grey images.

    49 patch tokens + 1 class token. ``pretrained`` is accepted for timm's interface; weights ship with tpsvit
    (see :func:`tpsvit.io.assets.load_demo_model`), not through timm's hub.
    """
    return _mini_deit(dict(img_size=28, patch_size=4), kwargs)


@register_model
def deit_mini_patch8_56(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The same mini-DeiT with 8x8 patches on 56x56 grey images (cluttered Fashion-MNIST): 49 patch tokens."""
    return _mini_deit(dict(img_size=56, patch_size=8), kwargs)


def _mini_deit(size: dict, kwargs: dict) -> VisionTransformer:
    defaults = dict(in_chans=1, num_classes=10, embed_dim=64, depth=12, num_heads=2, **size)
    hub_only = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
    defaults.update({k: v for k, v in kwargs.items() if k not in hub_only})
    model = VisionTransformer(**defaults)
    # What timm.data.resolve_data_config reads: grey 28x28 inputs normalised with Fashion-MNIST statistics.
    model.pretrained_cfg = model.default_cfg = {
        "input_size": (defaults["in_chans"], defaults["img_size"], defaults["img_size"]),
        "mean": (0.2860,) * defaults["in_chans"],
        "std": (0.3530,) * defaults["in_chans"],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "num_classes": defaults["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return model
