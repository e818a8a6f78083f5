"""The tiny random models the property tests draw from: every family tpsvit patches, a few milliseconds a pass.

Each entry builds its model once (fixed seed); :func:`fresh` hands out deep copies, so an example can patch its copy
in place. Image sides: ``sizes`` are the ones the model accepts, ``bad_sizes`` ones it refuses.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import tpsvit
from tpsvit.core.methods import METHODS

ALL_METHODS = tuple(METHODS)
TIMM = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)
HF = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
          patch_size=4, layer_norm_eps=1e-6)


@dataclass(frozen=True)
class Entry:
    """One model of the zoo."""

    build: object  # () -> nn.Module (eval mode)
    hf: bool = False  # called as model(pixel_values=...)
    sizes: tuple[int, ...] = (32,)  # square image sides it accepts
    bad_sizes: tuple[int, ...] = (16, 40)  # ones it refuses
    pools_all: bool = False  # its head pools every token: the masked training path (dtps/dynamicvit) is refused
    class_token: bool = True  # without one, etps / evit score by the attention each token receives (all queries)
    depth: int = 4


def _hf(kind: str):
    import transformers as t

    if kind == "vit":
        return t.ViTForImageClassification(t.ViTConfig(**HF, num_labels=5))
    if kind == "deit_teacher":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**HF, num_labels=5))
    if kind == "dinov2":
        return t.Dinov2ForImageClassification(t.Dinov2Config(**HF, num_labels=5))
    if kind == "dinov2_registers":
        return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**HF, num_register_tokens=2))
    if kind == "clip":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**HF))
    if kind == "siglip":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**HF))
    raise KeyError(kind)


EVA_DINOV3 = dict(use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=2, init_values=0.1,
                  use_abs_pos_emb=False, qkv_bias=False, global_pool="avg", use_fc_norm=False)
EVA02 = dict(use_rot_pos_emb=True, rope_type="cat", swiglu_mlp=True, scale_mlp=True, mlp_ratio=4 * 2 / 3,
             ref_feat_shape=(4, 4))

ZOO: dict[str, Entry] = {
    "vit": Entry(lambda: VisionTransformer(**TIMM)),
    "vit_16px": Entry(lambda: VisionTransformer(**{**TIMM, "img_size": 16}), sizes=(16,), bad_sizes=(32,)),
    "deit_distilled": Entry(lambda: VisionTransformerDistilled(**TIMM)),
    "vit_registers": Entry(lambda: VisionTransformer(**TIMM, reg_tokens=2)),
    "vit_no_class_token": Entry(lambda: VisionTransformer(**TIMM, class_token=False, global_pool="avg"),
                                class_token=False),
    "vit_dynamic_size": Entry(lambda: VisionTransformer(**TIMM, dynamic_img_size=True), sizes=(32, 16, 40),
                              bad_sizes=(34,)),
    "eva_dinov3": Entry(lambda: Eva(**TIMM, **EVA_DINOV3)),
    "eva02": Entry(lambda: Eva(**TIMM, **EVA02)),
    "hf_vit": Entry(lambda: _hf("vit"), hf=True),
    "hf_deit_teacher": Entry(lambda: _hf("deit_teacher"), hf=True),
    "hf_dinov2": Entry(lambda: _hf("dinov2"), hf=True, sizes=(32, 16, 40), bad_sizes=(), pools_all=True),
    "hf_dinov2_registers": Entry(lambda: _hf("dinov2_registers"), hf=True, sizes=(32, 24), bad_sizes=()),
    "hf_clip": Entry(lambda: _hf("clip"), hf=True),
    "hf_siglip": Entry(lambda: _hf("siglip"), hf=True, pools_all=True, class_token=False),
}


WITH_CLASS_TOKEN = tuple(name for name, entry in ZOO.items() if entry.class_token)


@functools.cache
def _base(name: str):
    torch.manual_seed(0)
    return ZOO[name].build().eval()


def fresh(name: str, dtype: torch.dtype = torch.float32):
    """A new copy of zoo model ``name`` (eval mode) in ``dtype``."""
    return copy.deepcopy(_base(name)).to(dtype)


def images(name: str, batch: int, size: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random images for zoo model ``name``."""
    size = ZOO[name].sizes[0] if size is None else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(dtype)


def outputs(name: str, model, x) -> list[torch.Tensor]:
    """Every tensor the model returns for ``x`` (timm: the logits, or the tuple of heads; transformers: the
    output's tensor fields)."""
    with torch.no_grad():
        out = model(pixel_values=x) if ZOO[name].hf else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple):
        return list(out)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def num_patches(name: str) -> int:
    """Patch tokens of an input of the model's own size (4x4 patches)."""
    return (ZOO[name].sizes[0] // 4) ** 2


def patch(model, method: str, **kwargs):
    """:func:`tpsvit.patch`, silencing the warning of the class-free scorer (models without a class token)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tpsvit.patch(model, method, **kwargs)


def identity_amount(method: str) -> dict:
    """The amount that reduces nothing: keep 1, or r 0 for ToMe."""
    return {"r": 0} if method == "tome" else {"keep_rate": 1.0}


def refuses_masked_path(name: str, model) -> bool:
    """True when the patched ``model`` in train mode refuses the masked path: a learned method that really prunes
    (some keep rate < 1) on a head that pools every token."""
    config = model.tps
    return (model.training and ZOO[name].pools_all and config.spec.learned
            and any(rate < 1 for rate in config.keep_rate or ()))
