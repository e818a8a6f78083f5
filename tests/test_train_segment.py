"""``tpsvit train --task segment`` on a tiny synthetic cluttered testbed: an end-to-end run writes mIoU metrics and a
reloadable backbone + head checkpoint, Ctrl-C + --resume ends where an uninterrupted run ends, freeze_backbone
leaves the backbone as loaded, bad values fail with one clear line."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ctrl_c_at_step
from fmnist_files import write_fashion_mnist
from safetensors.torch import load_file

import tpsvit.data.datasets
from tpsvit.cli import main as cli_main
from tpsvit.data.segmentation import confusion, miou, segmentation_split
from tpsvit.dense import load_segmenter
from tpsvit.errors import InvalidArgumentError
from tpsvit.io.loading import checkpoint_metadata, create_model, save_checkpoint
from tpsvit.train import resolve, train

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module", autouse=True)
def system_files(tmp_path_factory):
    """64 training and 40 test garments as the system's Fashion-MNIST: the cluttered testbed is built from them."""
    folder = write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=40)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(tpsvit.data.datasets, "SYSTEM_DIR", folder)
        yield folder


def config(out: Path, **over) -> dict:
    cfg = {"recipe": "cluttered-segment", "checkpoint": None, "model_kwargs": dict(TINY), "budget": None,
           "method": "etps", "keep_rate": 0.5, "locations": [1, 2], "limit": None, "steps_per_epoch": None,
           "batch_size": 16, "epochs": 2, "threads": 1, "out": str(out)}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def dtps_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("segment") / "run"
    return train(config(out, method="dtps", predictor_init="release"))


def test_segment_run_writes_miou_metrics_and_both_checkpoints(dtps_run):
    out = Path(dtps_run["out"])
    for name in ("last.pt", "best.safetensors", "final.safetensors", "metrics.csv", "metrics.json", "progress.json"):
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"test_miou", "test_pixel_acc", "test_loss", "gmacs"} <= set(header) and "test_top1" not in header
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    history = dtps_run["history"]
    assert summary["global_step"] == 2 * (64 // 16) and len(history) == 2
    assert summary["best_miou"] == max(row["test_miou"] for row in history)
    assert summary["final_miou"] == history[-1]["test_miou"] and 0 < history[-1]["test_miou"] <= 100
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["loss_distill"] == history[0]["loss_token"] == history[0]["loss_keep_ratio"] == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert "conv1.weight" in state["head"]
    weights = load_file(out / "final.safetensors")
    assert "seg_head.conv1.weight" in weights and any(k.startswith("tps_predictors.") for k in weights)
    meta = checkpoint_metadata(out / "best.safetensors")
    assert (meta["task"], meta["seg_head"], meta["restore"]) == ("segment", "conv", "host")
    assert meta["test_miou"] == summary["best_miou"] and meta["command"]


def test_saved_segmenter_reloads_to_the_same_logits_and_miou(dtps_run):
    trained = dtps_run["segmenter"].eval()
    loaded = load_segmenter(Path(dtps_run["out"]) / "final.safetensors")
    assert loaded.backbone.tps.method == "dtps" and loaded.restore == "host"
    images, pixels, _ = segmentation_split(False)
    with torch.no_grad():
        logits = loaded(images)
        assert torch.allclose(logits, trained(images), atol=1e-5)
    assert logits.shape == (40, 11, 56, 56)
    assert miou(confusion(logits.argmax(1), pixels))[0] == pytest.approx(dtps_run["history"][-1]["test_miou"])


def _cli_args(out: Path) -> list[str]:
    return ["train", "--recipe", "cluttered-segment", "--task", "segment", "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--method", "etps", "--keep-rate", "0.5", "--locations", "1", "2", "--threads", "1",
            "--save-every-steps", "3", "--set", "checkpoint=null", "--set", "budget=null", "--set", "limit=null",
            "--set", "steps_per_epoch=null", "--set", "model_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
            "--set", "restore=frozen", "--set", "seg_head=linear"]


def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    from tpsvit.train import engine

    out = tmp_path / "interrupted"
    original = ctrl_c_at_step(monkeypatch, 6)  # epoch 2, step 2 of 4
    assert cli_main(_cli_args(out)) == 130
    assert "stopped at epoch 2 step 2/4 (global step 6)" in capsys.readouterr().err
    assert not (out / "final.safetensors").exists()
    monkeypatch.setattr(engine.Run, "_step", original)
    assert cli_main([*_cli_args(out), "--resume"]) == 0
    reference = tmp_path / "straight"
    assert cli_main(_cli_args(reference)) == 0
    resumed, straight = load_file(out / "final.safetensors"), load_file(reference / "final.safetensors")
    assert resumed.keys() == straight.keys() and "seg_head.proj.weight" in straight
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    rows = [json.loads((run / "metrics.json").read_text())["epochs"] for run in (out, reference)]
    assert [r["test_miou"] for r in rows[0]] == [r["test_miou"] for r in rows[1]]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, folder: str, files: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    tpsvit.data.datasets.SYSTEM_DIR = Path(files)  # a spawned process does not inherit the test's monkeypatch
    results = train(cfg)
    segmenter = results["segmenter"]
    torch.save({k: v.detach().clone() for k, v in segmenter.state_dict().items()}, Path(folder) / f"rank{rank}.pt")
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(results["history"][-1]["test_miou"]))


def test_two_gloo_ranks_hold_identical_segmenters(tmp_path, system_files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path / "ddp", batch_size=16, accum_steps=2, epochs=1, steps_per_epoch=1)
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path), str(system_files)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and "head.conv1.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    miou_a, miou_b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    saved = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert miou_a == miou_b == saved["epochs"][-1]["test_miou"]  # the ranks' confusion counts were summed
    assert saved["summary"]["world_size"] == 2


def test_freeze_backbone_leaves_the_backbone_as_loaded(tmp_path):
    torch.manual_seed(3)
    start = create_model("deit_mini_patch8_56", **TINY)
    kwargs = {**TINY, "num_classes": 10}
    path = save_checkpoint(start, tmp_path / "start.safetensors", "deit_mini_patch8_56", kwargs)
    results = train(config(tmp_path / "frozen", checkpoint=str(path), freeze_backbone=True, model_kwargs={}))
    saved = load_file(Path(results["out"]) / "final.safetensors")
    backbone = {k: v for k, v in saved.items() if not k.startswith("seg_head.")}
    assert backbone.keys() == start.state_dict().keys()
    for key, value in start.state_dict().items():
        assert torch.equal(backbone[key], value), key
    history = results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the head did train


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("task", "detect", "classify, segment"),
    ("seg_head", "mlp", "linear, conv"),
    ("restore", "nearest", "host, frozen, zeros"),
])
def test_bad_values_name_the_value_and_the_allowed_ones(key, value, allowed):
    with pytest.raises(InvalidArgumentError, match=rf"^{key}='{value}' is not allowed; expected one of {allowed}$"):
        resolve("cluttered-segment", {key: value})


@pytest.mark.parametrize(("over", "message"), [
    ({"data": "fashion-mnist"}, "task=segment needs pixel labels.*expected one of fashion-mnist-cluttered, "
                                "fashion-mnist-textures"),
    ({"distill_weight": 0.5}, "distill_weight=0.5: task=segment has no distillation losses"),
    ({"augment": "fmnist"}, "augment='fmnist': task=segment trains on the training split's fixed composition"),
    ({"task": "classify", "freeze_backbone": True}, "freeze_backbone=true .* needs task=segment"),
])
def test_unsupported_segment_settings_are_refused(over, message):
    with pytest.raises(InvalidArgumentError, match=message):
        resolve("cluttered-segment", over)


def test_textures_testbed_is_accepted_and_the_cli_error_is_one_line(capsys):
    assert resolve("cluttered-segment", {"data": "textures"}).data == "fashion-mnist-textures"
    assert cli_main(["train", "--recipe", "cluttered-segment", "--set", "restore=nearest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "restore='nearest' is not allowed; expected one of host, frozen, zeros" in err
