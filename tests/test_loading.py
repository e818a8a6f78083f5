"""Loading timm pretrained weights offline: a fast one-line error that names the offline routes, and local files."""

from __future__ import annotations

import time

import pytest
import torch

from tpsvit.errors import CheckpointError
from tpsvit.io import hub as tps_hub
from tpsvit.io import loading

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def test_no_network_fails_fast_on_one_line_with_the_offline_routes(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(tps_hub, "reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub.constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        loading.load_model("vit_tiny_patch16_224", pretrained=True, **TINY)
    message = str(info.value)
    assert time.perf_counter() - start < 10 and "\n" not in message
    assert message.startswith("cannot reach huggingface.co")
    for route in ("pretrained_cfg_overlay=dict(file=FILE)", "--checkpoint FILE", "HF_HUB_OFFLINE=1"):
        assert route in message
    assert hub.constants.HF_HUB_OFFLINE == before  # restored after the cache-only attempt


def test_a_local_weights_file_needs_no_network(monkeypatch, tmp_path):
    def no_probe(host, timeout=3.0):
        raise AssertionError("a local file must not touch the network")

    monkeypatch.setattr(tps_hub, "reachable", no_probe)
    torch.manual_seed(0)
    source = loading.create_model("vit_tiny_patch16_224", **TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = loading.load_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               **TINY)
    # timm re-initialises a head whose class count differs from the pretrained config's; the blocks are loaded
    assert torch.equal(model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    plain = loading.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)  # the CLI's --checkpoint route
    assert torch.equal(plain.head.weight, source.head.weight)


def test_unknown_model_suggests_close_names():
    from tpsvit.errors import InvalidArgumentError
    from tpsvit.io.loading import create_model

    with pytest.raises(InvalidArgumentError, match=r"'deit_smal_patch16_224'; did you mean deit_small_patch16_224"):
        create_model("deit_smal_patch16_224")
