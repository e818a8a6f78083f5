"""The training path against float64 references written from the paper's formulas (docs/squeeze_evidence.md).

The references are dense and plain: every similarity, host and weight as a matrix. The masked squeeze uses the
authors' release's weight form ``exp(m * c) * m`` with ``m = (1 - keep) * prev`` for every token that has a nearest kept
token, so that the straight-through gradients of the keep decisions are the release's; the model-level checks run a
patched tiny ViT in train mode (dTPS with Gumbel decisions, eTPS with its gather squeeze) next to a reference forward
built from the same timm modules, with the same Gumbel noise, and compare the loss and every parameter's gradient.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import tpsvit
from tpsvit.core.squeeze import squeeze_masked
from tpsvit.patch import forward_state, set_predictor_training

E = math.e
EPS = 1e-6


def _unit(x):
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def reference_squeeze_masked(x, keep, prev):
    """Paper.md "Squeeze" on the full-length sequence, float64: hosts among the kept tokens (never itself), donors the
    tokens pruned now, weight exp(m * c) * m per token with a host (m = (1 - keep) * prev)."""
    x, keep, prev = x.double(), keep.double(), prev.double()
    n = x.shape[1]
    sim = _unit(x) @ _unit(x).transpose(1, 2)
    candidate = (keep.detach() > 0.5)[:, None, :] & ~torch.eye(n, dtype=torch.bool)
    best, host = sim.masked_fill(~candidate, float("-inf")).max(dim=-1)
    has_host = torch.isfinite(best)
    m = (1.0 - keep) * prev
    c = torch.where(has_host, best, torch.zeros_like(best))
    w = torch.exp(m * c) * m * has_host.double()  # (B, i)
    weights = F.one_hot(host, n).double() * w[..., None]  # (B, i donor, j host)
    numer = E * x + weights.transpose(1, 2) @ x
    return numer / (E + weights.sum(dim=1))[..., None]


def reference_squeeze(reserved, pruned):
    """Paper.md "Squeeze", gather form, float64: (e r_j + sum_{h(i)=j} e^{c_ij} p_i) / (e + sum_{h(i)=j} e^{c_ij})."""
    reserved, pruned = reserved.double(), pruned.double()
    best, host = (_unit(pruned) @ _unit(reserved).transpose(1, 2)).max(dim=-1)
    weights = F.one_hot(host, reserved.shape[1]).double() * torch.exp(best)[..., None]  # (B, i, j)
    return (E * reserved + weights.transpose(1, 2) @ pruned) / (E + weights.sum(dim=1))[..., None]


def _grads(fn, *tensors, seed=0):
    leaves = [t.detach().clone().double().requires_grad_() for t in tensors]
    out = fn(*leaves)
    torch.manual_seed(seed)
    (out * torch.randn_like(out)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def _masks(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    prev = (torch.rand(batch, n, generator=g) > 0.25).double()
    keep = prev * (torch.rand(batch, n, generator=g) > 0.5).double()
    keep[:, 0] = prev[:, 0] = 1.0  # every image keeps a host
    return keep, prev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_squeeze_values_and_straight_through_gradients_match_the_reference(seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 14, 8, dtype=torch.float64)
    keep, prev = _masks(3, 14, seed)
    out, grads = _grads(squeeze_masked, x, keep, prev)
    ref, ref_grads = _grads(reference_squeeze_masked, x, keep, prev)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("tokens", "keep", "prev"), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"gradient w.r.t. {name}")
    # The release's form reaches the kept tokens too: d/dm = 1 where m = 0, so kept decisions get a gradient.
    assert grads[1][keep > 0].abs().sum() > 0


def test_gather_squeeze_gradients_match_the_reference():
    torch.manual_seed(3)
    reserved, pruned = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    out, grads = _grads(tpsvit.squeeze, reserved, pruned)
    ref, ref_grads = _grads(reference_squeeze, reserved, pruned)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- model-level references


def _attention(attn, x, policy):
    """timm Attention, or (policy given) each query seeing the kept tokens and itself, from the block's weights."""
    batch, tokens, channels = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if policy is None:
        weights = logits.softmax(dim=-1)
    else:
        allowed = policy[:, None, None, :] + (1 - policy[:, None, None, :]) * torch.eye(tokens, dtype=x.dtype)
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True)) * allowed
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))
    return out, weights


def _predict(predictor, patches, keep):
    hidden = predictor.embed(patches)
    half = hidden.shape[-1] // 2
    glob = (hidden[..., half:] * keep[..., None]).sum(1, keepdim=True) / keep.sum(1, keepdim=True)[..., None]
    return predictor.head(torch.cat([hidden[..., :half], glob.expand(-1, patches.shape[1], -1)], dim=-1))


def reference_dtps(model, images, locations):
    """dTPS training forward (paper.md "Prune", "Squeeze"): Gumbel keep x previous keep, masked squeeze of the tokens
    pruned now, masked attention after; returns (logits, keep decisions per location)."""
    h = model.patch_drop(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    keep, policy, decisions = torch.ones(h.shape[0], h.shape[1] - prefix, dtype=h.dtype), None, []
    for index, block in enumerate(model.blocks):
        if index in locations:
            patches = h[:, prefix:]
            new = F.gumbel_softmax(_predict(model.tps_predictors[str(index)], patches, keep), hard=True)[..., 0] * keep
            h = torch.cat([h[:, :prefix], reference_squeeze_masked(patches, new, keep)], dim=1)
            keep = new
            decisions.append(keep)
            policy = torch.cat([torch.ones_like(keep[:, :prefix]), keep], dim=1)
        h = h + block.ls1(_attention(block.attn, block.norm1(h), policy)[0])
        h = h + block.ls2(block.mlp(block.norm2(h)))
    return model.forward_head(model.norm(h)), decisions


def reference_etps(model, images, locations, keep_rate):
    """eTPS forward (train mode is the inference path): inside the block, top-k by class attention (mean over heads),
    the gather squeeze of the rest into the kept tokens."""
    h = model.patch_drop(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    for index, block in enumerate(model.blocks):
        out, weights = _attention(block.attn, block.norm1(h), None)
        h = h + block.ls1(out)
        if index in locations:
            patches, n = h[:, prefix:], h.shape[1] - prefix
            order = weights[:, :, 0, prefix:].mean(dim=1).argsort(dim=1, descending=True)
            k = math.ceil(keep_rate * n - 1e-9)
            kept, pruned = order[:, :k].sort(dim=1).values, order[:, k:]

            def take(idx, patches=patches):
                return patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))

            h = torch.cat([h[:, :prefix], reference_squeeze(take(kept), take(pruned))], dim=1)
        h = h + block.ls2(block.mlp(block.norm2(h)))
    return model.forward_head(model.norm(h))


def _loss(logits, labels, decisions=(), rates=()):
    total, target = F.cross_entropy(logits, labels), 1.0
    for keep, rate in zip(decisions, rates, strict=True):
        target *= rate
        total = total + 2.0 * (keep.mean(dim=1) - target).pow(2).mean() / len(decisions)
    return total


def _compare_gradients(model, reference, loss, ref_loss):
    model.zero_grad()
    reference.zero_grad()
    loss.backward()
    ref_loss.backward()
    theirs = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        want = theirs[name].grad
        if param.grad is None and want is None:
            continue
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
        checked += 1
    return checked


@pytest.mark.parametrize("variant", [{}, {"init_values": 1e-1}])
def test_dtps_train_mode_loss_and_gradients_match_the_reference(variant):
    locations, rates = (1, 3), (0.5, 0.5)
    model = tpsvit.patch(tiny_vit(depth=5, **variant).double(), "dtps", keep_rate=rates[0], locations=locations)
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    set_predictor_training(model, "gumbel")
    torch.manual_seed(4)
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 7, (4,))
    torch.manual_seed(5)
    logits = model(images)
    decisions = forward_state(model).decisions
    torch.manual_seed(5)  # the same Gumbel noise
    ref_logits, ref_decisions = reference_dtps(reference, images, locations)
    for got, want in zip(decisions, ref_decisions, strict=True):
        assert torch.equal(got.detach(), want.detach())
    assert 0 < float(decisions[-1].detach().sum()) < decisions[-1].numel()  # something was pruned and something kept
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    loss, ref_loss = _loss(logits, labels, decisions, rates), _loss(ref_logits, labels, ref_decisions, rates)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    checked = _compare_gradients(model, reference, loss, ref_loss)
    assert checked == sum(1 for _ in model.parameters())  # predictors and every backbone parameter got a gradient


def test_etps_train_mode_loss_and_gradients_match_the_reference():
    locations = (1, 3)
    base = tiny_vit(depth=5).double()
    model = tpsvit.patch(copy.deepcopy(base), "etps", keep_rate=0.5, locations=locations).train()
    reference = copy.deepcopy(base).train()
    torch.manual_seed(6)
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 7, (4,))
    logits, ref_logits = model(images), reference_etps(reference, images, locations, 0.5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    loss, ref_loss = _loss(logits, labels), _loss(ref_logits, labels)
    assert _compare_gradients(model, reference, loss, ref_loss) == sum(1 for _ in model.parameters())
