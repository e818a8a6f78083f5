from pathlib import Path

import numpy as np
import pytest
import torch
from fmnist_files import idx_bytes, write_idx
from PIL import Image

from tpsvit.data import datasets as data
from tpsvit.data.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    build_dataset,
    fashion_mnist_transform,
    find_fashion_mnist,
    image_folder,
    num_classes_of,
    read_idx,
    resize_and_expand,
)
from tpsvit.errors import DatasetError


def make_fmnist(directory: Path, n_train=12, n_test=10, gz=False):
    """Four tiny IDX files; images are filled with their index, labels are index % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    return directory


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, array)
    labels = read_idx(write_idx(tmp_path / "y-idx1-ubyte", np.array([3, 1, 4])))
    assert labels.tolist() == [3, 1, 4]


def test_read_idx_truncated_and_bad_magic(tmp_path):
    path = tmp_path / "trunc-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(DatasetError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)

    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x01" + idx_bytes(np.zeros(3))[4:])
    with pytest.raises(DatasetError, match="magic") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)

    broken_gz = tmp_path / "broken-idx1-ubyte.gz"
    broken_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=str(broken_gz)):
        read_idx(broken_gz)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_dataset(tmp_path, gz):
    root = make_fmnist(tmp_path / "fm", gz=gz)
    assert find_fashion_mnist(root) == root
    train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    assert len(train) == 12 and len(test) == 10 and len(train.classes) == 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    image, label = train[11]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == 11 and label == 1 and isinstance(label, int)

    limited = FashionMNIST(root, train=True, limit=4, transform=fashion_mnist_transform())
    assert len(limited) == 4 and limited[3][0].dtype == torch.float32
    x, y = limited.tensors()
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.long and y.tolist() == [0, 1, 2, 3]
    expected = (2 / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[2, 0, 0, 0], torch.tensor(expected))
    torch.testing.assert_close(x[1], limited[1][0])


def test_torchvision_layout_and_missing_roots(tmp_path):
    raw = make_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert find_fashion_mnist(tmp_path / "tv") == raw

    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as info:
        find_fashion_mnist(missing)
    assert str(missing) in str(info.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte") as info:
        FashionMNIST(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_no_fashion_mnist_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("TPSVIT_CACHE", str(tmp_path / "cache"))

    def offline(directory):
        raise RuntimeError("no network")

    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as info:
        find_fashion_mnist()
    assert "--data" in str(info.value) and "no network" in str(info.value)

    make_fmnist(tmp_path / "cache" / "fashion-mnist")
    assert find_fashion_mnist() == tmp_path / "cache" / "fashion-mnist"


def test_transforms():
    image = torch.arange(28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(1, 28, 28)
    out = fashion_mnist_transform()(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, (image.float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)
    assert fashion_mnist_transform()(image[0]).shape == (1, 28, 28)

    big = fashion_mnist_transform(224, 3)(image)
    assert big.shape == (3, 224, 224) and big.dtype == torch.float32
    torch.testing.assert_close(big[0], big[2])
    assert abs(big.mean().item() - out.mean().item()) < 0.05

    torch.manual_seed(0)
    aug = fashion_mnist_transform(28, 1, train=True)
    outs = [aug(image) for _ in range(8)]
    assert all(o.shape == (1, 28, 28) for o in outs)
    assert any(not torch.equal(o, out) for o in outs)
    assert fashion_mnist_transform(32, 3, train=True)(image).shape == (3, 32, 32)

    batch = resize_and_expand(torch.zeros(5, 1, 28, 28), 224, 3)
    assert batch.shape == (5, 3, 224, 224)
    with pytest.raises(DatasetError, match="img_size 0"):
        fashion_mnist_transform(0)


def make_image_folder(root: Path) -> Path:
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * c, 20 * i, 0)).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    ds = image_folder(root)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and num_classes_of(ds) == 2
    image, label = ds[4]
    assert image.size == (8, 8) and image.mode == "RGB" and label == 1

    bad = root / "dog" / "9.png"
    bad.write_bytes(b"definitely not a png")
    ds = image_folder(root)
    with pytest.raises(DatasetError, match="9.png") as info:
        ds[len(ds) - 1]
    assert str(bad) in str(info.value)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        image_folder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="missing images"):
        image_folder(tmp_path / "noimg")


def test_build_dataset_dispatch(tmp_path):
    fm = build_dataset(make_fmnist(tmp_path / "fm"), train=False, img_size=32, in_chans=3, limit=5)
    assert isinstance(fm, FashionMNIST) and len(fm) == 5 and num_classes_of(fm) == 10
    assert fm[0][0].shape == (3, 32, 32)

    folder = build_dataset(str(make_image_folder(tmp_path / "imgs")), train=False, img_size=32, in_chans=3,
                           limit=2)
    assert folder.classes == ["cat", "dog"] and [t for _, t in folder.samples] == [0, 1]
    image, _ = folder[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert num_classes_of(torch.utils.data.Subset(folder, [0])) == 2

    with pytest.raises(DatasetError, match="fashion-mnist"):
        build_dataset(tmp_path / "missing", train=False, img_size=28, in_chans=1)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="ImageFolder"):
        build_dataset(tmp_path / "flat", train=False, img_size=28, in_chans=1)


def test_build_dataset_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", make_fmnist(tmp_path / "system"))
    ds = build_dataset("FMNIST", train=True, img_size=28, in_chans=1)
    assert len(ds) == 12 and ds[0][0].shape == (1, 28, 28)


def test_real_fashion_mnist_test_split():
    if not data.SYSTEM_DIR.is_dir():
        pytest.skip(f"{data.SYSTEM_DIR} absent (apt-get install dataset-fashion-mnist)")
    ds = FashionMNIST(data.SYSTEM_DIR, train=False)
    x, y = ds.tensors()
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_grey_image_folder_for_a_one_channel_model(tmp_path):
    """A folder of 28x28 greyscale PNGs loads as 1-channel images resized to the model input, normalised with the
    model's mean/std; an RGB folder still loads for a 1-channel model (converted to grey), and vice versa."""
    import timm

    import tpsvit.io.models  # noqa: F401

    rng = np.random.default_rng(0)
    root = tmp_path / "grey"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(root / cls / f"{i}.png")
    model = timm.create_model("deit_mini_patch8_56")
    ds = build_dataset(root, train=False, img_size=56, in_chans=1, model=model)
    image, label = ds[0]
    assert image.shape == (1, 56, 56) and label == 0 and num_classes_of(ds) == 2
    raw = np.asarray(Image.open(root / "a" / "0.png").resize((56, 56), Image.BILINEAR), dtype=np.float32) / 255
    assert image.mean().item() == pytest.approx((raw.mean() - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, abs=0.02)
    assert build_dataset(root, train=True, img_size=28, in_chans=1, model=model)[3][0].shape == (1, 28, 28)
    assert build_dataset(root, train=False, img_size=32, in_chans=3)[0][0].shape == (3, 32, 32)
    rgb = build_dataset(make_image_folder(tmp_path / "rgb"), train=False, img_size=28, in_chans=1, model=model)
    assert rgb[0][0].shape == (1, 28, 28)
    with pytest.raises(DatasetError, match="in_chans 2"):
        build_dataset(root, train=False, img_size=28, in_chans=2)
