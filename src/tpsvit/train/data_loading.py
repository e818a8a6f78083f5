"""Training and evaluation batches, sharded over ranks, in a data order that a resumed run can re-enter mid-epoch.

Two sources:
- Fashion-MNIST (by name or an IDX folder) lives in memory as one tensor; augmentation (random crop with padding 2
  and a horizontal flip) is applied to whole batches, with a random generator seeded from (seed, epoch, step, rank),
  so a resumed run sees bit-identical batches.
- ImageFolder trees go through a torch DataLoader with timm's DeiT transform (RandAugment, colour jitter, random
  erasing); the data order is exact on resume, the random augmentation inside workers is not.

The epoch order is a permutation seeded by (seed, epoch), identical on every rank; rank r takes every world-th index.
With ``aug_repeats > 1`` and several ranks, each index is repeated (DeiT's repeated augmentation), so the copies of
one image land on different ranks with different augmentations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, Subset

from tpsvit.data.datasets import (
    EMBEDDED_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ClutteredFashionMNIST,
    FashionMNIST,
    embedded_dataset,
    find_fashion_mnist,
    grey_imagefolder_transform,
    image_folder,
    load_grey,
    normalize_uint8,
    resize_and_expand,
)
from tpsvit.errors import DatasetError, InvalidArgumentError


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(*parts: int) -> torch.Generator:
    """A CPU torch generator seeded by :func:`mix_seed`."""
    gen = torch.Generator()
    gen.manual_seed(mix_seed(*parts))
    return gen


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The same permutation of range(n) on every rank for this (seed, epoch)."""
    return torch.randperm(n, generator=generator(seed, epoch, 7)) if shuffle else torch.arange(n)


def shard(order: torch.Tensor, rank: int, world: int, repeats: int = 1, equal: bool = True) -> torch.Tensor:
    """This rank's indices: every world-th of ``order`` (each repeated ``repeats`` times first when world > 1).

    ``equal`` trims every rank to the same count (training: equal steps on every rank); evaluation keeps all.
    """
    n = len(order)
    if repeats > 1 and world > 1:
        order = order.repeat_interleave(repeats)
    mine = order[rank::world]
    return mine[: n // world] if equal else mine


def crop_flip(images: torch.Tensor, pad: int, gen: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """Per-image random crop of the same size after padding by ``pad`` (with ``fill``), then a random h-flip."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    top = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (b, c, h, w)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


class TensorBatches:
    """Fashion-MNIST-style in-memory batches for training (sharded, shuffled, augmented) or evaluation.

    ``augment(index, generator) -> images`` makes the batch of the given sample indices when set (crop + flip,
    or a fresh cluttered composition); without it the batch is ``images[index]``.
    """

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor, batch_size: int, rank: int, world: int,
                 seed: int, train: bool, augment, img_size: int, in_chans: int):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.train, self.augment = train, augment
        self.img_size, self.in_chans = img_size, in_chans

    def __len__(self) -> int:
        if self.train:
            return (len(self.labels) // self.world) // self.batch_size
        return -(-len(self.labels[self.rank:: self.world]) // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) from batch ``start`` of this epoch."""
        order = epoch_order(len(self.labels), self.seed, epoch, shuffle=self.train)
        mine = shard(order, self.rank, self.world, equal=self.train)
        for step in range(start, len(self)):
            index = mine[step * self.batch_size: (step + 1) * self.batch_size]
            if self.augment is not None:
                x = self.augment(index, generator(self.seed, epoch, step, self.rank))
            else:
                x = self.images[index]
            yield resize_and_expand(x, self.img_size, self.in_chans), self.labels[index]


class ShardedSampler(Sampler):
    """Index sampler for a DataLoader: the shared epoch order, this rank's shard, starting at sample ``start``."""

    def __init__(self, n: int, rank: int, world: int, seed: int, train: bool, repeats: int = 1):
        self.n, self.rank, self.world, self.seed, self.train, self.repeats = n, rank, world, seed, train, repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and the first sample to yield."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> torch.Tensor:
        order = epoch_order(self.n, self.seed, self.epoch, shuffle=self.train)
        return shard(order, self.rank, self.world, self.repeats if self.train else 1, equal=self.train)

    def __iter__(self):
        return iter(self._indices()[self.start:].tolist())

    def __len__(self) -> int:
        return len(self._indices()) - self.start


class FolderBatches:
    """ImageFolder batches through a DataLoader with a :class:`ShardedSampler`."""

    def __init__(self, dataset, batch_size: int, rank: int, world: int, seed: int, train: bool, repeats: int,
                 workers: int, pin_memory: bool):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.seed, self.rank, self.workers, self.pin_memory = seed, rank, workers, pin_memory
        self.sampler = ShardedSampler(len(dataset), rank, world, seed, train, repeats)
        self._loader = None  # with workers: one DataLoader whose workers persist across epochs and evaluations

    def __len__(self) -> int:
        self.sampler.set_epoch(0)
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) from batch ``start`` of this epoch."""
        # the sampler is read in this process each time the loader is iterated, so set_epoch() steers a reused loader
        self.sampler.set_epoch(epoch, start * self.batch_size)
        if not self.workers:
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=0,
                pin_memory=self.pin_memory, drop_last=self.train,
                generator=generator(self.seed, epoch, start, self.rank),
            )
        else:
            # persistent workers: no respawn every epoch and every evaluation; the order stays exact (the sampler),
            # the workers' augmentation seeds are drawn once (that randomness is not exact on resume anyway)
            if self._loader is None:
                self._loader = DataLoader(
                    self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
                    pin_memory=self.pin_memory, drop_last=self.train, persistent_workers=True,
                    generator=generator(self.seed, epoch, start, self.rank),
                )
            loader = self._loader
        yield from loader


@dataclass
class DataBundle:
    """What the engine needs from the data: the two batch sources and the class names."""

    train: TensorBatches | FolderBatches
    eval: TensorBatches | FolderBatches
    classes: list
    description: str


def _is_fashion_mnist(data: str) -> bool:
    if data.lower() in EMBEDDED_NAMES:
        return True
    path = Path(data).expanduser()
    if not path.is_dir():
        return False
    try:
        find_fashion_mnist(path)
    except DatasetError:
        return False
    return True


def _spread(dataset, limit: int | None):
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    return Subset(dataset, [i * n // limit for i in range(limit)])


def _folder_roots(root: Path, train_split: str, val_split: str) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DatasetError(f"dataset {str(root)!r} does not exist; expected 'fashion-mnist', a Fashion-MNIST IDX "
                           "folder or an ImageFolder root (root/<class>/<image> or root/train, root/val)")
    train, val = root / train_split, root / val_split
    if train.is_dir():
        return train, (val if val.is_dir() else train)
    return root, root


def folder_transforms(cfg, model, img_size: int):
    """timm's training transform with the recipe's augmentation, and its evaluation transform, for ``model``."""
    import timm.data

    data_cfg = timm.data.resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    common = dict(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"])
    if cfg.augment == "deit":
        train_tf = timm.data.create_transform(
            **common, is_training=True, auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter,
            re_prob=cfg.reprob, re_mode="pixel", re_count=1, interpolation="bicubic",
        )
    else:
        train_tf = timm.data.create_transform(**common, is_training=False, interpolation=data_cfg["interpolation"],
                                              crop_pct=data_cfg["crop_pct"])
    eval_tf = timm.data.create_transform(**common, is_training=False, interpolation=data_cfg["interpolation"],
                                         crop_pct=data_cfg["crop_pct"])
    return train_tf, eval_tf


@dataclass
class RawData:
    """The datasets found for ``cfg.data``, before any model-dependent transform (see :func:`find_data`)."""

    kind: str  # "tensors" or "folder"
    train: object
    eval: object
    classes: list
    description: str


def find_data(cfg) -> RawData:
    """Open the datasets of ``cfg.data`` and check they hold images (before any model is built)."""
    if cfg.data.lower() not in EMBEDDED_NAMES and not Path(cfg.data).expanduser().exists():
        raise DatasetError(f"--data {cfg.data!r} does not exist; expected 'fashion-mnist', 'fashion-mnist-cluttered', "
                           "'fashion-mnist-textures', a Fashion-MNIST IDX folder or an ImageFolder root "
                           "(root/<class>/<image> or root/train, root/val)")
    if _is_fashion_mnist(cfg.data):
        if cfg.augment == "deit":
            raise InvalidArgumentError("augment=deit needs an ImageFolder dataset; Fashion-MNIST takes augment=fmnist "
                                       "(crop + flip on tensors) or none")
        named = cfg.data.lower() in EMBEDDED_NAMES
        root = None if named else Path(cfg.data).expanduser()
        kind = embedded_dataset(cfg.data) if named else FashionMNIST
        train_set = kind(root, train=True, limit=cfg.limit)
        test_set = kind(root, train=False, limit=cfg.val_limit)
        if len(train_set) == 0 or len(test_set) == 0:
            raise DatasetError(f"Fashion-MNIST files in {train_set.root} hold no images")
        return RawData("tensors", train_set, test_set, list(FASHION_MNIST_CLASSES),
                       f"{kind.title} {train_set.root} ({len(train_set)} train / {len(test_set)} test images)")
    if cfg.augment == "fmnist":
        raise InvalidArgumentError(f"augment=fmnist is for Fashion-MNIST; {cfg.data!r} takes augment=deit or none")
    train_root, val_root = _folder_roots(Path(cfg.data).expanduser(), cfg.train_split, cfg.val_split)
    train_set = image_folder(train_root)
    val_set = train_set if val_root == train_root else image_folder(val_root)
    for root, dataset in ((train_root, train_set), (val_root, val_set)):
        if len(dataset) == 0:
            raise DatasetError(f"image folder {root} has no images; expected root/<class>/<image>")
    if list(val_set.classes) != list(train_set.classes):
        raise DatasetError(f"{val_root} has classes that differ from {train_root}; both need the same class folders")
    if val_set is train_set:
        import copy

        val_set = copy.copy(train_set)  # same files, its own (evaluation) transform
    return RawData("folder", train_set, val_set, list(train_set.classes),
                   f"ImageFolder {train_root} ({len(train_set)} train) / {val_root} ({len(val_set)} eval images)")


def build_data(cfg, raw: RawData, model, rank: int, world: int, batch_size: int, eval_batch: int,
               pin_memory: bool) -> DataBundle:
    """Batches of ``raw`` at the model's input size and channels, sharded for this rank."""
    from tpsvit.measure.bench import input_size

    in_chans, height, _ = input_size(model)
    img_size = int(cfg.img_size or height)
    if raw.kind == "tensors":
        xt, yt = raw.eval.tensors()
        if cfg.augment == "fmnist" and isinstance(raw.train, ClutteredFashionMNIST):
            # every batch is composed anew from the garments: the split's fixed composition is never needed
            x, y = None, raw.train.labels

            def augment(index, gen, dataset=raw.train):
                return normalize_uint8(dataset.compose(index, gen))
        else:
            x, y = raw.train.tensors()
            augment = None
            if cfg.augment == "fmnist":
                fill = -FASHION_MNIST_MEAN / FASHION_MNIST_STD  # a black pixel after normalisation

                def augment(index, gen):
                    return crop_flip(x[index], 2, gen, fill)
        train = TensorBatches(x, y, batch_size, rank, world, cfg.seed, True, augment, img_size, in_chans)
        test = TensorBatches(xt, yt, eval_batch, rank, world, cfg.seed, False, None, img_size, in_chans)
        return DataBundle(train, test, raw.classes, raw.description)
    if in_chans == 1:  # read as greyscale; crop + flip for training (timm's DeiT augmentation is for RGB)
        for dataset in (raw.train, raw.eval):
            dataset.loader = load_grey
        raw.train.transform = grey_imagefolder_transform(model, cfg.augment != "none", img_size)
        raw.eval.transform = grey_imagefolder_transform(model, False, img_size)
    elif in_chans != 3:
        raise DatasetError(f"ImageFolder {cfg.data!r} holds images but the model takes {in_chans} channels; "
                           "set model_kwargs in_chans=3 (RGB) or 1 (greyscale)")
    else:
        raw.train.transform, raw.eval.transform = folder_transforms(cfg, model, img_size)
    train_set, val_set = _spread(raw.train, cfg.limit), _spread(raw.eval, cfg.val_limit)
    repeats = cfg.aug_repeats if cfg.augment == "deit" else 1
    train = FolderBatches(train_set, batch_size, rank, world, cfg.seed, True, repeats, cfg.workers, pin_memory)
    test = FolderBatches(val_set, eval_batch, rank, world, cfg.seed, False, 1, cfg.workers, pin_memory)
    return DataBundle(train, test, raw.classes, raw.description)
