"""ImageFolder training with the DeiT recipe machinery (RandAugment, mixup/cutmix, teacher, keep-rate annealing),
engine options (bf16 autocast, gradient checkpointing, clipping, accumulation) and resume checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fmnist_files import write_fashion_mnist
from PIL import Image
from test_train_run import config

from tpsvit.errors import DatasetError, InvalidArgumentError
from tpsvit.train import train

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def write_folder(root: Path, per_class: int = 8) -> Path:
    """root/{train,val}/{red,blue}/*.png, 32x32 images whose colour is their class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
                image[..., 0 if index == 0 else 2] += 150
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_imagefolder_etps_with_deit_augmentation_mixup_and_annealing(tmp_path):
    root = write_folder(tmp_path / "images")
    results = train({
        "recipe": "imagenet-etps", "data": str(root), "out": str(tmp_path / "run"), "model": "vit_tiny_patch16_224",
        "model_kwargs": TINY_VIT, "pretrained": False, "locations": [1], "keep_rate": 0.5, "batch_size": 8,
        "epochs": 2, "workers": 0, "keep_rate_anneal_epochs": 2, "warmup_epochs": 0, "threads": 1,
    })
    first, last = results["history"]
    assert first["loss_distill"] > 0 and first["loss_token"] > 0 and first["loss_keep_ratio"] == 0
    assert 0.5 < last["keep_rate"][0] < first["keep_rate"][0] < 1.0  # annealed from 1 towards 0.5
    assert results["model"].tps.keep_rate == pytest.approx((0.5 + 0.5 / 4,))  # the last step: 3 of 4 steps done
    assert results["global_step"] == 4 and last["test_top1"] is not None


def test_bf16_grad_checkpointing_clipping_and_accumulation_run(tmp_path):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=16)
    results = train(config(data, tmp_path / "run", method="dtps", locations=[2, 3], amp="bf16",
                           grad_checkpointing=True, clip_grad=1.0, accum_steps=2, batch_size=16, epochs=1,
                           keep_ratio_weight=2.0))
    row = results["history"][0]
    assert all(np.isfinite(row[k]) for k in ("train_loss", "loss_ce", "loss_keep_ratio"))
    assert row["loss_keep_ratio"] > 0 and results["global_step"] == 64 // 16
    assert results["model"].blocks[0].forward.func.__name__ == "_checkpointed_forward"
    assert results["model"].blocks[2].forward.func.__name__ == "_checkpointed_forward"  # patched blocks too


def test_resume_refuses_a_changed_setting(tmp_path):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=32, n_test=8)
    out = tmp_path / "run"
    train(config(data, out, epochs=1, batch_size=16))
    with pytest.raises(InvalidArgumentError, match=r"--resume: lr=0\.1 differs from the run being resumed"):
        train(config(data, out, epochs=2, batch_size=16, lr=0.1, resume=True))
    before = torch.load(out / "last.pt", weights_only=True)["global_step"]
    results = train(config(data, out, epochs=2, batch_size=16, resume=True))  # more epochs: allowed
    assert before == 2 and results["global_step"] == 4 and len(results["history"]) == 2


def test_missing_data_path_is_named_as_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"--data '/nonexistent/x' does not exist"):
        train({"recipe": "fmnist-scratch", "data": "/nonexistent/x", "out": str(tmp_path / "run"), "threads": 1})


def test_grey_imagefolder_trains_a_one_channel_model(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "grey"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(root / f"c{c}" / f"{i}.png")
    results = train({"recipe": "fmnist-scratch", "data": str(root), "augment": "none", "out": str(tmp_path / "run"),
                     "model_kwargs": {"depth": 2, "embed_dim": 16, "num_heads": 2, "num_classes": 2},
                     "batch_size": 4, "epochs": 1, "workers": 0, "threads": 1, "warmup_epochs": 0})
    assert results["global_step"] == 2 and results["history"][0]["test_top1"] is not None


def test_folder_batches_keep_their_workers_and_the_exact_order():
    from tpsvit.train.data_loading import FolderBatches

    dataset = [(torch.tensor([float(i)]), i) for i in range(24)]
    plain = FolderBatches(dataset, 4, 0, 1, 5, True, 1, 0, False)
    pooled = FolderBatches(dataset, 4, 0, 1, 5, True, 1, 1, False)
    for epoch, start in ((0, 0), (1, 0), (1, 2), (0, 3)):
        want = [y.tolist() for _, y in plain.batches(epoch, start)]
        got = [y.tolist() for _, y in pooled.batches(epoch, start)]
        assert got == want, (epoch, start)
    assert pooled._loader.persistent_workers and pooled._loader.num_workers == 1
    first = pooled._loader
    next(pooled.batches(2))  # an abandoned epoch, then a full one on the same workers
    assert [y.tolist() for _, y in pooled.batches(2)] == [y.tolist() for _, y in plain.batches(2)]
    assert pooled._loader is first
