"""Datasets and transforms: Fashion-MNIST (IDX files read with numpy) and ImageFolder trees.

Fashion-MNIST is small enough to live in memory; ``FashionMNIST.tensors()`` gives the whole split as one
normalized tensor for fast batched evaluation (resize per batch with ``resize_and_expand``).
ImageFolder trees (``root/<class>/<image>``, e.g. ImageNet val) use torchvision with timm's eval transform.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from tpsvit.errors import DatasetError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist", "fashion_mnist")
CLUTTERED_NAMES = ("fashion-mnist-cluttered", "fmnist-cluttered", "cluttered")
TEXTURES_NAMES = ("fashion-mnist-textures", "fmnist-textures", "textures")
EMBEDDED_NAMES = FASHION_MNIST_NAMES + CLUTTERED_NAMES + TEXTURES_NAMES  # every name of an embedded dataset
# The embedded dataset that a grey model of each input size (channels, height, width) takes by default.
DEFAULT_DATA_BY_INPUT = {(1, 28, 28): "fashion-mnist", (1, 56, 56): "fashion-mnist-cluttered"}
IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_IDX_UBYTE = 0x08


# ----------------------------------------------------------------------------------------------- IDX files

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (idx3 images, idx1 labels), gzipped (``.gz``) or plain.

    Returns a uint8 array shaped as the header says. Raises DatasetError when the file is missing,
    is not IDX-ubyte (bad magic number) or is truncated / has trailing bytes.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"IDX file {path} does not exist; expected one of {', '.join(IDX_FILES)}") from e
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated gzip streams
        raise DatasetError(f"cannot read IDX file {path}: {e}; re-download or replace it") from e

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] == 0:
        raise DatasetError(
            f"{path} is not an IDX ubyte file (magic bytes {data[:4].hex() or 'missing'}, expected "
            f"0000 08 followed by the number of dimensions, e.g. 00000803 for images, 00000801 for labels)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"IDX file {path} is truncated: header needs {header} bytes, file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(
            f"IDX file {path} is {what}: shape {shape} needs {expected} bytes, file has {len(data)}; "
            "re-download or replace it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(directory: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``directory``, plain or ``.gz``, or None."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _holds_fashion_mnist(directory: Path) -> bool:
    return all(_idx_path(directory, stem) is not None for stem in IDX_FILES)


def _fashion_mnist_dir(root: Path) -> Path | None:
    """``root`` or ``root/FashionMNIST/raw`` when it holds the four IDX files, else None."""
    for directory in (root, root / "FashionMNIST" / "raw"):
        if _holds_fashion_mnist(directory):
            return directory
    return None


def cache_dir() -> Path:
    """tpsvit's cache directory: ``$TPSVIT_CACHE`` if set, else ``~/.cache/tpsvit``."""
    return Path(os.environ.get("TPSVIT_CACHE") or "~/.cache/tpsvit").expanduser()


def _download_fashion_mnist(directory: Path) -> None:
    """Download Fashion-MNIST into ``directory/FashionMNIST/raw`` with torchvision (progress to stderr)."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        TorchvisionFashionMNIST(str(directory), train=False, download=True)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the four Fashion-MNIST IDX files (each plain or ``.gz``).

    With ``root`` given, only ``root`` and ``root/FashionMNIST/raw`` are searched (a missing root or one
    without the files is an error). Without it: ``/usr/share/datasets/fashion-mnist``, then the cache
    (``$TPSVIT_CACHE`` or ``~/.cache/tpsvit``, subfolder ``fashion-mnist``), downloading there with
    torchvision when needed. Raises DatasetError saying how to get the files when all of that fails.
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DatasetError(
                f"Fashion-MNIST directory {root} does not exist; pass --data DIR with the IDX files "
                f"{', '.join(IDX_FILES)} (each optionally .gz)"
            )
        found = _fashion_mnist_dir(root)
        if found is None:
            raise DatasetError(
                f"{root} does not hold the Fashion-MNIST IDX files; expected {', '.join(IDX_FILES)} "
                f"(each optionally .gz) in {root} or {root / 'FashionMNIST' / 'raw'}"
            )
        return found

    if _holds_fashion_mnist(SYSTEM_DIR):
        return SYSTEM_DIR
    cache = cache_dir() / "fashion-mnist"
    found = _fashion_mnist_dir(cache)
    if found is not None:
        return found
    reason = ""
    try:
        _download_fashion_mnist(cache)
    except Exception as e:  # network, disk, checksum: every failure ends in the same advice
        first_line = str(e).splitlines()[0] if str(e) else ""
        reason = f" (download into {cache} failed: {type(e).__name__}: {first_line})"
    found = _fashion_mnist_dir(cache)
    if found is not None:
        return found
    raise DatasetError(
        f"Fashion-MNIST not found in {SYSTEM_DIR} or {cache}{reason}; pass --data DIR with the IDX files "
        f"{', '.join(IDX_FILES)}, or `apt-get install dataset-fashion-mnist`, "
        "or allow internet access for torchvision's download"
    )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit {limit!r} is not a positive integer; pass a sample count >= 1 or None")


class FashionMNIST(Dataset):
    """Fashion-MNIST split held in memory as uint8; items are ``(transform(image), label)``.

    Without a transform the image is a uint8 tensor of shape (1, 28, 28). ``limit`` keeps the first
    ``limit`` samples (a deterministic subset). ``root`` is searched as in ``find_fashion_mnist``.
    """

    classes = list(FASHION_MNIST_CLASSES)
    title, slug = "Fashion-MNIST", "fashion-mnist"  # for descriptions, and as the name ``build_dataset`` takes

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True,
                 transform: Callable | None = None, limit: int | None = None):
        _check_limit(limit)
        self.root = find_fashion_mnist(root)
        self.train = train
        self.transform = transform
        split = "train" if train else "t10k"
        images_path = _idx_path(self.root, f"{split}-images-idx3-ubyte")
        labels_path = _idx_path(self.root, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise DatasetError(f"{images_path} has shape {images.shape}; expected images (N, H, W)")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetError(
                f"{labels_path} has shape {labels.shape}; "
                f"expected ({len(images)},) labels to match {images_path}"
            )
        if len(labels) and labels.max() >= len(self.classes):
            raise DatasetError(
                f"{labels_path} has label {labels.max()}; expected labels 0..{len(self.classes) - 1}"
            )
        self.images = torch.from_numpy(images[:limit].copy())
        self.labels = torch.from_numpy(labels[:limit].astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (normalized float images N x 1 x H x W, long labels N); ignores transform."""
        return normalize_uint8(self.images), self.labels.clone()


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey images (B, H, W) -> float (B, 1, H, W) normalised with the Fashion-MNIST statistics."""
    return images.unsqueeze(1).float().div_(255).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)


class ClutteredFashionMNIST(FashionMNIST):
    """Fashion-MNIST garments on a larger canvas among clutter (see :mod:`tpsvit.data.cluttered`).

    ``images`` are the split's fixed cluttered composition (uint8, N x canvas x canvas; the test split's is the
    benchmark, the training split's is for calibration and evaluation), composed on first use; ``garments`` are the
    28x28 originals that training composes anew per batch (:meth:`compose`). ``limit`` keeps the first N of the
    fixed composition.
    """

    title, slug = "cluttered Fashion-MNIST", "fashion-mnist-cluttered"

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True,
                 transform: Callable | None = None, limit: int | None = None, spec=None):
        _check_limit(limit)
        super().__init__(root, train, transform, None)
        self.spec = spec or self.default_spec()
        self._all_garments = self.__dict__.pop("images")  # the whole split: the fixed composition draws clutter from it
        self._limit = limit
        self.labels = self.labels[:limit]
        self.garments = self._all_garments[:limit] if train else self._all_garments

    @functools.cached_property
    def images(self) -> torch.Tensor:
        from tpsvit.data.cluttered import TEST_SEED, TRAIN_VIEW_SEED, compose_fixed

        seed = TRAIN_VIEW_SEED if self.train else TEST_SEED
        return compose_fixed(self._all_garments, seed, self.spec)[: self._limit]

    def compose(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A fresh cluttered uint8 batch (B, canvas, canvas) of the garments ``index`` (random flip, new clutter)."""
        return self.spec.compose(self.garments[index], self.garments, gen, flip=True)

    @staticmethod
    def default_spec():
        """The composition used without ``spec``: six 8x8 crops of other garments on a 56x56 canvas."""
        from tpsvit.data.cluttered import ClutterSpec

        return ClutterSpec()


class TexturedFashionMNIST(ClutteredFashionMNIST):
    """Cluttered Fashion-MNIST whose clutter pieces are procedural textures, not crops of other garments (see
    :mod:`tpsvit.data.textures`). Same canvas, piece count and size, and the same seeds: each garment lands where
    it lands in :class:`ClutteredFashionMNIST`'s fixed splits, only the clutter differs."""

    title, slug = "Fashion-MNIST among textures", "fashion-mnist-textures"

    @staticmethod
    def default_spec():
        """Six 8x8 procedural texture pieces on a 56x56 canvas (:class:`~tpsvit.data.textures.TextureSpec`)."""
        from tpsvit.data.textures import TextureSpec

        return TextureSpec()


def embedded_name(name) -> str | None:
    """The canonical name ('fashion-mnist', 'fashion-mnist-cluttered', 'fashion-mnist-textures') of an embedded
    dataset's name or alias, or None when ``name`` names none."""
    key = str(name).lower()
    for names in (FASHION_MNIST_NAMES, CLUTTERED_NAMES, TEXTURES_NAMES):
        if key in names:
            return names[0]
    return None


EMBEDDED = {"fashion-mnist": FashionMNIST, "fashion-mnist-cluttered": ClutteredFashionMNIST,
            "fashion-mnist-textures": TexturedFashionMNIST}


def embedded_dataset(name: str) -> type[FashionMNIST]:
    """The class of an embedded dataset by name: 'fashion-mnist' (or 'fmnist'), 'fashion-mnist-cluttered' or
    'fashion-mnist-textures'."""
    canonical = embedded_name(name)
    if canonical is None:
        raise DatasetError(f"{name!r} is not an embedded dataset; allowed: {', '.join(EMBEDDED)}")
    return EMBEDDED[canonical]


# ----------------------------------------------------------------------------------------------- transforms

def _check_size(img_size: int, in_chans: int) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise DatasetError(f"img_size {img_size!r} is not a positive integer; use e.g. 28 or 224")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise DatasetError(f"in_chans {in_chans!r} is not a positive integer; use 1 (grayscale) or 3 (RGB)")


def resize_and_expand(images: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """Bilinearly resize float images (..., 1, H, W) to img_size and repeat the channel ``in_chans`` times.

    Works on one image or a batch, e.g. ``x, y = ds.tensors(); model(resize_and_expand(x[:256], 224, 3))``.
    """
    if images.shape[-2:] != (img_size, img_size):
        batch = images.reshape(-1, *images.shape[-3:])
        batch = F.interpolate(batch, size=(img_size, img_size), mode="bilinear", align_corners=False)
        images = batch.reshape(*images.shape[:-2], img_size, img_size)
    if in_chans != images.shape[-3]:
        repeats = [1] * images.dim()
        repeats[-3] = in_chans
        images = images.repeat(*repeats)
    return images


class FashionMNISTTransform:
    """uint8 image (H, W) or (1, H, W) -> normalized float (in_chans, img_size, img_size), see below."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, train: bool = False):
        _check_size(img_size, in_chans)
        self.img_size, self.in_chans, self.train = img_size, in_chans, train

    def __call__(self, image) -> torch.Tensor:
        x = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
        if x.dim() == 2:
            x = x.unsqueeze(0)
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        if self.train:
            h, w = x.shape[-2:]
            top, left = torch.randint(0, 5, (2,)).tolist()
            x = F.pad(x, (2, 2, 2, 2))[..., top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return resize_and_expand(x, self.img_size, self.in_chans)

    def __repr__(self) -> str:
        return (f"FashionMNISTTransform(img_size={self.img_size}, in_chans={self.in_chans}, "
                f"train={self.train})")


def fashion_mnist_transform(img_size: int = 28, in_chans: int = 1,
                            train: bool = False) -> FashionMNISTTransform:
    """Tensor transform for Fashion-MNIST: uint8 28x28 -> float (in_chans, img_size, img_size).

    Scales to [0, 1], normalizes with mean 0.2860 / std 0.3530, resizes bilinearly when img_size != 28
    and repeats the channel for in_chans == 3. ``train=True`` adds a random crop (padding 2) and a
    horizontal flip.
    """
    return FashionMNISTTransform(img_size, in_chans, train)


# ----------------------------------------------------------------------------------------------- ImageFolder

def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable or corrupt file raises DatasetError naming it."""
    return _load(path, "RGB")


def load_grey(path: str) -> Image.Image:
    """Open an image as greyscale ('L'); an unreadable or corrupt file raises DatasetError naming it."""
    return _load(path, "L")


def _load(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e


def image_folder(root: str | os.PathLike, transform: Callable | None = None, in_chans: int = 3):
    """torchvision ImageFolder over ``root/<class>/<image>`` (e.g. ImageNet val).

    Images are read as RGB, or as greyscale when ``in_chans`` is 1. Its loader turns an unreadable image into a
    DatasetError naming the file. Raises DatasetError when root is missing, is not a directory, has no class folders
    or no images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    layout = "expected a directory laid out as root/<class>/<image> (e.g. ImageNet val)"
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist; {layout}")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} is not a directory; {layout}")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DatasetError(f"image folder {root} has no class folders; {layout}")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_grey if in_chans == 1 else load_rgb)
    except FileNotFoundError as e:  # torchvision: some class folder holds no image files
        raise DatasetError(f"image folder {root} is missing images: {e}; {layout}") from e


def imagefolder_transform(model: torch.nn.Module | None = None, train: bool = False, img_size: int = 224):
    """timm's transform at ``img_size`` with ``model``'s data config (mean, std, interpolation, crop), or timm's
    defaults without a model. The size is always ``img_size``: a model built at another size than its pretrained
    config still gets the images it takes."""
    import timm.data

    cfg = timm.data.resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return timm.data.create_transform(**cfg, is_training=train)


def grey_imagefolder_transform(model: torch.nn.Module | None = None, train: bool = False, img_size: int = 28):
    """Greyscale ('L') images -> float (1, img_size, img_size): resized to the model's input (bilinear, no crop),
    normalised with the model's mean/std (one value; a 3-channel mean/std is averaged; Fashion-MNIST's without a
    model). ``train=True`` adds a random crop (padding img_size // 14) and a horizontal flip."""
    import timm.data
    from torchvision import transforms

    mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    if model is not None:
        cfg = timm.data.resolve_data_config({"input_size": (1, img_size, img_size)}, model=model)
        mean, std = (float(np.mean(cfg["mean"])),), (float(np.mean(cfg["std"])),)
    steps = [transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BILINEAR)]
    if train:
        steps += [transforms.RandomCrop(img_size, padding=max(1, img_size // 14)), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------------------------- dispatch

def _keep_spread(dataset, limit: int | None):
    """Keep ``limit`` samples of an ImageFolder, evenly spread over its (class-sorted) samples."""
    n = len(dataset.samples)
    if limit is None or limit >= n:
        return dataset
    keep = [i * n // limit for i in range(limit)]
    dataset.samples = [dataset.samples[i] for i in keep]
    dataset.imgs = dataset.samples
    dataset.targets = [s[1] for s in dataset.samples]
    return dataset


def build_dataset(name_or_path: str | os.PathLike, train: bool, img_size: int, in_chans: int,
                  model: torch.nn.Module | None = None, limit: int | None = None) -> Dataset:
    """Build a dataset with ``.classes`` from a name or a path.

    Accepted: "fashion-mnist" / "fmnist" (found as in ``find_fashion_mnist``); "fashion-mnist-cluttered" and
    "fashion-mnist-textures" (the same files, see :class:`ClutteredFashionMNIST`, :class:`TexturedFashionMNIST`);
    a directory holding the
    Fashion-MNIST IDX files (or ``FashionMNIST/raw`` below it); an ImageFolder tree ``root/<class>/<image>``,
    transformed with ``imagefolder_transform(model, train, img_size)`` (RGB), or read as greyscale and transformed
    with ``grey_imagefolder_transform`` when ``in_chans`` is 1. ``limit`` keeps a deterministic subset
    (Fashion-MNIST: the first N; ImageFolder: N spread evenly over the classes).
    """
    _check_size(img_size, in_chans)
    _check_limit(limit)
    accepted = ("expected 'fashion-mnist' (or 'fmnist'), 'fashion-mnist-cluttered', 'fashion-mnist-textures', "
                "a directory with the "
                "Fashion-MNIST IDX files, "
                "or an ImageFolder directory root/<class>/<image>")
    if str(name_or_path).lower() in FASHION_MNIST_NAMES:
        return FashionMNIST(None, train, fashion_mnist_transform(img_size, in_chans, train), limit)
    if str(name_or_path).lower() in CLUTTERED_NAMES + TEXTURES_NAMES:
        kind = embedded_dataset(str(name_or_path))
        return kind(None, train, fashion_mnist_transform(img_size, in_chans, False), limit)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset {str(name_or_path)!r} is neither a known name nor an existing path; {accepted}"
        )
    if path.is_dir() and _fashion_mnist_dir(path) is not None:
        return FashionMNIST(path, train, fashion_mnist_transform(img_size, in_chans, train), limit)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        if in_chans not in (1, 3):
            raise DatasetError(f"in_chans {in_chans} does not fit image folder {path}; use 1 (read as greyscale) "
                               "or 3 (read as RGB)")
        if in_chans == 1:
            transform = grey_imagefolder_transform(model, train, img_size)
        else:
            transform = imagefolder_transform(model, train, img_size)
        return _keep_spread(image_folder(path, transform, in_chans=in_chans), limit)
    raise DatasetError(
        f"dataset path {path} is neither Fashion-MNIST IDX files nor an ImageFolder tree; {accepted}"
    )


def num_classes_of(dataset) -> int:
    """Number of classes of a dataset with ``.classes`` (a torch Subset is looked through)."""
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "classes"):
        raise DatasetError(f"dataset {type(dataset).__name__} has no .classes; build it with build_dataset")
    return len(dataset.classes)
