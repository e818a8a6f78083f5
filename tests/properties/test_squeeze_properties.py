"""Properties of the squeeze: it conserves mass (each host's weights over itself and its donors sum to one), on
the gather path and the masked training path, over shapes, scales, temperatures and dtypes.

The weights are read through a channel of ones appended to every token: a host becomes the weighted mean of itself
and its donors, so that channel stays exactly 1 only if the weights sum to one. A host no token chose is returned
unchanged, and every output lies between the smallest and largest value of its inputs (a convex combination).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tpsvit.core.squeeze import squeeze_masked, squeeze_with_hosts

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _tokens(seed: int, shape: tuple[int, ...], scale: float, dtype) -> torch.Tensor:
    tokens = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    ones = torch.ones(*shape[:-1], 1)
    return torch.cat([tokens, ones], dim=-1).to(dtype)


@given(st.integers(1, 3), st.integers(1, 8), st.integers(0, 12), st.integers(1, 8), st.floats(1e-3, 1e3),
       st.floats(0.01, 100.0), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_host_weights_sum_to_one_on_the_gather_path(batch, reserved, pruned, channels, scale, temperature, dtype,
                                                    seed):
    r = _tokens(seed, (batch, reserved, channels), scale, dtype)
    p = _tokens(seed + 1, (batch, pruned, channels), scale, dtype)
    fused, host = squeeze_with_hosts(r, p, temperature)
    assert fused.shape == r.shape and fused.dtype == dtype and torch.isfinite(fused.float()).all()
    torch.testing.assert_close(fused[..., -1].float(), torch.ones(batch, reserved), rtol=0, atol=TOLERANCE[dtype])
    chosen = torch.zeros(batch, reserved, dtype=torch.bool).scatter(1, host, pruned > 0)
    assert torch.equal(fused[~chosen], r[~chosen])  # a host no token chose is returned as it was
    both = torch.cat([r, p], dim=1).float()
    slack = TOLERANCE[dtype] * scale
    assert bool((fused.float() >= both.amin(dim=1, keepdim=True) - slack).all())
    assert bool((fused.float() <= both.amax(dim=1, keepdim=True) + slack).all())


@given(st.integers(1, 3), st.integers(2, 12), st.integers(1, 8), st.floats(1e-3, 1e3), st.floats(0.01, 100.0),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_host_weights_sum_to_one_on_the_masked_path(batch, n, channels, scale, temperature, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = _tokens(seed, (batch, n, channels), scale, dtype)
    prev = (torch.rand(batch, n, generator=generator) < 0.8).float()
    keep = prev * (torch.rand(batch, n, generator=generator) < 0.5).float()
    keep[:, 0], prev[:, 0] = 1.0, 1.0  # at least one host
    fused = squeeze_masked(tokens, keep, prev, temperature)
    assert fused.shape == tokens.shape and torch.isfinite(fused.float()).all()
    hosts = keep > 0
    ones = torch.ones(int(hosts.sum()))
    torch.testing.assert_close(fused[hosts][:, -1].float(), ones, rtol=0, atol=TOLERANCE[dtype])
    assert torch.equal(fused[~hosts], tokens[~hosts])  # rows that are not hosts are left alone
