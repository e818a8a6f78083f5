import math

import pytest
import torch

import tpsvit
from tpsvit.core.squeeze import squeeze_masked, squeeze_with_hosts


def naive_squeeze(reserved, pruned, temperature=1.0):
    """The paper's formula, one token at a time, in float64."""
    out = reserved.double().clone()
    for b in range(reserved.shape[0]):
        num = math.e * reserved[b].double()
        den = torch.full((reserved.shape[1],), math.e, dtype=torch.float64)
        for p in pruned[b].double():
            cos = torch.nn.functional.cosine_similarity(p[None], reserved[b].double(), dim=-1) / temperature
            j = int(cos.argmax())
            num[j] += torch.exp(cos[j]) * p
            den[j] += torch.exp(cos[j])
        out[b] = num / den[:, None]
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1, 3.0])
def test_matches_naive_loop(temperature):
    torch.manual_seed(0)
    reserved, pruned = torch.randn(3, 7, 16), torch.randn(3, 11, 16)
    got = tpsvit.squeeze(reserved, pruned, temperature=temperature)
    assert got.shape == reserved.shape
    torch.testing.assert_close(got.double(), naive_squeeze(reserved, pruned, temperature), atol=1e-5, rtol=1e-5)


def test_hand_computed_case():
    reserved = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pruned = torch.tensor([[[2.0, 0.5]]])
    cos = 2.0 / math.sqrt(4.25)
    expected_host = (math.e * torch.tensor([1.0, 0.0]) + math.exp(cos) * torch.tensor([2.0, 0.5])) / (
        math.e + math.exp(cos)
    )
    fused, host = squeeze_with_hosts(reserved, pruned)
    assert host.tolist() == [[0]]
    torch.testing.assert_close(fused[0, 0], expected_host)
    assert torch.equal(fused[0, 1], reserved[0, 1])  # nobody chose it: bit-for-bit unchanged


def test_host_weight_stays_e_under_temperature():
    reserved = torch.tensor([[[1.0, 0.0]]])
    pruned = torch.tensor([[[3.0, 0.0]]])  # cos = 1
    for t in (0.5, 2.0):
        fused = tpsvit.squeeze(reserved, pruned, temperature=t)
        w = math.exp(1.0 / t)
        assert fused[0, 0, 0].item() == pytest.approx((math.e * 1 + w * 3) / (math.e + w), rel=1e-6)


def test_unmatched_reserved_unchanged_and_no_pruned_is_identity():
    torch.manual_seed(0)
    reserved = torch.randn(2, 5, 8)
    assert torch.equal(tpsvit.squeeze(reserved, reserved[:, :0]), reserved)
    pruned = reserved[:, :1] * 2  # each image's pruned token is parallel to reserved token 0
    fused = tpsvit.squeeze(reserved, pruned)
    assert torch.equal(fused[:, 1:], reserved[:, 1:])
    assert not torch.equal(fused[:, 0], reserved[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_stays_finite(dtype):
    torch.manual_seed(0)
    reserved = (torch.randn(2, 6, 32) * 300).to(dtype)
    pruned = (torch.randn(2, 9, 32) * 300).to(dtype)
    fused = tpsvit.squeeze(reserved, pruned, temperature=0.01)
    assert fused.dtype == dtype
    assert torch.isfinite(fused).all()
    ref = naive_squeeze(reserved.float(), pruned.float(), 0.01)
    torch.testing.assert_close(fused.double(), ref, atol=2.0, rtol=2e-2)


def test_tiny_temperature_does_not_overflow():
    torch.manual_seed(0)
    fused = tpsvit.squeeze(torch.randn(2, 4, 8), torch.randn(2, 6, 8), temperature=1e-4)
    assert torch.isfinite(fused).all()


def test_batch_independence():
    torch.manual_seed(0)
    reserved, pruned = torch.randn(4, 5, 8), torch.randn(4, 7, 8)
    full = tpsvit.squeeze(reserved, pruned)
    for b in range(4):
        torch.testing.assert_close(full[b : b + 1], tpsvit.squeeze(reserved[b : b + 1], pruned[b : b + 1]))


def test_masked_form_equals_gather_on_reserved_rows():
    torch.manual_seed(0)
    tokens = torch.randn(2, 12, 8)
    prev = torch.ones(2, 12)
    prev[:, 10:] = 0  # pruned at an earlier location: must take no part
    keep = prev.clone()
    keep[0, [1, 4, 5, 9]] = 0
    keep[1, [0, 2, 3, 7]] = 0
    out = squeeze_masked(tokens, keep, prev)
    for b in range(2):
        kept, now = keep[b].bool(), (prev[b] - keep[b]).bool()
        expected = tpsvit.squeeze(tokens[b : b + 1, kept], tokens[b : b + 1, now])
        torch.testing.assert_close(out[b : b + 1, kept], expected)
        torch.testing.assert_close(out[b, ~kept], tokens[b, ~kept])


def test_masked_form_passes_gradient_to_keep_decisions():
    torch.manual_seed(0)
    tokens = torch.randn(1, 6, 4)
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]], requires_grad=True)
    squeeze_masked(tokens, keep, torch.ones(1, 6)).sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="share batch and channel"):
        tpsvit.squeeze(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="reserved"):
        tpsvit.squeeze(torch.randn(3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        tpsvit.squeeze(torch.randn(1, 3, 4), torch.randn(1, 3, 4), temperature=0)
