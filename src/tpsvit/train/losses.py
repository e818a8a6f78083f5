"""The fine-tuning losses of the paper: classification, logit and token distillation, keep ratio.

Token distillation compares the student's final kept patch tokens with the teacher's tokens at the same grid positions
by a KL divergence over the channel softmax (each token's features through a softmax), averaged over the kept tokens,
as the authors' release does by default; its MSE variant is an option (``kind="mse"``). Beyond the paper,
:func:`attention_ranking_loss` distils the teacher's class-attention ranking into the learned predictors. Every term is
returned separately so it can be logged.
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


TOKEN_DISTILL_KINDS = ("kl", "mse")


def _token_divergence(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per-token divergence (..., C) -> (...): KL(teacher || student) over the channel softmax, or the channel MSE."""
    if kind == "kl":
        return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none",
                        log_target=True).sum(dim=-1)
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    raise ValueError(f"token distillation kind {kind!r}; allowed: {', '.join(TOKEN_DISTILL_KINDS)}")


def token_distillation(student_tokens: Tensor, teacher_tokens: Tensor, *, policy: Tensor | None = None,
                       positions: Tensor | None = None, kind: str = "kl") -> Tensor:
    """Divergence between the student's kept patch tokens and the teacher's patch tokens at the same grid positions,
    averaged over the kept tokens: ``kind="kl"`` (the release: KL over the channel softmax) or ``"mse"``.

    Args:
        student_tokens: (B, N_s, C) final patch tokens of the student (prefix tokens removed).
        teacher_tokens: (B, N, C) final patch tokens of the unpruned teacher.
        policy: masked path: (B, N) keep mask of the student's full-length sequence (patch tokens only; tokens
            appended after the grid, the similarity floor's fused ones, are skipped).
        positions: gather path: (B, N_s) original grid index of each student token (-1: not a grid token, skipped).
        With neither, the student is unpruned and every token is compared.
    """
    student_tokens, teacher_tokens = student_tokens.float(), teacher_tokens.float()
    if policy is not None:
        # The mask only selects tokens: a gradient through it would teach the predictor to keep the tokens that are
        # easiest to match (background), not the ones that matter.
        grid = teacher_tokens.shape[1]
        student_tokens, policy = student_tokens[:, :grid], policy[:, :grid]
        weight = policy.detach().to(student_tokens.dtype)
        target = teacher_tokens
    elif positions is not None:
        weight = (positions >= 0).to(student_tokens.dtype)
        index = positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1])
        target = teacher_tokens.gather(1, index)
    else:
        weight = student_tokens.new_ones(student_tokens.shape[:2])
        target = teacher_tokens
    per_token = _token_divergence(student_tokens, target, kind)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


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


def attention_ranking_loss(ranking: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Class-attention distillation into the learned predictors (beyond the paper; listwise, ListNet-style).

    For each location: (keep log-probs (B, N, 2), class attention (B, N), alive mask (B, N)). Over the alive tokens of
    each image, the predictor's keep logit (log p_keep - log p_drop) goes through a softmax and is matched to a target
    distribution that keeps the attention's ranking whatever its sharpness: the softmax of the standardised
    log-attention (zero mean, unit deviation over the alive tokens). KL(target || predictor), averaged over images,
    then locations. Only the predictor gets a gradient.
    """
    if not ranking:
        raise ValueError("attention_ranking_loss needs at least one location (a dtps/dynamicvit model on the "
                         "masked path with record_class_attention)")
    total = 0.0
    for log_probs, attention, alive in ranking:
        dead = alive.detach() <= 0
        logit = (log_probs[..., 0] - log_probs[..., 1]).float().masked_fill(dead, float("-inf"))
        log_target = F.log_softmax(ranking_target_logits(attention.detach(), dead), dim=1)
        log_student = F.log_softmax(logit, dim=1)
        kl = (log_target.exp() * (log_target - log_student)).masked_fill(dead, 0.0)
        total = total + kl.sum(dim=1).mean()
    return total / len(ranking)


def ranking_target_logits(attention: Tensor, dead: Tensor) -> Tensor:
    """Standardised log-attention over the alive tokens (-inf on dead ones): the ranking loss's target logits."""
    alive = (~dead).float()
    count = alive.sum(dim=1, keepdim=True).clamp_min(1.0)
    log_att = attention.float().clamp_min(1e-12).log() * alive
    mean = log_att.sum(dim=1, keepdim=True) / count
    std = (((log_att - mean) * alive).pow(2).sum(dim=1, keepdim=True) / count).sqrt().clamp_min(1e-6)
    return ((log_att - mean) / std).masked_fill(dead, float("-inf"))


def split_tokens(features: Tensor, num_prefix_tokens: int) -> Tensor:
    """Patch tokens of a (B, N_tokens, C) feature map (prefix tokens removed)."""
    return features[:, num_prefix_tokens:]


@torch.no_grad()
def accuracy(logits: Tensor, target: Tensor, topk=(1, 5)) -> list[int]:
    """Number of correct predictions in the top-k for each k (k capped at the number of classes).

    Ranked in float32: bf16/fp16 logits from autocast tie often, and their ties would decide the top-k.
    """
    maxk = min(max(topk), logits.shape[-1])
    pred = logits.float().topk(maxk, dim=-1).indices
    hit = pred.eq(target.unsqueeze(-1))
    return [int(hit[:, : min(k, maxk)].any(dim=-1).sum()) for k in topk]
