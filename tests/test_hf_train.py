"""`tpsvit train` on Hugging Face transformers classifiers (a save_pretrained folder), on a tiny synthetic
Fashion-MNIST: the learned methods' masked path, distillation from the unpatched model, checkpoints that eval
rebuilds, exact resume, gradient checkpointing, two DDP ranks, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_at_step
from fmnist_files import write_fashion_mnist
from safetensors.torch import load_file

import tpsvit
from tpsvit.cli import main as cli_main
from tpsvit.errors import InvalidArgumentError
from tpsvit.io.loading import load_model
from tpsvit.train import train

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=4, num_channels=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Tiny ViT (5 labels: the run gives it a new 10-class head) and DINOv2 classifiers saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=5))
    dinov2 = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**TINY, num_labels=10))
    for name, model in (("vit", vit), ("dinov2", dinov2)):
        model.save_pretrained(root / name)
    return {"vit": str(root / "vit"), "dinov2": str(root / "dinov2")}


def config(data: Path, out: Path, model: str, **over) -> dict:
    cfg = {"recipe": "fmnist-finetune", "data": str(data), "out": str(out), "model": model, "method": "dtps",
           "locations": [1, 2], "keep_rate": 0.5, "batch_size": 32, "epochs": 2, "steps_per_epoch": 3,
           "val_limit": 64, "warmup_epochs": 0, "drop_path": 0.0, "predictor_init_steps": 3, "threads": 1}
    cfg.update(over)
    return cfg


def test_dtps_on_a_transformers_folder_trains_and_eval_rebuilds_it(data, folders, tmp_path):
    before = load_model(folders["vit"])
    results = train(config(data, tmp_path / "run", folders["vit"]))
    first = results["history"][0]
    for key in ("loss_ce", "loss_token", "loss_attention_distill"):
        assert first[key] > 0, key
    assert first["loss_distill"] == 0  # a new head: no logit distillation from the starting model's old head
    assert results["history"][-1]["gmacs"] < tpsvit.gmacs(before)
    trained = results["model"]
    assert tpsvit.is_patched(trained) and trained.classifier.out_features == 10
    torch.manual_seed(0)
    fresh = tpsvit.patch(load_model(folders["vit"]), "dtps", keep_rate=0.5, locations=(1, 2))
    moved = [not torch.equal(a, b) for a, b in zip(trained.tps_predictors.parameters(),
                                                    fresh.tps_predictors.parameters(), strict=True)]
    assert all(moved)  # the warm start and the masked path both reached every predictor parameter
    rebuilt = load_model(checkpoint=results["final"])  # from anywhere: the folder is recorded as an absolute path
    assert rebuilt.tps.method == "dtps" and rebuilt.tps.locations == (1, 2)
    state = trained.state_dict()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, state[key].cpu()), key


def test_ctrl_c_then_resume_is_exact(data, folders, tmp_path, monkeypatch):
    from tpsvit.train import engine

    def args(out):
        return ["train", "--recipe", "fmnist-finetune", "--model", folders["vit"], "--data", str(data), "--out",
                str(out), "--method", "dtps", "--locations", "1", "2", "--keep-rate", "0.5", "--batch-size", "32",
                "--epochs", "2", "--threads", "1", "--set", "steps_per_epoch=3", "--set", "val_limit=64", "--set",
                "predictor_init_steps=3", "--set", "warmup_epochs=0"]

    original = ctrl_c_at_step(monkeypatch, 4)  # epoch 2, step 1 of 3
    assert cli_main(args(tmp_path / "split")) == 130
    monkeypatch.setattr(engine.Run, "_step", original)
    assert cli_main([*args(tmp_path / "split"), "--resume"]) == 0
    assert cli_main(args(tmp_path / "straight")) == 0
    resumed = load_file(tmp_path / "split" / "final.safetensors")
    straight = load_file(tmp_path / "straight" / "final.safetensors")
    assert resumed.keys() == straight.keys() and any(k.startswith("tps_predictors.") for k in straight)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_grad_checkpointing_trains_like_the_plain_run(data, folders, tmp_path):
    plain = train(config(data, tmp_path / "plain", folders["vit"], epochs=1))
    checkpointed = train(config(data, tmp_path / "ckpt", folders["vit"], epochs=1, grad_checkpointing=True))
    a, b = plain["model"].state_dict(), checkpointed["model"].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_pooling_heads_train_etps_and_refuse_the_learned_methods(data, folders, tmp_path):
    results = train(config(data, tmp_path / "etps", folders["dinov2"], method="etps", epochs=1))
    assert results["history"][0]["loss_token"] > 0 and results["history"][0]["loss_distill"] > 0
    with pytest.raises(InvalidArgumentError, match="averages all patch tokens.*use etps / evit / tome"):
        train(config(data, tmp_path / "dtps", folders["dinov2"], epochs=1))
    with pytest.raises(InvalidArgumentError, match="model_kwargs .* config.json"):
        train(config(data, tmp_path / "kwargs", folders["vit"], model_kwargs={"depth": 2}))
    features = tmp_path / "features"
    transformers.ViTModel(transformers.ViTConfig(**TINY)).save_pretrained(features)
    with pytest.raises(InvalidArgumentError, match="ViTModel, a feature extractor; tpsvit train needs a classifier"):
        train(config(data, tmp_path / "features_run", str(features), epochs=1))


def test_two_gloo_ranks_hold_identical_weights(data, folders, tmp_path):
    import torch.multiprocessing as mp
    from test_train_run import _ddp_worker, _free_port

    cfg = config(data, tmp_path / "ddp", folders["vit"], batch_size=16, accum_steps=2, epochs=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and any(k.startswith("tps_predictors.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported = load_file(tmp_path / "ddp" / "final.safetensors")
    for key in a:  # rank 0 exported the weights it holds
        assert torch.equal(a[key], exported[key]), key


def test_start_from_a_tpsvit_checkpoint_with_other_classes(data, folders, tmp_path, capsys):
    """A checkpoint of the 5-label classifier (one weight marked) starts a 10-class run: its weights, a new head."""
    from tpsvit.io.loading import save_checkpoint

    model = load_model(folders["vit"])
    with torch.no_grad():
        model.vit.embeddings.cls_token.fill_(7.0)
    path = save_checkpoint(model, tmp_path / "five.safetensors", folders["vit"], {"num_labels": 5})
    results = train(config(data, tmp_path / "run", folders["vit"], checkpoint=str(path), method="etps", epochs=1))
    trained = results["model"]
    assert trained.classifier.out_features == 10 and trained.config.num_labels == 10
    assert (trained.vit.embeddings.cls_token - 7.0).abs().max() < 0.1  # started from the checkpoint, not the folder
    assert "checkpoint head has 5 classes, the data 10: new head" in capsys.readouterr().err
    assert load_model(checkpoint=results["final"]).classifier.out_features == 10
