"""Predictor warm start: distilling class attention makes a fresh predictor rank tokens as the class token does."""

from __future__ import annotations

import pytest
import timm
import torch

import tpsvit
from tpsvit.core.scoring import masked_class_attention
from tpsvit.train.warm_start import warm_start_predictors


def _overlap(model: torch.nn.Module, images: torch.Tensor, k: int) -> float:
    """Mean top-k overlap between the predictor at block 1 and block 1's class attention, on unpruned tokens."""
    block = model.blocks[1]
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        tokens = type(model.blocks[0])._tps_base.forward(model.blocks[0], tokens)
        attention = masked_class_attention(block.attn, block.norm1(tokens), torch.ones(len(images), 49), 1)
        scores = model.tps_predictors["1"](tokens[:, 1:])[..., 0]
    a, b = attention.topk(k, dim=1).indices, scores.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True)) / (len(images) * k)


def test_warm_start_teaches_the_predictor_the_class_attention_ranking():
    torch.manual_seed(0)
    model = timm.create_model("deit_mini_patch4_28", depth=3, embed_dim=32)
    tpsvit.patch(model, method="dtps", keep_rate=0.5, locations=[1])
    images = torch.randn(256, 1, 28, 28)
    held_out = torch.randn(64, 1, 28, 28)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("tps_predictors.")}
    before = _overlap(model, held_out, 25)
    losses = warm_start_predictors(model, [(images[i:i + 64], None) for i in range(0, 256, 64)], 120, 3e-3,
                                   progress=False)
    after = _overlap(model, held_out, 25)
    assert len(losses) == 120 and losses[-1] < 0.2 * losses[0]
    assert before < 0.7 and after > 0.9
    for key, value in backbone.items():  # only the predictors moved
        assert torch.equal(value, model.state_dict()[key]), key
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_warm_start_needs_a_learned_predictor():
    model = tpsvit.patch(timm.create_model("deit_mini_patch4_28", depth=2), method="etps", locations=[1])
    with pytest.raises(ValueError, match="dtps or dynamicvit"):
        warm_start_predictors(model, [], 1, 1e-3)
