"""Fashion-MNIST among textures: procedural clutter, the same interface and seeds as the cluttered testbed."""

from __future__ import annotations

import pytest
import torch
from fmnist_files import write_fashion_mnist

import tpsvit.data.datasets
from tpsvit.data.cluttered import TEST_SEED, ClutterSpec, compose_fixed, compose_fixed_layers, token_kinds
from tpsvit.data.datasets import (
    ClutteredFashionMNIST,
    TexturedFashionMNIST,
    build_dataset,
    embedded_dataset,
    embedded_name,
)
from tpsvit.data.textures import TEXTURE_KINDS, TextureSpec, texture_pieces
from tpsvit.train.data_loading import build_data, find_data
from tpsvit.train.recipe import resolve


@pytest.fixture
def system_files(tmp_path, monkeypatch):
    """Synthetic Fashion-MNIST files where tpsvit looks for the Debian package's."""
    folder = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=40)
    monkeypatch.setattr(tpsvit.data.datasets, "SYSTEM_DIR", folder)
    return folder


def _garments(n: int, seed: int = 0) -> torch.Tensor:
    """Garment-like images: a smooth bright blob on black, like a Fashion-MNIST silhouette."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = 10 + 8 * torch.rand(n, 2, generator=gen)
    radius = 6 + 5 * torch.rand(n, generator=gen)
    d = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    return ((radius[:, None, None] - d).clamp(0, 3) / 3 * 220).to(torch.uint8)


def test_texture_pieces_are_deterministic_varied_and_never_blank():
    a = texture_pieces(600, 8, torch.Generator().manual_seed(3))
    b = texture_pieces(600, 8, torch.Generator().manual_seed(3))
    c = texture_pieces(600, 8, torch.Generator().manual_seed(4))
    assert a.shape == (600, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(((a > 0).sum(dim=(1, 2)) >= 8).sum()) == 600  # at least an eighth of every piece is lit
    assert len({bytes(p.flatten().tolist()) for p in a}) == 600  # no two pieces alike
    assert int(a.max()) <= 255 and int(a.amax(dim=(1, 2)).min()) >= 96 * 6 // 7  # the brightness range
    for kind in TEXTURE_KINDS:  # every kind on its own works
        only = texture_pieces(20, 8, torch.Generator().manual_seed(0), (kind,))
        assert only.shape == (20, 8, 8) and len({bytes(p.flatten().tolist()) for p in only}) == 20
    with pytest.raises(ValueError, match="texture kinds"):
        TextureSpec(kinds=("plaid",))


def test_stripes_are_periodic_along_their_orientation():
    """A hand-checkable case: a stripe piece's rows repeat with its period along the stripes' normal."""
    pieces = texture_pieces(200, 8, torch.Generator().manual_seed(5), ("stripes",))
    flat = pieces.float().flatten(1)
    # each stripe piece has at most 8 grey levels and several distinct rows or columns (not a flat patch)
    assert all(len(set(p.tolist())) <= 8 for p in flat)
    assert all(len({tuple(r.tolist()) for r in p}) + len({tuple(c.tolist()) for c in p.T}) > 2 for p in pieces)


def test_texture_clutter_keeps_the_garment_and_its_place():
    garments = _garments(16)
    spec, cluttered = TextureSpec(), ClutterSpec()
    images, alone = compose_fixed_layers(garments, TEST_SEED, spec)
    reference, reference_alone = compose_fixed_layers(garments, TEST_SEED, cluttered)
    assert images.shape == (16, 56, 56) and images.dtype == torch.uint8
    assert torch.equal(alone, reference_alone)  # the same seed puts each garment where the cluttered split does
    assert (images >= alone).all()  # max-combined: the garment is never darkened
    assert not torch.equal(images, reference)  # only the clutter differs
    assert torch.equal(images, compose_fixed(garments, TEST_SEED, spec))
    _, kinds = token_kinds(garments, TEST_SEED, spec, 16)
    assert (kinds == 1).any() and (kinds == 2).any()


def test_texture_pieces_never_equal_garment_crops_and_are_less_alike():
    """The clutter is from another domain: no texture piece is any 8x8 crop of a garment, and each piece's best pixel
    cosine to the garments' crops is lower than that of clutter cut from other garments."""
    garments = _garments(120, seed=1)
    crops = garments[:60].unfold(1, 8, 1).unfold(2, 8, 1).reshape(-1, 64)  # every 8x8 crop of 60 garments
    gen = torch.Generator().manual_seed(0)
    textures = TextureSpec().clutter_pieces(garments, 300, gen).reshape(300, 64)
    own = ClutterSpec().clutter_pieces(garments[60:], 300, gen).reshape(300, 64)
    crop_set = {bytes(c.tolist()) for c in crops}
    assert not any(bytes(t.tolist()) in crop_set for t in textures)

    def best_cosine(pieces):
        unit = lambda x: x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-6)  # noqa: E731
        lit = pieces.amax(1) > 0
        return (unit(pieces[lit]) @ unit(crops[crops.amax(1) > 0]).T).amax(1).mean()

    assert float(best_cosine(textures)) < float(best_cosine(own)) - 0.05


def test_names_and_split_sizes(system_files):
    for name in ("fashion-mnist-textures", "fmnist-textures", "textures", "Fashion-MNIST-Textures"):
        assert embedded_name(name) == "fashion-mnist-textures" and embedded_dataset(name) is TexturedFashionMNIST
    assert embedded_name("cluttered") == "fashion-mnist-cluttered" and embedded_name("mnist") is None
    with pytest.raises(tpsvit.errors.DatasetError, match="fashion-mnist-textures"):
        embedded_dataset("mnist")
    test = TexturedFashionMNIST(train=False)
    first = TexturedFashionMNIST(train=False, limit=10)
    assert test.images.shape == (40, 56, 56) and len(test) == 40 and len(TexturedFashionMNIST(train=True)) == 64
    assert torch.equal(first.images, test.images[:10]) and torch.equal(first.labels, test.labels[:10])
    assert torch.equal(test.labels, ClutteredFashionMNIST(train=False).labels)  # labels unchanged
    assert isinstance(test.spec, TextureSpec)
    dataset = build_dataset("fashion-mnist-textures", train=False, img_size=56, in_chans=1, limit=5)
    image, label = dataset[0]
    assert isinstance(dataset, TexturedFashionMNIST) and image.shape == (1, 56, 56) and 0 <= label < 10


def test_training_views_replay_exactly_and_differ_per_epoch(system_files):
    cfg = resolve("textures-scratch", {"batch_size": 16, "checkpoint": None})
    raw = find_data(cfg)
    assert "among textures" in raw.description and isinstance(raw.train, TexturedFashionMNIST)

    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=56, patch_size=8, in_chans=1, embed_dim=8, depth=1, num_heads=1)
    bundle = build_data(cfg, raw, model, 0, 1, 16, 32, pin_memory=False)
    first = [x for x, _ in bundle.train.batches(epoch=0)]
    again = [x for x, _ in bundle.train.batches(epoch=0)]
    resumed = [x for x, _ in bundle.train.batches(epoch=0, start=2)]  # a run resumed at step 2 of epoch 0
    later = [x for x, _ in bundle.train.batches(epoch=1)]
    assert first[0].shape == (16, 1, 56, 56)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed, strict=True)) and len(resumed) == 2
    assert not torch.equal(first[0], later[0])


def test_recipes_and_shipped_checkpoints(system_files):
    from tpsvit.errors import CheckpointError, InvalidArgumentError
    from tpsvit.io.assets import ASSETS, DEMO_MODELS, demo_checkpoint
    from tpsvit.train.modeling import start_checkpoint

    scratch, tune = resolve("textures-scratch", {}), resolve("textures-finetune", {})
    assert scratch.data == tune.data == "fashion-mnist-textures" and scratch.method == "none"
    assert start_checkpoint(scratch) == str(demo_checkpoint(None, "fashion-mnist-cluttered"))  # the warm start
    assert DEMO_MODELS["fashion-mnist-textures"].recipe == "textures-scratch"
    shipped = ASSETS / DEMO_MODELS["fashion-mnist-textures"].base
    if shipped.is_file():
        assert start_checkpoint(tune) == str(shipped) == str(demo_checkpoint(None, "textures"))
    else:
        with pytest.raises(CheckpointError, match="textures-scratch"):
            start_checkpoint(tune)
    with pytest.raises(InvalidArgumentError, match="shipped:fashion-mnist-textures"):
        start_checkpoint(resolve("textures-scratch", {"checkpoint": "shipped:mnist"}))


def test_demo_and_eval_pick_the_shipped_textures_model(tmp_path, capsys):
    """--data fashion-mnist-textures selects its own shipped base model (skipped until it is shipped)."""
    import csv

    from tpsvit.cli import main
    from tpsvit.io.assets import ASSETS, DEMO_MODELS

    shipped = ASSETS / DEMO_MODELS["fashion-mnist-textures"].base
    if not shipped.is_file():
        pytest.skip("the textures base model is not shipped yet")
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=4, n_test=24)
    out = tmp_path / "demo"
    assert main(["demo", "--data", "fashion-mnist-textures", "--data-dir", str(data), "--methods", "etps", "dtps",
                 "--budgets", "0.5", "--out", str(out), "--no-progress", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "no shipped fine-tune of dtps for fashion-mnist-textures: left out" in captured.err
    assert "deit_mini_patch8_56 on fashion-mnist-textures test (24 images)" in captured.out
    with open(out / "results.csv") as handle:
        assert [r["name"] for r in csv.DictReader(handle)] == ["unpatched", "etps"]
    from tpsvit.commands.evaluate import _shipped_data

    assert _shipped_data("textures") == "fashion-mnist-textures" and _shipped_data(None) == "fashion-mnist-cluttered"
