"""Under CPU bf16 autocast, the float32 products (squeeze similarities, class-attention row, ToMe matching) really
run in float32: same dtype, same host choices, same kept tokens as without autocast."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.core.reducers import bipartite_merge
from tpsvit.core.scoring import class_attention, masked_class_attention, top_k_split
from tpsvit.core.squeeze import squeeze_masked, squeeze_with_hosts


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def near_ties(batch=4, n=120, c=64, seed=0):
    """Tokens that are small perturbations of a few directions: many near-equal similarities."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, c, generator=g)
    pick = torch.randint(0, 3, (batch, n), generator=g)
    return base.gather(1, pick[..., None].expand(-1, -1, c)) + 0.05 * torch.randn(batch, n, c, generator=g)


def test_squeeze_hosts_in_float32_under_autocast():
    x = near_ties()
    reserved, pruned = x[:, :60], x[:, 60:]
    ref, ref_host = squeeze_with_hosts(reserved, pruned)
    with bf16():
        out, host = squeeze_with_hosts(reserved, pruned)
    assert out.dtype == torch.float32
    assert torch.equal(host, ref_host)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    keep = (torch.arange(120) % 3 != 0).float().expand(4, -1).contiguous()
    prev = torch.ones(4, 120)
    ref = squeeze_masked(x, keep, prev)
    with bf16():
        out = squeeze_masked(x, keep, prev)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_class_attention_row_in_float32_under_autocast():
    model = tiny_vit()
    attn = model.blocks[1].attn
    x = near_ties(batch=2, n=65, c=model.embed_dim)
    with torch.no_grad():
        qkv = attn.qkv(x)
        ref = class_attention(attn, qkv, 1)
        alive = (torch.arange(64) % 4 != 0).float().expand(2, -1)
        ref_masked = masked_class_attention(attn, x, alive, 1)
        with bf16():
            row = class_attention(attn, qkv, 1)
        with bf16():  # the qkv projection itself runs in bf16 here, as in a real autocast forward
            masked = masked_class_attention(attn, x, alive, 1)
    assert row.dtype == torch.float32 and torch.equal(row, ref)
    assert masked.dtype == torch.float32
    torch.testing.assert_close(masked, ref_masked, rtol=0.05, atol=2e-3)  # only the bf16 qkv differs
    assert torch.equal(top_k_split(row, 40)[0], top_k_split(ref, 40)[0])  # the same tokens kept


def test_tome_matching_in_float32_under_autocast():
    x = near_ties(n=121)
    metric = near_ties(n=121, c=16, seed=1)
    ref = bipartite_merge(x, metric, None, r=30, num_prefix=1)
    with bf16():
        out = bipartite_merge(x, metric, None, r=30, num_prefix=1)
    assert torch.equal(out.kept, ref.kept) and torch.equal(out.pruned, ref.pruned)
    assert torch.equal(out.host, ref.host)
    torch.testing.assert_close(out.tokens, ref.tokens)


@pytest.mark.parametrize("method", ["etps", "evit", "tome"])
def test_patched_model_under_autocast_keeps_float32_scores(method):
    model = tpsvit.patch(tiny_vit(), method, keep_rate=0.5, locations=(1, 2), **({"r": 8} if method == "tome" else {}))
    with tpsvit.tracing(model) as trace, torch.no_grad(), bf16():
        model(torch.randn(2, 3, 32, 32))
    assert trace.locations
    for step in trace.locations:
        assert step.scores is None or step.scores.dtype == torch.float32
