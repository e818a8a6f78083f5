"""tpsvit.restore: the full patch grid from the final tokens, each pruned patch carrying its host's feature."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit import LocationTrace, Trace, restore

METHODS = ("etps", "dtps", "evit", "dynamicvit", "tome")


def hand_trace() -> Trace:
    """6 patches on a 2x3 grid behind one class token, reduced twice.

    Location 1: keep patches 0, 2, 4, 5 (outputs 0..3); patch 1 is squeezed into output 0 (patch 0), patch 3 dropped.
    Location 2 (EViT-like): of those four tokens keep #3 (patch 5) and #0 (patch 0) as outputs 0 and 1, fuse #1
    (patch 2) and #2 (patch 4) into the extra token, output 2.
    """
    t = torch.tensor
    first = LocationTrace(block=1, positions=torch.arange(6)[None], kept=t([[0, 2, 4, 5]]), pruned=t([[1, 3]]),
                          host=t([[0, -1]]), num_out=4)
    second = LocationTrace(block=2, positions=t([[0, 2, 4, 5]]), kept=t([[3, 0]]), pruned=t([[1, 2]]),
                           host=t([[2, 2]]), num_out=3)
    return Trace(method="hand", num_prefix=1, num_patches=6, grid_size=(2, 3), locations=[first, second])


def test_assignment_follows_hosts_by_hand():
    trace = hand_trace()
    assert trace.assignment(upto=1).tolist() == [[0, 0, 1, -1, 2, 3]]
    assert trace.assignment().tolist() == [[1, 1, 2, -1, 2, 0]]


def test_restore_by_hand():
    cls, t0, t1, fused = [9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]
    tokens = torch.tensor([[cls, t0, t1, fused]])
    prefix, grid = restore(tokens, hand_trace())
    assert prefix.tolist() == [[cls]]
    # patch 0 kept (output 1), patch 1 squeezed into patch 0, patches 2 and 4 fused, patch 3 dropped, patch 5 kept
    assert grid.tolist() == [[t1, t1, fused, [0.0, 0.0], fused, t0]]


def test_restore_rejects_tokens_of_another_pass():
    tokens = torch.zeros(1, 1 + 5, 2)  # the trace ends with 3 patch tokens
    with pytest.raises(ValueError, match="3"):
        restore(tokens, hand_trace())


def _traced(method: str, keep_rate=0.6, locations=(1, 3), reg_tokens=0):
    model = tiny_vit(reg_tokens=reg_tokens)
    tpsvit.patch(model, method, keep_rate=keep_rate, locations=locations)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        tokens = model.forward_features(images)
    return model, tokens, trace


@pytest.mark.parametrize("method", METHODS)
def test_restore_on_a_patched_model(method):
    model, tokens, trace = _traced(method, reg_tokens=1)
    num_prefix, num_patches = model.num_prefix_tokens, model.patch_embed.num_patches
    prefix, grid = restore(tokens, trace)
    assert prefix.shape == (2, num_prefix, tokens.shape[-1])
    assert torch.equal(prefix, tokens[:, :num_prefix])
    assert grid.shape == (2, num_patches, tokens.shape[-1])
    final = tokens[:, num_prefix:]

    # every surviving token sits at its own grid cell
    positions = tpsvit.forward_state(model).positions
    assert positions.shape[1] == final.shape[1] < num_patches
    for b in range(2):
        cells = positions[b] >= 0
        assert torch.equal(grid[b, positions[b, cells]], final[b, cells])

    # every pruned patch carries the feature of its host, at every location (hosts followed through later ones)
    last = len(trace.locations) - 1
    for i, step in enumerate(trace.locations):
        for b in range(2):
            cells = step.positions[b, step.pruned[b]]
            for cell, host in zip(cells.tolist(), step.host[b].tolist()):
                if cell < 0:  # EViT's fused token pruned again: no cell of its own
                    continue
                if host < 0:
                    assert not grid[b, cell].any()  # dropped
                elif i == last:
                    assert torch.equal(grid[b, cell], final[b, host])
                else:
                    host_cell = int(step.positions[b, step.kept[b, host]]) if host < step.kept.shape[1] else -1
                    if host_cell >= 0:
                        assert torch.equal(grid[b, cell], grid[b, host_cell])

    zero_rows = (grid == 0).all(dim=-1).sum(dim=1)
    if method == "dynamicvit":
        assert zero_rows.tolist() == [num_patches - final.shape[1]] * 2
    else:
        assert zero_rows.tolist() == [0, 0]
    if method == "evit":  # the fused token (no grid cell) stands in for every patch it absorbed
        fused = final[:, -1]
        assert all((grid[b] == fused[b]).all(dim=-1).any() for b in range(2))


@pytest.mark.parametrize("method", METHODS)
def test_keep_rate_one_records_nothing_and_restore_returns_the_tokens(method):
    model, tokens, trace = _traced(method, keep_rate=1.0)
    assert trace.locations == []
    prefix, grid = restore(tokens, trace)
    assert grid.shape == (2, model.patch_embed.num_patches, tokens.shape[-1])
    assert torch.equal(prefix, tokens[:, :1]) and torch.equal(grid, tokens[:, 1:])




def test_restore_after_a_training_mode_pass_is_not_silently_wrong():
    model = tpsvit.patch(tiny_vit(), "dtps", keep_rate=0.5, locations=(1, 3)).train()
    with tpsvit.tracing(model) as trace:
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="masked training path"):
        restore(tokens, trace)


def test_restore_needs_a_traced_pass():
    with pytest.raises(ValueError, match="trace is empty"):
        restore(torch.randn(1, 5, 4), tpsvit.Trace())
