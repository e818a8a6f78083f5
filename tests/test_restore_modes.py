"""restore(mode=...): "host" (the token a patch went into), "frozen" (its own feature where it left), "zeros"."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from test_restore import hand_trace

import tpsvit
from tpsvit import restore
from tpsvit.errors import InvalidArgumentError

METHODS = ("etps", "dtps", "evit", "dynamicvit", "tome")


def _traced(model, method, images, keep_rate=0.5, locations=(1, 3)):
    amount = {"r": 12} if method == "tome" else {"keep_rate": keep_rate}
    tpsvit.patch(model, method, locations=locations, **amount)
    with tpsvit.tracing(model) as trace:
        tokens = model.forward_features(images)
    return tokens, trace


def test_hand_trace_survivors_and_modes():
    trace = hand_trace()  # patch 1 squeezed and 3 dropped at location 1; patches 2 and 4 fused at location 2
    assert trace.survivors(upto=1).tolist() == [[True, False, True, False, True, True]]
    assert trace.survivors().tolist() == [[True, False, False, False, False, True]]
    trace.frozen = torch.arange(7.0).repeat_interleave(2).view(1, 7, 2) + 100  # patch i's frozen feature: 100 + i
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    _, frozen = restore(tokens, trace, mode="frozen")
    assert frozen.tolist() == [[[3, 4], [101, 101], [102, 102], [103, 103], [104, 104], [1, 2]]]
    _, zeros = restore(tokens, trace, mode="zeros")
    assert zeros.tolist() == [[[3, 4], [0, 0], [0, 0], [0, 0], [0, 0], [1, 2]]]


@pytest.mark.parametrize("mode", ["host", "frozen", "zeros"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_one_restores_the_unpatched_grid_exactly(method, mode, images):
    model = tiny_vit()
    reference = model.forward_features(images)
    amount = {"r": 0} if method == "tome" else {"keep_rate": 1.0}
    tpsvit.patch(model, method, locations=(1, 3), **amount)
    with tpsvit.tracing(model) as trace:
        tokens = model.forward_features(images)
    prefix, grid = restore(tokens, trace, mode=mode)
    assert torch.equal(torch.cat([prefix, grid], dim=1), reference)


def _stream_at(model, images, block: int, placement: str) -> torch.Tensor:
    """The unpatched model's patch tokens where a reduction at ``block`` acts: its input ("before") or the
    post-attention stream ("inside")."""
    seen = []
    hook = model.blocks[block].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.forward_features(images)
    hook.remove()
    x = seen[0]
    if placement == "inside":
        b = model.blocks[block]
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
    return x[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("method", METHODS)
def test_a_patch_pruned_at_the_first_location_is_frozen_with_its_feature_there(method, images):
    model = tiny_vit(reg_tokens=2)
    expected = _stream_at(model, images, 1, tpsvit.METHODS[method].placement)
    tokens, trace = _traced(model, method, images)
    _, grid = restore(tokens, trace, mode="frozen")
    first = trace.locations[0]
    gone = first.positions.gather(1, first.pruned)  # grid cells removed at block 1
    rows = torch.arange(len(images))[:, None]
    assert torch.allclose(grid[rows, gone], expected[rows, gone], atol=1e-5)
    assert trace.frozen.shape == (len(images), 65, 48)  # one buffer per pass (64 patches + a sink), not per location


@pytest.mark.parametrize("method", METHODS)
def test_modes_agree_on_survivors_and_keep_the_prefix(method, images):
    model = tiny_vit(reg_tokens=4)
    tokens, trace = _traced(model, method, images)
    results = {mode: restore(tokens, trace, mode=mode) for mode in ("host", "frozen", "zeros")}
    alive = trace.survivors()
    for prefix, grid in results.values():
        assert prefix.shape == (3, 5, 48) and torch.equal(prefix, tokens[:, :5]) and grid.shape == (3, 64, 48)
    host, frozen, zeros = (results[m][1] for m in ("host", "frozen", "zeros"))
    assert torch.equal(host[alive], frozen[alive]) and torch.equal(host[alive], zeros[alive])
    assert not alive.all() and torch.count_nonzero(zeros[~alive]) == 0
    assert torch.count_nonzero(frozen[~alive].abs().sum(-1)) == int((~alive).sum())  # every removed patch has one


def test_frozen_features_through_the_final_norm(images):
    model = tiny_vit()
    tokens, trace = _traced(model, "etps", images)
    _, raw = restore(tokens, trace, mode="frozen")
    _, normed = restore(tokens, trace, mode="frozen", norm=model.norm)
    alive = trace.survivors()
    assert torch.allclose(normed[~alive], model.norm(raw[~alive])) and torch.equal(normed[alive], raw[alive])


def test_bad_mode_names_the_allowed_ones(images):
    tokens, trace = _traced(tiny_vit(), "etps", images)
    with pytest.raises(InvalidArgumentError, match="'nearest'; allowed: host, frozen, zeros"):
        restore(tokens, trace, mode="nearest")
    with pytest.raises(InvalidArgumentError, match="norm applies to mode='frozen' only"):
        restore(tokens, trace, mode="host", norm=torch.nn.Identity())
