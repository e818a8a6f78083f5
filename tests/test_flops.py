"""Analytic GMACs: the paper's reference numbers, and agreement with torch's flop counter for every method."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import VARIANTS, tiny_vit

import tpsvit
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.measure.flops import counted_gmacs, gmacs_per_block, register_cpu_attention_formula, vit_shape


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6)],
)
def test_unpatched_deit_matches_paper(name, expected):
    assert round(tpsvit.gmacs(meta_model(name)), 1) == expected


def test_deit_small_paper_schedule():
    model = meta_model("deit_small_patch16_224")
    tpsvit.patch(model, "etps", keep_rate=0.7, locations=(3, 6, 9))
    assert round(tpsvit.gmacs(model), 1) == 3.0
    tpsvit.patch(model, "tome", r=13)
    assert round(tpsvit.gmacs(model), 1) == 2.7


def test_breakdown_sums_and_follows_the_schedule():
    model = meta_model("deit_small_patch16_224")
    tpsvit.patch(model, "etps", keep_rate=0.7)
    parts = gmacs_per_block(model)
    assert parts["total"] == parts["embed"] + parts["head"] + sum(b["total"] for b in parts["blocks"])
    assert parts["gmacs"] == pytest.approx(tpsvit.gmacs(model))
    counts = model.tps.patch_tokens_per_block(196)
    assert [(b["tokens_attn"] - 1, b["tokens_mlp"] - 1) for b in parts["blocks"]] == counts
    # squeeze and scorer costs appear exactly at the locations
    assert [b["block"] for b in parts["blocks"] if b["squeeze"] > 0] == [3, 6, 9]
    assert [b["block"] for b in parts["blocks"] if b["scorer"] > 0] == [3, 6, 9]
    b3 = parts["blocks"][3]
    assert b3["squeeze"] == (196 - 138) * 138 * 384 and b3["scorer"] == 197 * 384


def test_img_size_changes_the_count():
    model = meta_model("deit_small_patch16_224")
    assert vit_shape(model, 448).num_patches == 784
    assert tpsvit.gmacs(model, img_size=448) > 4 * tpsvit.gmacs(model)


CASES = [
    ("etps", dict(keep_rate=0.5, locations=(1, 3))),
    ("etps", dict(keep_rate=0.7, locations=(1, 2, 4))),
    ("dtps", dict(keep_rate=0.6, locations=(0, 2))),
    ("evit", dict(keep_rate=0.5, locations=(1, 3))),
    ("dynamicvit", dict(keep_rate=0.6, locations=(0, 2))),
    ("tome", dict(keep_rate=0.6, locations=(1, 3))),
    ("tome", dict(r=7)),
    ("etps", dict(keep_rate=0.5, locations=(1, 3), scorer="random")),
]


@pytest.mark.parametrize(("method", "kwargs"), CASES)
def test_analytic_matches_flop_counter(method, kwargs):
    model = tpsvit.patch(tiny_vit(), method, **kwargs)
    analytic, counted = tpsvit.gmacs(model), counted_gmacs(model)
    assert analytic == pytest.approx(counted, rel=0.02)
    assert analytic < tpsvit.gmacs(tpsvit.unpatch(model))


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers"])
def test_analytic_matches_flop_counter_unpatched_and_prefix_tokens(variant):
    model = tiny_vit(**VARIANTS[variant])
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
    method = "dtps" if variant == "registers" else "etps"
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)


def test_flop_counter_sees_cpu_fused_attention():
    from torch.utils.flop_counter import flop_registry

    register_cpu_attention_formula()
    register_cpu_attention_formula()  # idempotent
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry


def test_errors():
    with pytest.raises(UnsupportedModelError):
        tpsvit.gmacs(torch.nn.Linear(3, 3))
    with pytest.raises(InvalidArgumentError, match="img_size"):
        tpsvit.gmacs(tiny_vit(), img_size="big")
