"""The two walk-throughs of docs/architecture.md, proven: a toy method and a toy model family, each added from outside
the package through the registries (no tpsvit file edited)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import tpsvit
from tpsvit.core.methods import METHODS, Method, register_method
from tpsvit.core.reducers import SCORED_REDUCERS, Reduction, gather_tokens, register_reducer
from tpsvit.families import PatchedModel, ViTFamily, register, unregister


# ---- how to add a method: a reducer function and one registry entry (eTPS's scorer, a new "add the mean" reducer)
def add_pruned_mean(x, kept, pruned, scores, config) -> Reduction:
    """Every kept token gets the mean of the pruned tokens added (a toy global squeeze)."""
    tokens = gather_tokens(x, kept) + gather_tokens(x, pruned).mean(dim=1, keepdim=True)
    return Reduction(tokens, kept, pruned, torch.zeros_like(pruned))


@pytest.fixture
def toy_method():
    register_reducer("add_mean", add_pruned_mean)
    method = register_method(Method("toy", "cls_attention", "add_mean", "inside", "toy: add the pruned mean"))
    yield method
    del METHODS["toy"], SCORED_REDUCERS["add_mean"]


def test_a_toy_method_runs_on_the_shared_engine(toy_method, images):
    model = tiny_vit()
    reference = model(images)
    assert torch.equal(tpsvit.patch(model, "toy", keep_rate=1.0, locations=(1, 3))(images), reference)
    tpsvit.patch(model, "toy", keep_rate=0.5, locations=(1, 3))
    with tpsvit.tracing(model) as trace:
        out = model(images)
    assert [step.num_out for step in trace.locations] == [32, 16]  # ceil(0.5 * 64), ceil(0.5 * 32)
    tpsvit.patch(model, "evit", keep_rate=0.5, locations=(1, 3))  # same scorer and counts, other reducer
    assert not torch.allclose(out, model(images))
    assert tpsvit.gmacs(tpsvit.patch(model, "toy", 0.5, (1, 3))) < tpsvit.gmacs(tpsvit.unpatch(model))


# ---- how to add a family: a model mixin that starts the forward state, and an adapter that says how to find things
class ToyViT(nn.Module):
    """Not a timm VisionTransformer: its own class, built from timm's Block (so the ViT adapter's hooks apply)."""

    def __init__(self, dim=48, depth=4, classes=5):
        super().__init__()
        self.patch_embed = PatchEmbed(32, 4, 3, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 3) for _ in range(depth))
        self.head = nn.Linear(dim, classes)
        self.num_prefix_tokens, self.embed_dim = 1, dim

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch_embed(x)], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


class ToyModel(PatchedModel):
    def forward(self, x):
        self._tps_runtime.begin(self)
        return super().forward(x)


class ToyFamily(ViTFamily):
    name, model_mixin = "toy ViT", ToyModel

    def matches(self, model):
        return isinstance(model, ToyViT)

    def check(self, model):
        """Every block is timm's Block: nothing to refuse."""


@pytest.fixture
def toy_family():
    family = register(ToyFamily())
    yield family
    unregister(family)


@pytest.mark.parametrize("method", ["etps", "evit", "tome", "dtps"])
def test_a_toy_family_gets_every_method(toy_family, method, images):
    torch.manual_seed(0)
    model = ToyViT().eval()
    reference = model(images)
    amount = {"r": 0} if method == "tome" else {"keep_rate": 1.0}
    tpsvit.patch(model, method, locations=(1, 2), **amount)
    assert torch.allclose(model(images), reference, atol=1e-6)
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 2))
    with tpsvit.tracing(model) as trace:
        assert model(images).shape == reference.shape
    expected = math.ceil(0.5 * 64) + (method == "evit")
    assert trace.locations[0].num_out == expected
    assert torch.equal(tpsvit.unpatch(model)(images), reference) and type(model) is ToyViT
