"""The segmentation testbed: pixel labels from the same generator as the cluttered classifier's images."""

from __future__ import annotations

import pytest
import torch
from fmnist_files import write_fashion_mnist

import tpsvit.data.datasets
from tpsvit.data.cluttered import TEST_SEED, ClutterSpec, compose_fixed, compose_fixed_layers
from tpsvit.data.datasets import ClutteredFashionMNIST, normalize_uint8
from tpsvit.data.segmentation import GARMENT_THRESHOLD, confusion, miou, segmentation_split


@pytest.fixture
def system_files(tmp_path, monkeypatch):
    folder = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=40)
    monkeypatch.setattr(tpsvit.data.datasets, "SYSTEM_DIR", folder)
    return folder


def test_layers_are_the_same_draws_as_the_classifier_images():
    torch.manual_seed(0)
    garments = (torch.rand(50, 28, 28) * 255).to(torch.uint8)
    spec = ClutterSpec()
    canvases, alone = compose_fixed_layers(garments, TEST_SEED, spec, chunk=16)
    assert torch.equal(canvases, compose_fixed(garments, TEST_SEED, spec, chunk=16))
    assert (canvases >= alone).all()  # max-combined: clutter never darkens the garment
    assert [int(a.sum()) for a in alone] == [int(g.int().sum()) for g in garments]  # each garment pasted whole


def test_labels_mark_the_garment_with_its_class_and_clutter_as_background(system_files):
    images, pixels, labels = segmentation_split(False)
    reference = ClutteredFashionMNIST(train=False)
    assert torch.equal(images, normalize_uint8(reference.images)) and torch.equal(labels, reference.labels)
    assert pixels.shape == (40, 56, 56) and pixels.dtype == torch.long
    for pix, label in zip(pixels, labels, strict=True):
        assert set(pix.unique().tolist()) <= {0, int(label) + 1}
    canvases = reference.images
    _, alone = compose_fixed_layers(reference._all_garments, TEST_SEED, ClutterSpec())
    clutter_only = (canvases > GARMENT_THRESHOLD) & (alone <= GARMENT_THRESHOLD)
    assert clutter_only.any() and (pixels[clutter_only] == 0).all()
    again = segmentation_split(False)[1]
    assert torch.equal(again, pixels)  # deterministic


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    counts = confusion(pred, target, classes=3)
    assert counts.sum() == 8 and counts[0, 1] == 1 and counts[2, 0] == 1
    m, acc = miou(counts)
    # IoU: class 0: 2 / (3 + 3 - 2) = 0.5; class 1: 2 / (3 + 2 - 2) = 2/3; class 2: 2 / (2 + 3 - 2) = 2/3
    assert m == pytest.approx(100 * (0.5 + 2 / 3 + 2 / 3) / 3) and acc == pytest.approx(75.0)
