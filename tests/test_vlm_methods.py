"""The VLM reduction methods on plain tensors: what each keeps, merges and where its tokens sit."""

from __future__ import annotations

import pytest
import torch

import tpsvit.vlm as vlm
from tpsvit.errors import InvalidArgumentError
from tpsvit.vlm.methods.base import Context, select
from tpsvit.vlm.methods.pool import pool_grid
from tpsvit.vlm.methods.prumerge import outlier_count
from tpsvit.vlm.methods.visionzip import contextual_count

B, H, W, C = 2, 4, 6, 8


def _ctx(scores=None, keys=None):
    return Context(grid=(H, W), score_fn=(lambda: scores) if scores is not None else None,
                   keys_fn=(lambda: keys) if keys is not None else None)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * W, C, generator=g), torch.rand(B, H * W, generator=g),
            torch.randn(B, H * W, 5, generator=g))


@pytest.mark.parametrize("method", vlm.METHODS)
def test_every_method_returns_sorted_distinct_places(method):
    x, scores, keys = _inputs()
    out = select(vlm.REGISTRY[method], x, 6, 0, _ctx(scores, keys))
    for tokens, rep in out.per_image():
        assert tokens.shape[1] == C and tokens.shape[0] == rep.numel() <= 6
        assert bool((rep.diff() > 0).all()) and 0 <= int(rep.min()) and int(rep.max()) < H * W
        assert torch.isfinite(tokens).all()
    if method != "prumerge":
        assert out.tokens.shape == (B, 6, C) and out.counts is None


@pytest.mark.parametrize("method", [m for m in vlm.METHODS if m != "prumerge"])
def test_a_full_budget_returns_the_input_itself(method):
    x, scores, keys = _inputs()
    out = select(vlm.REGISTRY[method], x, H * W, 0, _ctx(scores, keys))
    assert out.tokens is x and torch.equal(out.rep[0], torch.arange(H * W))


def test_prefix_tokens_are_kept_and_counted():
    x, scores, keys = _inputs()
    cls = torch.randn(B, 1, C)
    out = select(vlm.REGISTRY["drop"], torch.cat([cls, x], dim=1), 5, 1, _ctx(scores, keys))
    assert out.tokens.shape == (B, 5, C) and torch.equal(out.tokens[:, :1], cls) and bool((out.rep[:, 0] == 0).all())
    top = scores.topk(4).indices.sort().values
    assert torch.equal(out.rep[:, 1:], top + 1)
    with pytest.raises(InvalidArgumentError, match="class token"):
        select(vlm.REGISTRY["drop"], torch.cat([cls, x], dim=1), 1, 1, _ctx(scores, keys))


def test_drop_keeps_the_top_scored_tokens_unchanged():
    x, scores, _ = _inputs()
    out = select(vlm.REGISTRY["drop"], x, 5, 0, _ctx(scores))
    top = scores.topk(5).indices.sort().values
    assert torch.equal(out.rep, top) and torch.equal(out.tokens, x.gather(1, top[..., None].expand(-1, -1, C)))


def test_tps_squeezes_the_pruned_tokens_into_the_kept_ones():
    x, scores, _ = _inputs()
    out = select(vlm.REGISTRY["tps"], x, 5, 0, _ctx(scores))
    kept = x.gather(1, out.rep[..., None].expand(-1, -1, C))
    assert torch.equal(out.rep, scores.topk(5).indices.sort().values)
    changed = (out.tokens - kept).abs().amax(dim=-1) > 0
    assert bool(changed.any(dim=1).all())  # every image's pruned tokens went somewhere
    # each output is a convex combination of inputs: inside the per-channel range of the image's tokens
    assert bool((out.tokens <= x.amax(dim=1, keepdim=True) + 1e-5).all())
    assert bool((out.tokens >= x.amin(dim=1, keepdim=True) - 1e-5).all())


def test_random_keeps_random_tokens_unchanged():
    x, _, _ = _inputs()
    torch.manual_seed(0)
    a = select(vlm.REGISTRY["random"], x, 5, 0, _ctx())
    torch.manual_seed(1)
    b = select(vlm.REGISTRY["random"], x, 5, 0, _ctx())
    assert not torch.equal(a.rep, b.rep)
    assert torch.equal(a.tokens, x.gather(1, a.rep[..., None].expand(-1, -1, C)))


def test_pool_averages_grid_windows():
    x, _, _ = _inputs()
    out = select(vlm.REGISTRY["pool"], x, 6, 0, _ctx())  # 4 x 6 -> 2 x 3 of 2 x 2 windows
    grid = x.view(B, H, W, C)
    first = grid[:, :2, :2].mean(dim=(1, 2))
    torch.testing.assert_close(out.tokens[:, 0], first)
    assert out.rep[0].tolist() == [0, 2, 4, 12, 14, 16]  # each window's top-left-of-centre token


def test_pool_grid_picks_the_closest_aspect_or_says_what_fits():
    assert pool_grid(4, 4, 4) == (2, 2)
    assert pool_grid(6, 4, 6) == (2, 3)
    assert pool_grid(576 // 4, 24, 24) == (12, 12)
    with pytest.raises(InvalidArgumentError, match=r"a \* b .* 6, 8"):
        pool_grid(7, 4, 4)


def test_visionzip_keeps_dominant_tokens_and_adds_contextual_ones():
    assert [contextual_count(k) for k in (1, 2, 64, 128, 192)] == [0, 1, 10, 20, 30]
    x, scores, keys = _inputs()
    out = select(vlm.REGISTRY["visionzip"], x, 8, 0, _ctx(scores, keys))
    dominant = scores.topk(8 - contextual_count(8)).indices
    for b in range(B):
        for index in dominant[b].tolist():  # dominant tokens are there, unchanged
            row = out.rep[b].tolist().index(index)
            assert torch.equal(out.tokens[b, row], x[b, index])
    assert out.tokens.shape == (B, 8, C)


def test_prumerge_counts_score_outliers_per_image():
    scores = torch.full((2, 24), 0.01)
    scores[0, [3, 9, 17]] = 0.5
    scores[1, [5]] = 0.8
    assert outlier_count(scores[0]) == 3 and outlier_count(scores[1]) == 1
    x, _, keys = _inputs()
    out = select(vlm.REGISTRY["prumerge"], x, H * W, 0, _ctx(scores, keys))
    assert out.counts.tolist() == [4, 2]  # the outliers + one token holding the rest
    assert out.rep[0, :4].tolist() == [3, 9, 17, 23] and out.rep[1, :2].tolist() == [5, 23]
    assert out.rep[1, 2:].eq(-1).all()  # padding
    capped = select(vlm.REGISTRY["prumerge"], x, 2, 0, _ctx(scores, keys))
    assert capped.counts.tolist() == [2, 2]


def test_tome_merges_to_the_budget_by_size_weighted_means():
    x, _, keys = _inputs()
    same = x[:, :1].expand(-1, H * W, -1).contiguous()
    out = select(vlm.REGISTRY["tome"], same, 3, 0, _ctx(keys=keys))
    assert out.tokens.shape == (B, 3, C)
    torch.testing.assert_close(out.tokens, same[:, :3])  # merging equal tokens gives that token back
    out = select(vlm.REGISTRY["tome"], x, 3, 0, _ctx(keys=keys))
    assert bool((out.tokens <= x.amax(dim=1, keepdim=True) + 1e-5).all())


def test_methods_that_score_say_so_without_scores():
    x, _, _ = _inputs()
    with pytest.raises(InvalidArgumentError, match="scores"):
        select(vlm.REGISTRY["tps"], x, 5, 0, Context())
