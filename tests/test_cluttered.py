"""Cluttered Fashion-MNIST: composition, a deterministic test split, fresh training clutter, dataset names."""

from __future__ import annotations

import pytest
import torch
from fmnist_files import write_fashion_mnist

import tpsvit.data.datasets
from tpsvit.data.cluttered import ClutterSpec
from tpsvit.data.datasets import ClutteredFashionMNIST, build_dataset
from tpsvit.train.data_loading import build_data, find_data
from tpsvit.train.recipe import resolve


@pytest.fixture
def system_files(tmp_path, monkeypatch):
    """Synthetic Fashion-MNIST files where tpsvit looks for the Debian package's."""
    folder = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=40)
    monkeypatch.setattr(tpsvit.data.datasets, "SYSTEM_DIR", folder)
    return folder


def test_a_garment_without_clutter_lands_whole_inside_the_canvas():
    garment = torch.zeros(1, 28, 28, dtype=torch.uint8)
    garment[0, 3:25, 5:20] = 200
    gen = torch.Generator().manual_seed(0)
    canvas = ClutterSpec(canvas=56, pieces=0).compose(garment, garment, gen)
    assert canvas.shape == (1, 56, 56) and int(canvas.sum()) == int(garment.sum())
    rows, cols = canvas[0].nonzero(as_tuple=True)
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (22, 15)


def test_clutter_adds_pieces_of_the_pool_and_keeps_the_garment():
    garments = torch.full((4, 28, 28), 100, dtype=torch.uint8)
    pool = torch.full((3, 28, 28), 250, dtype=torch.uint8)
    spec = ClutterSpec(canvas=64, pieces=5, piece=8)
    canvas = spec.compose(garments, pool, torch.Generator().manual_seed(1))
    for image in canvas:
        assert int((image >= 100).sum()) >= 28 * 28  # the garment (max-combined, so never darkened)
        assert 0 < int((image == 250).sum()) <= 5 * 64  # at most five 8x8 pieces of clutter
    again = spec.compose(garments, pool, torch.Generator().manual_seed(1))
    assert torch.equal(canvas, again)
    assert not torch.equal(canvas, spec.compose(garments, pool, torch.Generator().manual_seed(2)))


def test_test_split_is_fixed_whatever_the_limit(system_files):
    full = ClutteredFashionMNIST(train=False)
    first = ClutteredFashionMNIST(train=False, limit=10)
    assert full.images.shape == (40, 56, 56) and full.images.dtype == torch.uint8
    assert torch.equal(first.images, full.images[:10]) and torch.equal(first.labels, full.labels[:10])
    assert torch.equal(ClutteredFashionMNIST(train=False).images, full.images)
    images, labels = full.tensors()
    assert images.shape == (40, 1, 56, 56) and labels.shape == (40,)
    # most of each canvas is black background: the object is a minority of the 49 8x8 tokens
    tokens = full.images.unfold(1, 8, 8).unfold(2, 8, 8).reshape(40, 49, 64)
    assert float((tokens.amax(-1) > 0).float().mean()) < 0.9


def test_build_dataset_by_name(system_files):
    dataset = build_dataset("fashion-mnist-cluttered", train=False, img_size=56, in_chans=1, limit=5)
    image, label = dataset[0]
    assert isinstance(dataset, ClutteredFashionMNIST) and image.shape == (1, 56, 56) and 0 <= label < 10


def test_training_batches_get_fresh_clutter_and_replay_exactly(system_files):
    cfg = resolve("cluttered-scratch", {"batch_size": 16})
    raw = find_data(cfg)
    assert "cluttered" in raw.description and len(raw.train) == 64

    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=56, patch_size=8, in_chans=1, embed_dim=8, depth=1, num_heads=1)
    bundle = build_data(cfg, raw, model, 0, 1, 16, 32, pin_memory=False)
    first = [x for x, _ in bundle.train.batches(epoch=0)]
    again = [x for x, _ in bundle.train.batches(epoch=0)]
    later = [x for x, _ in bundle.train.batches(epoch=1)]
    assert first[0].shape == (16, 1, 56, 56)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], later[0])
    test_images, _ = next(iter(bundle.eval.batches()))
    assert torch.equal(test_images, raw.eval.tensors()[0][:32])


def test_token_kinds_split_garment_clutter_and_empty_tokens():
    from tpsvit.data.cluttered import ClutterSpec, compose_fixed, token_kinds

    torch.manual_seed(0)
    garments = torch.randint(1, 256, (12, 28, 28), dtype=torch.uint8)  # every garment pixel is lit
    images, kinds = token_kinds(garments, 7, ClutterSpec(), 12)
    assert torch.equal(images, compose_fixed(garments, 7, ClutterSpec()))  # the whole (one-chunk) split
    garment_tokens = (kinds == 0).sum(1)
    assert kinds.shape == (12, 49) and ((garment_tokens >= 16) & (garment_tokens <= 25)).all()  # a 28 px square
    assert (kinds == 1).any() and (kinds == 2).any()
    lit = images.unfold(1, 8, 8).unfold(2, 8, 8).reshape(12, 49, -1).amax(-1) > 0
    assert torch.equal(lit, kinds < 2)  # empty tokens are exactly the unlit ones
    _, alone = token_kinds(garments, 7, ClutterSpec(pieces=0), 12)
    assert torch.equal(alone == 0, kinds == 0) and not (alone == 1).any()
    with pytest.raises(ValueError, match="1..4096"):
        token_kinds(garments, 7, ClutterSpec(), 5000)
