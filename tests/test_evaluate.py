"""Accuracy loop and `tpsvit eval` end to end on tiny generated datasets (ImageFolder PNGs, Fashion-MNIST IDX)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from fmnist_files import write_fashion_mnist
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import tpsvit
from tpsvit.cli import main
from tpsvit.data.datasets import SYSTEM_DIR
from tpsvit.io.loading import save_checkpoint
from tpsvit.measure.evaluation import evaluate_accuracy, evaluate_many, format_table

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)


@pytest.fixture
def fmnist_dir(tmp_path):
    return write_fashion_mnist(tmp_path / "fmnist", n_train=8, n_test=24)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = tpsvit.io.loading.create_model("vit_tiny_patch16_224", **TINY)
    return save_checkpoint(model, tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)


def test_accuracy_matches_a_hand_count():
    model = tiny_vit().train()
    torch.manual_seed(3)
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 7, (10,))
    with torch.no_grad():
        logits = model(images)
    top1 = 100 * (logits.argmax(-1) == labels).float().mean().item()
    top5 = 100 * (logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item()
    result = evaluate_accuracy(model, (images, labels), batch_size=4, progress=False)
    assert result["count"] == 10
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    assert evaluate_accuracy(model, loader, progress=False)["top1"] == pytest.approx(top1)
    assert result["images_per_s"] > 0
    assert model.training  # mode restored


def test_grey_tensors_are_resized_and_models_share_one_pass():
    grey, labels = torch.randn(6, 1, 28, 28), torch.randint(0, 7, (6,))
    models = {"unpatched": tiny_vit(), "etps": tpsvit.patch(tiny_vit(), "etps", 0.5, locations=(1, 3))}
    results = evaluate_many(models, (grey, labels), batch_size=4, progress=False)
    assert set(results) == {"unpatched", "etps"} and all(r["count"] == 6 for r in results.values())
    assert 0 <= results["etps"]["top1"] <= 100


def test_label_outside_the_model_is_a_dataset_error():
    with pytest.raises(tpsvit.DatasetError, match="outside the model's 7 classes"):
        evaluate_accuracy(tiny_vit(), (torch.randn(2, 3, 32, 32), torch.tensor([0, 9])), progress=False)


def test_format_table():
    text = format_table([{"a": "x", "b": 1.234}, {"a": "yy", "b": None}], [("a", "A", ""), ("b", "B", ".1f")])
    assert text.splitlines()[2].split() == ["x", "1.2"] and text.splitlines()[3].split() == ["yy", "-"]


def run_eval(*args):
    return main(["eval", "--no-progress", "--device", "cpu", *map(str, args)])


def test_eval_fashion_mnist_idx_end_to_end(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_eval("--model", "deit_mini_patch4_28", "--data", fmnist_dir, "--methods", "etps", "dtps", "tome",
                    "--keep-rates", "0.5", "--r", "4", "--budget", "0.6", "--limit", "20", "--batch-size", "10",
                    "--out", out)
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "untrained predictor" in printed
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert report["count"] == 20 and rows[0]["method"] is None and rows[0]["status"] == "unpatched"
    assert len(rows) == 1 + 3 + 1 + 3  # unpatched, methods x rates, tome r=4, one budget row per method
    budget_rows = [r for r in rows if r["budget"] == "60% budget"]
    assert [r["method"] for r in budget_rows] == ["etps", "dtps", "tome"]
    assert all(r["gmacs"] <= 0.6 * rows[0]["gmacs"] for r in budget_rows)
    assert {r["status"] for r in rows if r["method"] == "dtps"} == {"untrained predictor"}
    assert {r["status"] for r in rows if r["method"] in ("etps", "tome")} == {"off-the-shelf"}
    assert all(0 <= r["top1"] <= r["top5"] <= 100 and r["images_per_s"] > 0 for r in rows)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "top1" in csv_lines[0]
    assert (out / "accuracy_vs_gmacs.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_image_folder_end_to_end(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    code = run_eval("--checkpoint", tiny_checkpoint, "--data", image_folder, "--methods", "evit",
                    "--keep-rates", "0.5", "--locations", "1", "2", "--workers", "0", "--out", out)
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["unpatched", "evit 0.5 @1,2"]
    assert all(r["count"] == 9 for r in rows)
    assert (out / "results.csv").exists() and (out / "accuracy_vs_gmacs.png").exists()


def test_fine_tuned_checkpoint_is_labelled(fmnist_dir, tmp_path):
    torch.manual_seed(0)
    model = tpsvit.patch(tpsvit.io.loading.create_model("deit_mini_patch4_28"), "dtps", 0.7)
    path = save_checkpoint(model, tmp_path / "dtps.safetensors", "deit_mini_patch4_28", recipe="fmnist-finetune")
    out = tmp_path / "out"
    code = run_eval("--checkpoint", path, "--data", fmnist_dir, "--methods", "dtps", "dynamicvit", "etps",
                    "--keep-rates", "0.7", "--limit", "8", "--out", out)
    assert code == 0
    status = {r["method"]: r["status"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert status["dtps"] == "fine-tuned (fmnist-finetune)"
    assert status["dynamicvit"] == "off-the-shelf (predictors from dtps)"
    assert status["etps"] == "off-the-shelf"


@pytest.mark.parametrize("patch, amount, blocks", [
    (dict(method="tome", r=3), "r=3", "all"),
    (dict(method="tome", r=2, locations=(1, 2)), "r=2", "1,2"),
    (dict(method="etps", keep_rate=(0.8, 0.6), locations=(1, 5), squeeze_floor=0.2), "0.8/0.6", "1,5"),
])
def test_a_patched_checkpoint_is_evaluated_at_its_own_patch(fmnist_dir, tmp_path, patch, amount, blocks):
    model = tpsvit.patch(tpsvit.io.loading.create_model("deit_mini_patch4_28"), **patch)
    path = save_checkpoint(model, tmp_path / "own.safetensors", "deit_mini_patch4_28", recipe="fmnist-finetune")
    out = tmp_path / "out"
    assert run_eval("--checkpoint", path, "--data", fmnist_dir, "--limit", "8", "--out", out) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [None, patch["method"]]
    assert (rows[1]["amount"], rows[1]["blocks"], rows[1]["status"]) == (amount, blocks, "fine-tuned (fmnist-finetune)")
    assert rows[1]["gmacs"] == pytest.approx(tpsvit.gmacs(model))
    assert rows[1]["options"] == ({"squeeze_floor": 0.2} if "squeeze_floor" in patch else {})


def test_eval_auto_schedule(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_eval("--model", "deit_mini_patch4_28", "--data", fmnist_dir, "--methods", "etps", "dtps", "tome",
                    "--budget", "0.5", "--schedule", "auto", "--calib-images", "8", "--limit", "12", "--out", out)
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("auto schedule ") == 2 and "dtps keeps the fixed schedule" in printed
    report = json.loads((out / "results.json").read_text())
    assert report["schedule"] == "auto" and [s["method"] for s in report["schedules"]] == ["etps", "tome"]
    assert all(s["calibration_images"] == 8 and s["chosen"]["top1"] >= s["fixed"]["top1"] for s in report["schedules"])
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["etps"]["schedule"].startswith("auto: ") and rows["dtps"]["schedule"] == "fixed"
    assert all(rows[m]["gmacs"] <= 0.5 * rows[None]["gmacs"] for m in ("etps", "dtps", "tome"))
    assert run_eval("--model", "deit_mini_patch4_28", "--data", fmnist_dir, "--schedule", "auto") == 2
    assert "add --budget or --gmacs" in capsys.readouterr().err


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="Fashion-MNIST is not installed in /usr/share/datasets")
def test_grey_28px_model_defaults_to_fashion_mnist(capsys):
    assert run_eval("--model", "deit_mini_patch4_28", "--limit", "16", "--keep-rates", "0.5") == 0
    assert "Fashion-MNIST test" in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpsvit eval: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_data_path_is_one_line_exit_2(tmp_path, capsys):
    assert run_eval("--model", "deit_mini_patch4_28", "--data", tmp_path / "missing") == 2
    assert "missing" in one_line_error(capsys)


def test_rgb_model_needs_data(tiny_checkpoint, capsys):
    assert run_eval("--checkpoint", tiny_checkpoint) == 2
    assert "--data" in one_line_error(capsys)


def test_mismatched_checkpoint_is_one_line_exit_2(tiny_checkpoint, fmnist_dir, capsys):
    assert run_eval("--model", "deit_mini_patch4_28", "--checkpoint", tiny_checkpoint, "--data", fmnist_dir) == 2
    assert "does not fit" in one_line_error(capsys)
    assert run_eval("--checkpoint", tiny_checkpoint.parent / "nope.safetensors", "--data", fmnist_dir) == 2
    assert "does not exist" in one_line_error(capsys)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_exit_2(image_folder, tiny_checkpoint, capsys, workers):
    (image_folder / "class1" / "broken.png").write_bytes(b"not a png at all")
    assert run_eval("--checkpoint", tiny_checkpoint, "--data", image_folder, "--workers", workers,
                    "--locations", "1", "2") == 2
    assert "broken.png" in one_line_error(capsys)


def test_eval_grey_image_folder_with_a_grey_model(tmp_path, capsys):
    """A folder of 28x28 greyscale PNGs evaluates with a 1-channel model (the shipped model's architecture)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "grey"
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(root / f"c{c}" / "0.png")
    assert run_eval("--model", "deit_mini_patch4_28", "--data", root, "--keep-rates", "0.5", "--workers", 0) == 0
    out = capsys.readouterr()
    assert "ImageFolder" in out.out and "10 images" in out.out and "warning" not in out.err
    assert run_eval("--model", "deit_mini_patch4_28", "--data", root, "--split", "train") == 2
    assert "--split train is for Fashion-MNIST" in one_line_error(capsys)


def test_head_larger_than_the_dataset_warns_on_one_line(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = dict(TINY, num_classes=1000)
    model = tpsvit.io.loading.create_model("vit_tiny_patch16_224", **kwargs)
    checkpoint = save_checkpoint(model, tmp_path / "wide.safetensors", "vit_tiny_patch16_224", kwargs)
    assert run_eval("--checkpoint", checkpoint, "--data", image_folder, "--workers", 0, "--keep-rates", "0.5",
                    "--locations", "1", "2") == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpsvit eval: warning:") and "\n" not in err
    assert "1000 classes" in err and "has 3" in err
