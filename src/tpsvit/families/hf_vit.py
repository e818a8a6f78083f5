"""transformers ViT / DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiT*``; + distillation token)."""

from __future__ import annotations

from tpsvit.families.hf_common import HFFamily
from tpsvit.families.registry import register


class HFViTFamily(HFFamily):
    name = "transformers ViT / DeiT"
    models = (
        "ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
    )
    layers = ("ViTLayer", "DeiTLayer")
    norm1, norm2 = "layernorm_before", "layernorm_after"

    def attention_residual(self, block, y):
        dropout = getattr(block, "dropout", None)  # transformers 5; in 4 the attention's output applies it
        return dropout(y) if dropout is not None else y

    def mlp_residual(self, block, x):
        h = block.layernorm_after(x)
        if hasattr(block, "mlp"):
            return block.dropout(block.mlp(h))
        return block.output.dropout(block.output.dense(block.intermediate(h)))  # transformers 4


register(HFViTFamily())
