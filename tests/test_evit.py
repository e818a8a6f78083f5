"""EViT as the authors released it: the pruned tokens fuse into one token, their class-attention-weighted *sum*.

The release's block, written out here (no release code is used): after attention, with ``a`` the class token's
attention row averaged over heads (softmax over all tokens), keep ``ceil(rate * (N - 1))`` non-class tokens with the
largest ``a``, and append ``sum_i a_i * x_i`` over the others (weights not renormalised) after the kept ones.
"""

import math

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.core.reducers import fuse_one_reduce


def test_fused_token_is_the_attention_weighted_sum():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [-2.0, 6.0]]])
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.05]])
    kept, pruned = torch.tensor([[0, 2]]), torch.tensor([[1, 3]])
    red = fuse_one_reduce(x, kept, pruned, scores)
    # 0.1 * (0, 2) + 0.05 * (-2, 6) = (-0.1, 0.5): a sum, not renormalised by 0.15
    torch.testing.assert_close(red.tokens, torch.tensor([[[1.0, 0.0], [4.0, 4.0], [-0.1, 0.5]]]))
    assert red.host.tolist() == [[2, 2]] and red.extra == 1
    mean = fuse_one_reduce(x, kept, pruned, scores, fuse="mean")  # the named option: weights renormalised
    torch.testing.assert_close(mean.tokens[:, 2], torch.tensor([[-0.1, 0.5]]) / 0.15)


def _release_evit_block(block, x, rate):
    """One EViT block of the release, written out on a timm block (no LayerScale, no q/k norm in this model)."""
    attn = block.attn
    batch, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, n, c))
    left = math.ceil(rate * (n - 1))
    if left < n - 1:
        cls_attn = weights[:, :, 0, 1:].mean(dim=1)  # (B, N-1)
        _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
        others = x[:, 1:]
        dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
        extra = torch.stack([(others[b][dropped[b]] * cls_attn[b][dropped[b]][:, None]).sum(0) for b in range(batch)])
        kept = others.gather(1, idx[..., None].expand(-1, -1, c))
        x = torch.cat([x[:, :1], kept, extra[:, None]], dim=1)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("rate, locations", [(0.5, (1, 3)), (0.7, (1, 2, 3, 4, 5))])
def test_patched_evit_matches_the_release_formula(rate, locations, images):
    model = tiny_vit()
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for index, block in enumerate(model.blocks):
            x = _release_evit_block(block, x, rate if index in locations else 1.0)
        expected = model.forward_head(model.norm(x))
        tpsvit.patch(model, "evit", keep_rate=rate, locations=locations)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
        assert tpsvit.patch(model, "evit", keep_rate=rate, locations=locations, fuse="mean").tps.fuse == "mean"
        assert (model(images) - expected).abs().max() > 1e-3  # the option really differs from the release


def test_fuse_is_evit_only():
    with pytest.raises(ValueError, match="fuse='mean' is EViT's option"):
        tpsvit.patch(tiny_vit(), "etps", locations=(1,), fuse="mean")
    with pytest.raises(ValueError, match="unknown fuse 'max'; allowed: sum, mean"):
        tpsvit.patch(tiny_vit(), "evit", locations=(1,), fuse="max")
