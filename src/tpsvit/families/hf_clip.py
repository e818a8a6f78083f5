"""transformers CLIP and SigLIP vision towers."""

from __future__ import annotations

from tpsvit.families.hf_common import HFFamily
from tpsvit.families.registry import register


class HFCLIPFamily(HFFamily):
    name = "transformers CLIP / SigLIP vision"
    models = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")
    layers = ("CLIPEncoderLayer", "SiglipEncoderLayer")
    norm1, norm2 = "layer_norm1", "layer_norm2"

    def attention_residual(self, block, y):
        return y

    def mlp_residual(self, block, x):
        return block.mlp(block.layer_norm2(x))


register(HFCLIPFamily())
