"""``task: segment``: the training engine's machinery on the segmentation testbed (:mod:`tpsvit.data.segmentation`).

The model is a :class:`tpsvit.dense.Segmenter`: the (patched) backbone, ``tpsvit.restore(mode=restore)`` back to the
full patch grid, a ``seg_head`` (linear | conv) and bilinear upsampling to the canvas. The data are the split's
fixed composition (the training split's fixed training view, the test split's benchmark) with per-pixel labels in
0..10 (background + 10 garments), unaugmented. The loss is per-pixel cross-entropy (label smoothing from
``smoothing``); no distillation (refused in the config). Evaluation: mIoU over the 11 classes and pixel accuracy on
the test split (``test_miou``, ``test_pixel_acc``, ``test_loss`` per pixel), and the GMACs of backbone + head.

Learned methods (dtps, dynamicvit) run on their inference (gather) path in training too, their predictors frozen:
the masked training path removes no token, so nothing could be restored (see :class:`~tpsvit.dense.Segmenter`).
``freeze_backbone``: only the head trains (setting (a) of the dense-prediction benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpsvit.data.segmentation import SEG_CLASSES, confusion, miou, segmentation_split
from tpsvit.dense import Segmenter, make_head
from tpsvit.errors import InvalidArgumentError
from tpsvit.families import family_of
from tpsvit.measure.bench import input_size
from tpsvit.train import distributed
from tpsvit.train.data_loading import DataBundle, RawData, TensorBatches


class SegmentNet(nn.Module):
    """The segmenter as the training step (and DDP) sees it: returns (per-pixel logits, None), like the classifier
    wrapper's (logits, features)."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x):
        return self.segmenter(x), None


def build_segmenter(cfg, backbone: nn.Module) -> Segmenter:
    """A new ``cfg.seg_head`` on ``backbone``'s features, for the 11 segmentation classes."""
    head = make_head(cfg.seg_head, family_of(backbone).embed_dim(backbone), len(SEG_CLASSES))
    return Segmenter(backbone, head, restore=cfg.restore, freeze_backbone=cfg.freeze_backbone)


def segment_data(cfg, raw: RawData, model: nn.Module, rank: int, world: int, batch_size: int,
                 eval_batch: int) -> DataBundle:
    """Images and pixel labels of both splits of the cluttered testbed ``raw``, as the engine's batch sources."""
    spec = raw.train.spec
    in_chans, height, width = input_size(model)
    size = int(cfg.img_size or height)
    if size != spec.canvas or width != height:
        raise InvalidArgumentError(f"task=segment predicts the pixels of the {spec.canvas}x{spec.canvas} canvas; the "
                                   f"model takes {size}x{width} images (model / img_size)")
    x, pixels, _ = segmentation_split(True, raw.train.root, cfg.limit, spec)
    xt, pixels_t, _ = segmentation_split(False, raw.eval.root, cfg.val_limit, spec)
    train = TensorBatches(x, pixels, batch_size, rank, world, cfg.seed, True, None, size, in_chans)
    test = TensorBatches(xt, pixels_t, eval_batch, rank, world, cfg.seed, False, None, size, in_chans)
    return DataBundle(train, test, list(SEG_CLASSES), f"pixel labels of {raw.description}")


def pixel_loss(smoothing: float) -> nn.Module:
    """Per-pixel cross-entropy on (B, classes, H, W) logits and (B, H, W) labels."""
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


@torch.no_grad()
def evaluate_segmenter(segmenter: Segmenter, batches, info, autocast, img_size: int) -> dict:
    """mIoU and pixel accuracy (percent) over the 11 classes, mean per-pixel loss, and GMACs, on ``batches``
    (sharded over ranks: the confusion counts are summed)."""
    was_training = segmenter.training
    segmenter.eval()
    classes = len(SEG_CLASSES)
    counts = torch.zeros(classes, classes, dtype=torch.float64)
    loss = 0.0
    for x, y in batches:
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with autocast():
            logits = segmenter(x)
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        counts += confusion(logits.argmax(1), y, classes).cpu().double()
    total = distributed.all_reduce_sum([*counts.flatten().tolist(), loss], info)
    counts = torch.tensor(total[:-1], dtype=torch.float64).view(classes, classes)
    gmacs = segmenter.gmacs(img_size)
    segmenter.train(was_training)
    m, accuracy = miou(counts)
    return {"test_miou": m, "test_pixel_acc": accuracy, "test_loss": total[-1] / max(1.0, float(counts.sum())),
            "gmacs": gmacs}


def head_groups(head: nn.Module, lr: float, weight_decay: float, skip_1d: bool = False) -> list[dict]:
    """AdamW groups of the dense head at ``lr`` (the backbone's groups come from :func:`~tpsvit.train.modeling.
    param_groups`); ``skip_1d``: no decay on its biases, as there."""
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for p in params if not skip_1d or p.ndim > 1]
    rest = [p for p in params if skip_1d and p.ndim <= 1]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "head"}]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": "head_no_decay"})
    return groups
