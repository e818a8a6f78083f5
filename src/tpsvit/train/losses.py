"""The fine-tuning losses of the paper: classification, logit and token distillation, keep ratio.

Token distillation uses the mean squared error between the student's final kept patch tokens and the teacher's tokens
at the same grid positions, as the authors' release does (paper.md says "KL"; features are not distributions, and the
release computes an MSE). Every term is returned separately so it can be logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn


def classification_loss(mixup_active: bool, smoothing: float) -> nn.Module:
    """Soft-target CE for mixup/cutmix targets (smoothing is then inside the targets), else label-smoothing CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) on the class distributions, averaged over the batch (0 for identical logits)."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
        reduction="batchmean", log_target=True,
    )


def token_distillation(student_tokens: Tensor, teacher_tokens: Tensor, *, policy: Tensor | None = None,
                       positions: Tensor | None = None) -> Tensor:
    """MSE between the student's kept patch tokens and the teacher's patch tokens at the same grid positions.

    Args:
        student_tokens: (B, N_s, C) final patch tokens of the student (prefix tokens removed).
        teacher_tokens: (B, N, C) final patch tokens of the unpruned teacher.
        policy: masked path: (B, N) keep mask of the student's full-length sequence (patch tokens only).
        positions: gather path: (B, N_s) original grid index of each student token (-1: not a grid token, skipped).
        With neither, the student is unpruned and every token is compared.
    """
    student_tokens, teacher_tokens = student_tokens.float(), teacher_tokens.float()
    if policy is not None:
        # The mask only selects tokens: a gradient through it would teach the predictor to keep the tokens that are
        # easiest to match (background), not the ones that matter.
        keep = policy.detach().to(student_tokens.dtype).unsqueeze(-1)
        diff = (student_tokens - teacher_tokens).pow(2) * keep
        return diff.sum() / (keep.sum() * student_tokens.shape[-1]).clamp_min(1.0)
    if positions is not None:
        valid = (positions >= 0).unsqueeze(-1).to(student_tokens.dtype)
        index = positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1])
        target = teacher_tokens.gather(1, index)
        diff = (student_tokens - target).pow(2) * valid
        return diff.sum() / (valid.sum() * student_tokens.shape[-1]).clamp_min(1.0)
    return F.mse_loss(student_tokens, teacher_tokens)


def keep_ratio_loss(decisions: list[Tensor], keep_rates) -> Tensor:
    """DynamicViT / dTPS keep-ratio loss.

    For each location i, the squared difference between each image's mean keep decision (fraction of the original
    patch tokens still kept) and the target cumulative ratio ``prod(keep_rates[:i + 1])``, averaged over the images,
    then over the locations.
    """
    if not decisions:
        raise ValueError("keep_ratio_loss needs the keep decisions of at least one location")
    if len(decisions) != len(keep_rates):
        raise ValueError(f"{len(decisions)} decision masks but {len(keep_rates)} keep rates")
    total, target = 0.0, 1.0
    for keep, rate in zip(decisions, keep_rates, strict=True):
        target *= float(rate)
        total = total + (keep.float().mean(dim=1) - target).pow(2).mean()
    return total / len(decisions)


def split_tokens(features: Tensor, num_prefix_tokens: int) -> Tensor:
    """Patch tokens of a (B, N_tokens, C) feature map (prefix tokens removed)."""
    return features[:, num_prefix_tokens:]


@torch.no_grad()
def accuracy(logits: Tensor, target: Tensor, topk=(1, 5)) -> list[int]:
    """Number of correct predictions in the top-k for each k (k capped at the number of classes)."""
    maxk = min(max(topk), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred.eq(target.unsqueeze(-1))
    return [int(hit[:, : min(k, maxk)].any(dim=-1).sum()) for k in topk]
