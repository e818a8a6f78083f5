"""Token maps: tpsvit.viz.visualize and `tpsvit viz` on tiny models, tiny images and synthetic Fashion-MNIST files."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_vit
from fmnist_files import write_fashion_mnist
from PIL import Image
from test_restore import hand_trace

import tpsvit
from tpsvit.cli import main
from tpsvit.data.datasets import FASHION_MNIST_MEAN
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.io.loading import save_checkpoint
from tpsvit.viz import DROPPED, FUSED, PALETTE, _compose, host_colours, model_data_config, token_groups, visualize

TINY_KWARGS = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=7)
GREY_KWARGS = dict(depth=4, embed_dim=32, num_heads=2)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def image():
    torch.manual_seed(3)
    return torch.randn(1, 3, 32, 32)


# --------------------------------------------------------------------------------------------- token groups


def test_token_groups_by_hand():
    trace = hand_trace()  # see test_restore: patch 1 squeezed into 0, 3 dropped, then 2 and 4 fused
    assert token_groups(trace, 0, 6).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert token_groups(trace, 1).tolist() == [[0, 0, 2, DROPPED, 4, 5]]
    assert token_groups(trace, 2).tolist() == [[0, 0, FUSED, DROPPED, FUSED, 5]]


def test_compose_keeps_kept_patches_and_tints_the_rest():
    groups = token_groups(hand_trace(), 2)[0].numpy()
    colours = host_colours([groups], 6)
    image = np.random.default_rng(0).uniform(0.2, 0.8, (4, 6, 3))  # 2x3 grid of 2x2-pixel patches
    out = _compose(image, groups, (2, 3), colours)
    cell = lambda a, i: a[2 * (i // 3): 2 * (i // 3) + 2, 2 * (i % 3): 2 * (i % 3) + 2]  # noqa: E731
    for kept in (0, 5):
        assert np.array_equal(cell(out, kept), cell(image, kept))
    # patch 1 went into patch 0: tinted towards the host's colour
    host = colours[0]
    assert np.abs(cell(out, 1) - host).mean() < np.abs(cell(image, 1) - host).mean()
    assert cell(out, 2).mean() < cell(image, 2).mean() and cell(out, 4).mean() < cell(image, 4).mean()  # fused: dark
    assert np.ptp(cell(out, 3), axis=-1).max() < 1e-9  # dropped: grey


def test_largest_group_gets_the_first_colour():
    groups = np.array([[0, 3, 3, 3, 4, 5]])[0]  # host 3 holds three patches
    colours = host_colours([groups], 6)
    assert np.allclose(colours[3], [int(PALETTE[0][i : i + 2], 16) / 255 for i in (1, 3, 5)])
    assert len({tuple(c) for c in colours}) == 6


def test_every_host_of_a_196_token_grid_gets_its_own_colour():
    groups = np.arange(196)
    groups[1::2] = groups[0::2]  # 98 hosts, each with one pruned neighbour
    colours = host_colours([groups], 196)
    assert len({tuple(np.round(c, 6)) for c in colours}) == 196


def test_host_links_only_on_small_grids_by_default():
    from matplotlib.collections import LineCollection

    def line_sets(model, img, **kw):
        fig = visualize(model, img, **kw)[0]
        return sum(isinstance(c, LineCollection) for ax in fig.axes for c in ax.collections)

    small = tpsvit.patch(tiny_vit(), "etps", 0.5, (1,))  # 64 tokens: linked
    big = tpsvit.patch(tiny_vit(img_size=56), "etps", 0.5, (1,))  # 196 tokens: colours only
    assert line_sets(small, torch.randn(1, 3, 32, 32)) == 1
    assert line_sets(big, torch.randn(1, 3, 56, 56)) == 0
    assert line_sets(big, torch.randn(1, 3, 56, 56), links=True) == 1


# --------------------------------------------------------------------------------------------- visualize


def test_png_has_the_documented_size(tmp_path, image):
    model = tpsvit.patch(tiny_vit(), "etps", 0.7, (1, 3, 5))
    paths = visualize(model, image, tmp_path, names=["cat"], panel_size=2.0, dpi=50)
    assert [p.name for p in paths] == ["cat_etps.png"]
    assert Image.open(paths[0]).size == (4 * 2 * 50, (2 + 1) * 50)  # 4 panels in a row, 1 inch of title and legend

    tpsvit.patch(model, "tome", r=2)  # every one of the 6 blocks: 7 panels in rows of at most 5
    paths = visualize(model, image, tmp_path, names=["cat"], panel_size=2.0, dpi=50)
    assert Image.open(paths[0]).size == (5 * 2 * 50, (2 * 2 + 1) * 50)


def test_pixels_differ_between_methods_and_repeat_within_one(tmp_path, image):
    model = tiny_vit(depth=4)
    pictures = {}
    for method in ("etps", "evit", "dynamicvit", "tome", "etps"):
        tpsvit.patch(model, method, 0.5, (1, 3))
        path = visualize(model, image, tmp_path / method, dpi=30)[0]
        pixels = _pixels(path)
        if method in pictures:
            assert np.array_equal(pictures[method], pixels)
        pictures[method] = pixels
    methods = list(pictures)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            assert pictures[a].shape == pictures[b].shape
            assert not np.array_equal(pictures[a], pictures[b]), (a, b)


def test_figures_without_out_dir_and_mode_is_restored(image):
    model = tpsvit.patch(tiny_vit(), "dtps", 0.5, (2,)).train()
    figures = visualize(model, torch.cat([image, image]), labels=[1, "shoe"], class_names=list("abcdefg"))
    assert len(figures) == 2
    assert tuple(figures[0].get_size_inches()) == (2 * 2.5, 2.5 + 1)
    assert "true: b" in figures[0]._suptitle.get_text() and "true: shoe" in figures[1]._suptitle.get_text()
    assert model.training


def test_keep_rate_one_draws_every_token_kept(tmp_path, image):
    model = tpsvit.patch(tiny_vit(), "etps", 1.0, (1, 3))
    path = visualize(model, image, tmp_path, dpi=40)[0]
    assert Image.open(path).size == (3 * 2.5 * 40, 3.5 * 40)


def test_grey_28px_model_uses_fashion_mnist_statistics(tmp_path):
    model = timm.create_model(tpsvit.io.models.MINI_DEIT, **GREY_KWARGS).eval()
    cfg = model_data_config(model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (FASHION_MNIST_MEAN,)
    tpsvit.patch(model, "etps", 0.7, (1, 2))
    image = (torch.zeros(1, 1, 28, 28) - FASHION_MNIST_MEAN) / 0.353  # black image
    path = visualize(model, image, tmp_path, dpi=40)[0]
    assert Image.open(path).size == (3 * 2.5 * 40, 3.5 * 40)


def test_model_data_config_follows_the_real_input_size():
    cfg = model_data_config(tiny_vit())
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == 3


@pytest.mark.parametrize(
    "model, images, kwargs, error, pattern",
    [
        ("plain", torch.zeros(1, 3, 32, 32), {}, UnsupportedModelError, "not patched"),
        ("patched", torch.zeros(1, 3, 28, 28), {}, InvalidArgumentError, "3x28x28 .* takes 3x32x32"),
        ("patched", torch.zeros(3, 32, 32, dtype=torch.long), {}, InvalidArgumentError, "float tensor"),
        ("patched", torch.zeros(2, 3, 32, 32), {"names": ["a"]}, InvalidArgumentError, "1 names for 2 images"),
        ("patched", torch.zeros(1, 3, 32, 32), {"mean": [0.5, 0.5]}, InvalidArgumentError, "1 or 3 values"),
    ],
)
def test_bad_arguments(model, images, kwargs, error, pattern):
    net = tiny_vit(depth=2)
    if model == "patched":
        tpsvit.patch(net, "etps", 0.5, (1,))
    with pytest.raises(error, match=pattern):
        visualize(net, images, **kwargs)


# --------------------------------------------------------------------------------------------- the command


@pytest.fixture
def fmnist(tmp_path):
    """Synthetic Fashion-MNIST: four gzipped IDX files, 4 train and 5 test images."""
    return write_fashion_mnist(tmp_path / "fmnist", n_train=4, n_test=5, gz=True)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS)
    return str(save_checkpoint(model, tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY_KWARGS))


@pytest.fixture
def grey_checkpoint(tmp_path):
    """A 4-block grey 28x28 mini-DeiT, patched with dTPS at blocks 1 and 2 (recorded in the checkpoint)."""
    torch.manual_seed(0)
    model = tpsvit.patch(timm.create_model(tpsvit.io.models.MINI_DEIT, **GREY_KWARGS), "dtps", 0.5, (1, 2))
    return str(save_checkpoint(model, tmp_path / "grey.safetensors", tpsvit.io.models.MINI_DEIT, GREY_KWARGS))


def test_cli_on_an_image_file_and_a_folder(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(folder / "two.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / "sub" / "three.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["viz", str(tmp_path / "one.png"), str(folder), "--checkpoint", tiny_checkpoint,
                 "--locations", "1", "3", "--dpi", "40", "--out", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["one_etps.png", "three_etps.png", "two_etps.png"]
    assert Image.open(out / "one_etps.png").size == (3 * 2.5 * 40, 3.5 * 40)
    printed = capsys.readouterr().out.split()  # files in argument order, folders sorted recursively
    assert printed == [str(out / n) for n in ("one_etps.png", "three_etps.png", "two_etps.png")]


def test_cli_on_fashion_mnist_samples_with_the_recorded_patch(tmp_path, fmnist, grey_checkpoint):
    out = tmp_path / "out"
    assert main(["viz", "--data", str(fmnist), "--index", "0", "4", "--checkpoint", grey_checkpoint,
                 "--dpi", "40", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fashion-mnist_test_0_dtps.png", "fashion-mnist_test_4_dtps.png"]
    first = _pixels(out / "fashion-mnist_test_0_dtps.png")
    assert first.shape == (3.5 * 40, 3 * 2.5 * 40, 3)

    # flags override the recorded patch; --samples takes the first N
    assert main(["viz", "--data", str(fmnist), "--split", "train", "--samples", "2", "--checkpoint", grey_checkpoint,
                 "--method", "tome", "--dpi", "40", "--out", str(out)]) == 0
    assert (out / "fashion-mnist_train_1_tome.png").is_file()


def test_cli_defaults_to_the_shipped_demo_model(tmp_path, fmnist, grey_checkpoint, monkeypatch):
    assets = pytest.importorskip("tpsvit.io.assets")
    monkeypatch.setattr(assets, "demo_checkpoint", lambda method=None, data=None: grey_checkpoint)
    out = tmp_path / "out"
    assert main(["viz", "--data", str(fmnist), "--samples", "1", "--dpi", "40", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["fashion-mnist_test_0_dtps.png"]


def _fail_demo(method=None, data=None):
    raise tpsvit.CheckpointError("missing")


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["missing.png"], "input 'missing.png' does not exist"),
        (["broken.png"], "cannot read image .*broken.png"),
        (["good.png", "--model", "resnet18"], "ResNet is not a timm VisionTransformer"),
        (["good.png", "--locations", "3", "7"], "location 7 is not a block"),
        (["good.png", "--keep-rate", "1.5"], "keep_rate 1.5 is outside"),
        (["--data", "FMNIST", "--index", "5"], "--index 5 is outside the test split"),
        (["--data", "FMNIST", "--samples", "0"], "--samples 0 must be >= 1"),
        (["empty"], "folder 'empty' holds no images"),
        (["good.png", "--checkpoint", "nope.safetensors"], "nope.safetensors' does not exist"),
        (["good.png", "--checkpoint", None, "--model", None], "no model given"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(argv, pattern, tmp_path, fmnist, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save("good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    if None in argv:  # no model at all, and no shipped demo model
        argv = [a for a in argv if a not in ("--checkpoint", "--model", None)]
        assets = pytest.importorskip("tpsvit.io.assets")
        monkeypatch.setattr(assets, "demo_checkpoint", _fail_demo)
    elif "--checkpoint" not in argv and "--model" not in argv:
        argv = [*argv, "--checkpoint", tiny_checkpoint] + ([] if "--locations" in argv else ["--locations", "1", "3"])
    argv = [str(fmnist) if a == "FMNIST" else a for a in argv]
    assert main(["viz", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpsvit viz: error: ")
    assert __import__("re").search(pattern, err[0]), err[0]


def test_cli_on_an_image_folder_tree_uses_the_model_input_size(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / "a.png")
    out = tmp_path / "out"
    assert main(["viz", "--data", str(tmp_path / "tree"), "--index", "1", "--checkpoint", tiny_checkpoint,
                 "--locations", "2", "--dpi", "40", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["tree_1_etps.png"]
    assert Image.open(out / "tree_1_etps.png").size == (2 * 2.5 * 40, 3.5 * 40)
