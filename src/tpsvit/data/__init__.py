"""Datasets by name: Fashion-MNIST (IDX files), its cluttered canvases (:mod:`.cluttered`, :mod:`.textures`) and
ImageFolder trees.

The names below are those the old ``tpsvit.data`` module had; the code is in :mod:`tpsvit.data.datasets`.
"""

from tpsvit.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ClutteredFashionMNIST,
    FashionMNIST,
    TexturedFashionMNIST,
    build_dataset,
    embedded_dataset,
    find_fashion_mnist,
    image_folder,
)

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "ClutteredFashionMNIST", "FashionMNIST",
    "TexturedFashionMNIST", "build_dataset", "embedded_dataset", "find_fashion_mnist", "image_folder",
]
