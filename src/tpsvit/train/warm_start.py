"""Predictor warm start (beyond the paper): distil the class-attention ranking into the dtps/dynamicvit predictors.

A freshly initialised predictor scores every token about the same, and top-k on flat scores drops one kind of token
consistently; short fine-tunes do not get it out of there. Before fine-tuning, each predictor is trained alone (the
backbone frozen) to rank the alive tokens as the class token of its own block attends to them (the unpruned starting
model's ranking, on the tokens that reach the block), with the inference-time top-k decisions in the forward pass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

import tpsvit
from tpsvit.patch import PREDICTORS, set_predictor_training
from tpsvit.train.losses import attention_ranking_loss


def warm_start_predictors(model: nn.Module, batches: Iterable, steps: int, lr: float,
                          device: torch.device | str = "cpu", progress: bool = True) -> list[float]:
    """Train the predictors of a patched dtps/dynamicvit ``model`` by class-attention distillation for ``steps``
    AdamW steps on ``batches`` (an iterable of (images, labels), cycled); returns the loss of every step.

    The rest of the model is frozen meanwhile and its ``requires_grad`` flags restored afterwards.
    """
    if not tpsvit.is_patched(model) or not model.tps.spec.learned:
        raise ValueError("the warm start needs a model patched with a learned predictor (dtps or dynamicvit)")
    predictors = getattr(model, PREDICTORS)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in predictors.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(predictors.parameters(), lr=lr, weight_decay=0.0)
    set_predictor_training(model, "topk", record_class_attention=True)
    model.train()
    losses: list[float] = []
    bar = _progress(steps, progress)
    try:
        iterator = iter(batches)
        while len(losses) < steps:
            try:
                images, _ = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                continue
            model(images.to(device))
            loss = attention_ranking_loss(tpsvit.forward_state(model).ranking)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        set_predictor_training(model, "gumbel", record_class_attention=False)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


def _progress(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc="predictor warm start", file=sys.stderr, leave=False)
