"""The class-free scorer of etps / evit (``scorer="attention_received"``, beyond the paper): the attention each patch
token receives, averaged over queries and heads, computed in chunks of queries."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.core.scoring import attention_received
from tpsvit.errors import InvalidArgumentError
from tpsvit.measure.flops import counted_gmacs, gmacs_per_block


def _naive(q, k, scale, num_prefix, bias=None):
    logits = (q @ k.transpose(-2, -1)) * scale  # the full (B, H, N, N) map
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=(1, 2))[:, num_prefix:]


@pytest.mark.parametrize("chunk_elements", [1, 2 * 3 * 17 * 3, 1 << 24])  # one query, odd chunks, all at once
@pytest.mark.parametrize("with_bias", [False, True])
def test_scorer_matches_the_full_attention_map(chunk_elements, with_bias):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    bias = torch.rand(2, 1, 1, 17).log() if with_bias else None
    got = attention_received(q, k, 8**-0.5, 1, bias, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, _naive(q, k, 8**-0.5, 1, bias))
    assert got.shape == (2, 16) and got.dtype == torch.float32


def cls_free_vit(**kw):
    return tiny_vit(class_token=False, global_pool="avg", **kw)


@pytest.mark.parametrize("method", ["etps", "evit"])
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}])
def test_default_on_a_model_without_class_token(method, kw, images):
    model = cls_free_vit(**kw)
    with torch.no_grad():
        reference = model(images)
        with pytest.warns(UserWarning, match="no class token.*attention_received"):
            tpsvit.patch(model, method, keep_rate=1.0, locations=(1, 3))
        assert model.tps.scorer == "attention_received" and "attention_received" in str(model.tps)
        torch.testing.assert_close(model(images), reference, rtol=0, atol=0)
        with pytest.warns(UserWarning):
            tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
        lengths = []
        hooks = [b.mlp.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1])) for b in model.blocks]
        out = model(images)
        for h in hooks:
            h.remove()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    prefix, extra = model.num_prefix_tokens, 1 if method == "evit" else 0
    n1 = math.ceil(0.5 * 64)
    n3 = math.ceil(0.5 * (n1 + extra))
    assert lengths == [prefix + 64] + [prefix + n1 + extra] * 2 + [prefix + n3 + extra] * 3


def test_explicit_choice_on_a_class_token_model_and_errors(images):
    model = tiny_vit()
    with torch.no_grad():
        reference = tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3))(images)
        tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3), scorer="attention_received")
        with tpsvit.tracing(model) as trace:
            received = model(images)
    assert model.tps.scorer == "attention_received"
    assert not torch.equal(received, reference)  # a different scorer keeps different tokens
    assert trace.locations[0].scores.sum(dim=1).lt(1.0 + 1e-5).all()  # patch columns of a mean of softmax rows
    for method in ("dtps", "dynamicvit", "tome"):
        with pytest.raises(InvalidArgumentError, match="attention_received"):
            tpsvit.patch(tiny_vit(), method, locations=(1,), scorer="attention_received")


def test_runtime_scores_equal_the_naive_map(images):
    model = tiny_vit()
    block = model.blocks[1]
    captured = {}
    block.norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1,), scorer="attention_received")
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        model(images)
        attn = block.attn
        qkv = attn.qkv(captured["x"]).reshape(3, 65, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        expected = _naive(qkv[0], qkv[1], attn.scale, 1)
    torch.testing.assert_close(trace.locations[0].scores, expected)


@pytest.mark.parametrize("method", ["etps", "evit"])
def test_flops_count_the_scorer(method):
    with pytest.warns(UserWarning):
        model = tpsvit.patch(cls_free_vit(reg_tokens=1), method, keep_rate=0.5, locations=(1, 3))
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
    blocks = gmacs_per_block(model)["blocks"]
    assert blocks[1]["scorer"] == 65 * 65 * 48
    assert tpsvit.gmacs(model) < tpsvit.gmacs(tpsvit.unpatch(model))


@pytest.mark.parametrize("method", ["etps", "evit", "tome"])
def test_siglip_style_model(method, images):
    """SigLIP-style: no class token, attention-pool (map) head; runs and its GMACs match the flop counter."""
    model = tiny_vit(class_token=False, global_pool="map", no_embed_class=True)
    reference = model(images)
    if method == "tome":
        tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    else:
        with pytest.warns(UserWarning, match="no class token"):
            tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    with torch.no_grad():
        assert model(images).shape == reference.shape
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
