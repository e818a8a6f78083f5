"""The CLI on Hugging Face models: `--model FOLDER` (save_pretrained) and `--model hf:ORG/NAME`, offline."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tpsvit
from tpsvit.cli import main

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=28,
            patch_size=4, num_channels=1)
PATCH = ["--locations", "1", "2"]


def save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A Fashion-MNIST-shaped ViTForImageClassification folder (1 x 28 x 28, 10 classes, random weights)."""
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=10))
    return save(model, tmp_path_factory.mktemp("hf") / "vit")


def tiny_timm_checkpoint(folder) -> str:
    from tpsvit.io.loading import create_model, save_checkpoint

    model = create_model("deit_mini_patch4_28")
    return str(save_checkpoint(model, folder / "timm.safetensors", "deit_mini_patch4_28"))


def test_flops_on_a_folder_agree_with_the_flop_counter(classifier, tmp_path, capsys):
    out = tmp_path / "flops.json"
    code = main(["flops", "--model", classifier, "--methods", "etps", "tome", "--keep-rates", "0.5", *PATCH,
                 "--check", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [row["label"].split()[0] for row in rows] == ["unpatched", "etps", "tome"]
    for row in rows:
        assert row["gmacs"] == pytest.approx(row["counted_gmacs"], rel=1e-4)
    assert rows[0]["tokens_out"] == 50 and all(row["fraction"] < 0.7 for row in rows[1:])


def test_bench_on_a_folder(classifier, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", classifier, "--methods", "etps", *PATCH, "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-progress", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    (result,) = json.loads(out.read_text())["results"]
    assert result["batch_size"] == 2 and [row["label"] for row in result["rows"]] == ["unpatched", "etps 0.7 @1,2"]
    assert all(row["images_per_s"] > 0 and row["in_chans"] == 1 for row in result["rows"])


def test_eval_on_a_folder_reads_the_logits(classifier, tmp_path, capsys):
    from tpsvit.data.datasets import build_dataset

    code = main(["eval", "--model", classifier, "--methods", "etps", "--keep-rates", "0.5", *PATCH, "--limit", "64",
                 "--no-progress", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    model = tpsvit.load_model(classifier)
    images, labels = build_dataset("fashion-mnist", train=False, img_size=28, in_chans=1, model=model,
                                   limit=64).tensors()
    with torch.no_grad():
        correct = int((model(pixel_values=images).logits.argmax(-1) == labels).sum())
    assert rows[0]["method"] is None and rows[0]["correct1"] == correct
    assert rows[1]["method"] == "etps" and rows[1]["gmacs"] < rows[0]["gmacs"]


def test_viz_on_a_folder(classifier, tmp_path, capsys):
    code = main(["viz", "--model", classifier, "--method", "etps", "--keep-rate", "0.5", *PATCH, "--samples", "2",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "fashion-mnist_test_0_etps.png", "fashion-mnist_test_1_etps.png"]


def test_the_preprocessor_config_gives_the_normalisation(tmp_path):
    from tpsvit.viz import model_data_config

    torch.manual_seed(0)
    folder = save(transformers.ViTModel(transformers.ViTConfig(**{**TINY, "num_channels": 3})), tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.1]}))
    cfg = model_data_config(tpsvit.load_model(folder))
    assert tuple(cfg["mean"]) == (0.5, 0.4, 0.3) and tuple(cfg["std"]) == (0.2, 0.2, 0.1)
    assert tuple(cfg["input_size"]) == (3, 28, 28)


def test_clear_one_line_errors(classifier, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tpsvit.io.hub.reachable", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cases = [
        (["flops", "--model", "hf:someone/not-cached"], "no network.*save_pretrained"),
        (["flops", "--model", classifier, "--img-size", "56"], "image size of its config"),
        (["flops", "--model", classifier, "--checkpoint", tiny_timm_checkpoint(tmp_path)],
         "does not fit ViTForImageClassification: .*missing keys"),
    ]
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    cases.append((["flops", "--model", save(bert, tmp_path / "bert")], "BertModel model; tpsvit supports ViTModel"))
    feature_extractor = save(transformers.ViTModel(transformers.ViTConfig(**TINY)), tmp_path / "features")
    cases.append((["eval", "--model", feature_extractor, "--limit", "8", "--no-progress"], "no classification head"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"tpsvit {argv[0]}: error:")
        assert re.search(message, err), err
