"""tpsvit.dense: the heads' MACs, the segmenter's per-pixel logits and its paths, the segmentation checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from torch.utils.flop_counter import FlopCounterMode

import tpsvit
from tpsvit.dense import ConvHead, LinearHead, Segmenter, load_segmenter, save_segmenter, tokens_to_grid
from tpsvit.errors import CheckpointError, InvalidArgumentError
from tpsvit.io.loading import load_model


@pytest.mark.parametrize("head", [LinearHead(48, 11), ConvHead(48, 11), ConvHead(48, 5, hidden=16)],
                         ids=["linear", "conv", "conv-hidden16"])
def test_head_macs_match_the_flop_counter(head):
    grid = torch.randn(2, 48, 7, 5)
    with FlopCounterMode(display=False) as counter:
        head(grid)
    assert counter.get_total_flops() == 2 * 2 * head.macs(7, 5)  # FLOPs = 2 x MACs, batch of 2


def test_unpatched_segmenter_is_the_head_on_the_token_grid_upsampled():
    model = tiny_vit()
    head = ConvHead(48, 11)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = Segmenter(model, head).eval()(x)
        grid = tokens_to_grid(model.forward_features(x)[:, 1:], 8)
        expected = F.interpolate(head(grid), size=(32, 32), mode="bilinear", align_corners=False)
    assert logits.shape == (2, 11, 32, 32)
    assert torch.allclose(logits, expected)
    assert Segmenter(model, head).gmacs() == pytest.approx(tpsvit.gmacs(model) + head.macs(8, 8) / 1e9)


def test_learned_method_trains_on_the_gather_path_with_frozen_predictors():
    model = tpsvit.patch(tiny_vit(), "dtps", keep_rate=0.5, locations=(1, 3))
    segmenter = Segmenter(model, LinearHead(48, 11), restore="frozen").train()
    assert not model.training and model.blocks[0].training  # the path flag only; blocks follow train()
    segmenter(torch.randn(2, 3, 32, 32)).sum().backward()
    state = tpsvit.forward_state(model)
    assert not state.masked and state.positions.shape[1] < 64  # tokens were removed, so restore had work to do
    assert all(not p.requires_grad and p.grad is None for p in model.tps_predictors.parameters())
    assert all(not p.requires_grad for p in model.head.parameters())  # the classifier never runs
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_freeze_backbone_trains_only_the_head():
    model = tpsvit.patch(tiny_vit(), "etps", keep_rate=0.5, locations=(2,))
    segmenter = Segmenter(model, ConvHead(48, 11), freeze_backbone=True).train()
    assert not model.training and segmenter.head.training
    segmenter(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert segmenter.head.conv1.weight.grad is not None


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    model = tpsvit.patch(tiny_vit(), "etps", keep_rate=0.5, locations=(2,))
    segmenter = Segmenter(model, LinearHead(48, 11), restore="zeros").eval()
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    path = save_segmenter(segmenter, tmp_path / "seg.safetensors", "vit_tiny_patch16_224", kwargs)
    loaded = load_segmenter(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), segmenter(x))
    assert loaded.restore == "zeros" and isinstance(loaded.head, LinearHead) and loaded.backbone.tps.method == "etps"
    with pytest.raises(CheckpointError, match="is a segmentation checkpoint .*tpsvit.dense.load_segmenter"):
        load_model(checkpoint=path)
    with pytest.raises(InvalidArgumentError, match="restore='nearest' is not allowed; expected one of host, frozen"):
        Segmenter(model, LinearHead(48, 11), restore="nearest")
