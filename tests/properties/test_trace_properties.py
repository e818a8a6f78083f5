"""Properties of the token counts: at every location the trace follows the documented rounding (kept =
ceil(keep_rate * n) of the n patch tokens alive there, at least one; EViT adds its fused token when it prunes; ToMe
merges min(r, n // 2)), agrees with the analytic schedule that GMACs use, and never leaves zero patch tokens."""

from __future__ import annotations

import math

import torch
import zoo
from draws import valid_patches
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tpsvit


def expected_step(method: str, n: int, keep_rate: float | None, r: int | None) -> tuple[int, int]:
    """(tokens kept as themselves, patch tokens after) at one location, from the documentation (not from tpsvit's
    helpers)."""
    if method == "tome":
        merged = r if r is not None else n - min(n, max(1, math.ceil(keep_rate * n - 1e-9)))
        kept = n - min(merged, n // 2)
        return kept, kept
    kept = min(n, max(1, math.ceil(keep_rate * n - 1e-9)))  # the 1e-9: 0.7 * 10 is 7.000000000000001
    return kept, kept + (1 if method == "evit" and kept < n else 0)


@settings(max_examples=2 * settings().max_examples)
@given(valid_patches(), st.integers(1, 4), st.data())
@example(("vit_16px", "etps", {"locations": [0, 1, 2, 3], "keep_rate": 0.01}), 1, None)  # one token from block 0 on
@example(("vit_16px", "evit", {"locations": [0, 1, 2, 3], "keep_rate": 0.01}), 2, None)
@example(("vit_16px", "tome", {"locations": [0, 1, 2, 3], "r": 8}), 1, None)
def test_trace_counts_follow_the_rounding_and_never_reach_zero(patch, batch, data):
    name, method, kwargs = patch
    entry = zoo.ZOO[name]
    size = entry.sizes[0] if data is None else data.draw(st.sampled_from(entry.sizes), label="image side")
    model = zoo.patch(zoo.fresh(name), method, **kwargs)
    x = zoo.images(name, batch, size)
    with tpsvit.tracing(model) as trace:
        zoo.outputs(name, model, x)
    config = model.tps
    grid = (size // 4, size // 4)
    n = grid[0] * grid[1]
    assert trace.grid_size == grid
    schedule = config.patch_tokens_per_block(n)
    steps = iter(trace.locations)
    for block in config.locations:
        amount = config.reduction_at(block)
        kept, after = expected_step(method, n, amount["keep_rate"], amount["r"])
        assert after >= 1
        assert schedule[block][1 if config.spec.placement == "inside" else 0] == after
        if kept == n:  # nothing removed: no step
            continue
        step = next(steps)
        assert step.block == block and step.positions.shape == (batch, n)
        assert step.num_out == after and step.kept.shape[1] == kept and step.pruned.shape[1] == n - kept
        every = torch.cat([step.kept, step.pruned], dim=1).sort(dim=1).values
        assert torch.equal(every, torch.arange(n).expand(batch, -1))  # kept and pruned split the tokens
        host_ok = (step.host >= 0) & (step.host < after)
        assert bool((host_ok | (step.host == -1) if method == "dynamicvit" else host_ok).all())
        n = after
    assert next(steps, None) is None  # no step where nothing was removed
