"""Synthetic Fashion-MNIST IDX files for tests (the standard big-endian uint8 IDX format, plain or gzipped)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An array as IDX bytes: magic (0, 0, 0x08 = uint8, ndim), big-endian dimensions, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.asarray(array).astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write an IDX file, gzipped when the name ends in .gz."""
    payload = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 320, n_test: int = 100, seed: int = 0, gz: bool = False) -> Path:
    """The four Fashion-MNIST files of an easy task: class c is noise around brightness 20 c (flip/crop-proof)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + 20 * labels[:, None, None]
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder
