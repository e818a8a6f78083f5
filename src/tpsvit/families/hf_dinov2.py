"""transformers DINOv2 with or without registers: models, classifiers and backbones."""

from __future__ import annotations

from tpsvit.families.hf_common import BACKBONES, HFFamily
from tpsvit.families.registry import register


class HFDinov2Family(HFFamily):
    name = "transformers DINOv2"
    models = (
        "Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
        "Dinov2WithRegistersForImageClassification", *BACKBONES,
    )
    layers = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    norm1, norm2 = "norm1", "norm2"
    any_image_size = True

    def attention_residual(self, block, y):
        return block.drop_path(block.layer_scale1(y))

    def mlp_residual(self, block, x):
        return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x))))


register(HFDinov2Family())
