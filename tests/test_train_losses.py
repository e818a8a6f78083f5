"""The training losses on hand-made inputs, the lr schedule, and the batched augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from tpsvit.train.data_loading import crop_flip, epoch_order, generator, shard
from tpsvit.train.engine import lr_factor
from tpsvit.train.losses import (
    accuracy,
    attention_ranking_loss,
    classification_loss,
    keep_ratio_loss,
    logit_distillation,
    ranking_target_logits,
    token_distillation,
)


def test_keep_ratio_loss_value():
    # location 1 keeps 3 of 4 and 1 of 4 tokens (means 0.75, 0.25), target 0.5: ((0.25)^2 + (0.25)^2) / 2 = 0.0625
    # location 2 keeps 1 of 4 and 0 of 4 (0.25, 0.0), target 0.5 * 0.5 = 0.25: (0 + 0.0625) / 2 = 0.03125
    first = torch.tensor([[1.0, 1, 1, 0], [0, 1, 0, 0]])
    second = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    loss = keep_ratio_loss([first, second], (0.5, 0.5))
    assert loss.item() == pytest.approx((0.0625 + 0.03125) / 2)


def test_keep_ratio_loss_zero_on_target_and_has_gradient():
    keep = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0]], requires_grad=True)
    assert keep_ratio_loss([keep], [0.5]).item() == 0.0
    loss = keep_ratio_loss([keep], [0.25])
    loss.backward()
    assert loss.item() == pytest.approx(0.0625)
    assert keep.grad.abs().sum() > 0


def test_keep_ratio_loss_rejects_mismatch():
    with pytest.raises(ValueError, match="keep rates"):
        keep_ratio_loss([torch.ones(2, 4)], [0.5, 0.5])


def test_logit_distillation_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(5, 10)
    assert logit_distillation(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_distillation(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    other = torch.randn(5, 10)
    p_t = other.softmax(-1)
    expected = (p_t * (p_t.log() - logits.log_softmax(-1))).sum(-1).mean()
    assert logit_distillation(logits, other).item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_distillation_masked_path_ignores_dropped_tokens():
    teacher = torch.zeros(1, 3, 2)
    student = torch.tensor([[[1.0, 1.0], [100.0, 100.0], [3.0, 3.0]]])
    policy = torch.tensor([[1.0, 0.0, 1.0]])  # token 1 was dropped: its huge error must not count
    assert token_distillation(student, teacher, policy=policy, kind="mse").item() == pytest.approx((1 + 1 + 9 + 9) / 4)


def test_token_distillation_kl_is_the_releases_channel_softmax_kl():
    """The release: F.kl_div(log_softmax(student), log_softmax(teacher), batchmean, log_target) over kept tokens."""
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]])
    kept = policy.bool()
    s, t = student[kept].log_softmax(-1), teacher[kept].log_softmax(-1)  # (kept tokens, C)
    expected = (t.exp() * (t - s)).sum() / kept.sum()  # batchmean over the kept rows
    assert token_distillation(student, teacher, policy=policy).item() == pytest.approx(expected.item(), rel=1e-5)
    assert token_distillation(teacher, teacher, policy=policy).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="kind 'l1'"):
        token_distillation(student, teacher, kind="l1")


def test_attention_ranking_loss_is_zero_when_the_predictor_ranks_as_attention_and_trains_it():
    attention = torch.tensor([[0.5, 0.3, 0.0, 0.2]])
    alive = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    dead = alive <= 0
    target = ranking_target_logits(attention, dead)  # standardised log-attention over the alive tokens
    z = attention[0, [0, 1, 3]].log()
    assert torch.allclose(target[0, [0, 1, 3]], (z - z.mean()) / z.std(unbiased=False), atol=1e-5)
    assert target[0, 2] == float("-inf")
    log_probs = torch.stack([target.masked_fill(dead, 0.0), torch.zeros_like(target)], dim=-1)
    assert attention_ranking_loss([(log_probs, attention, alive)]).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 4, 2, requires_grad=True)
    loss = attention_ranking_loss([(flat, attention, alive)])
    p = target[0, [0, 1, 3]].softmax(0)
    assert loss.item() == pytest.approx((p * (p * 3).log()).sum().item(), rel=1e-5)  # KL(p || uniform of 3)
    grad = torch.autograd.grad(loss, flat)[0][0, :, 0]
    assert grad[0] < 0 < grad[3] and grad[2] == 0  # raise the most attended token, lower the least; dead: nothing


def test_token_distillation_gives_the_keep_mask_no_gradient():
    """The mask selects tokens; a gradient through it would teach predictors to keep easy (background) tokens."""
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss = token_distillation(student, teacher, policy=policy)
    assert not loss.requires_grad or torch.autograd.grad(loss, policy, allow_unused=True)[0] is None


def test_token_distillation_gather_path_uses_positions():
    teacher = torch.arange(8.0).reshape(1, 4, 2)  # token i = (2i, 2i+1)
    student = torch.tensor([[[6.0, 7.0], [0.0, 1.0], [50.0, 50.0]]])  # grid tokens 3 and 0, then a fused token
    positions = torch.tensor([[3, 0, -1]])
    assert token_distillation(student, teacher, positions=positions, kind="mse").item() == 0.0
    student[0, 1] += 2.0
    assert token_distillation(student, teacher, positions=positions, kind="mse").item() == pytest.approx(2 * 4 / 4)


def test_classification_loss_kinds():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    plain = classification_loss(False, 0.0)(logits, target)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())
    smooth = classification_loss(False, 0.1)(logits, target)
    expected = 0.9 * plain + 0.1 * (-logits.log_softmax(-1).mean(-1)).mean()
    assert smooth.item() == pytest.approx(expected.item(), rel=1e-5)
    soft = torch.nn.functional.one_hot(target, 3).float()
    assert classification_loss(True, 0.1)(logits, soft).item() == pytest.approx(plain.item(), rel=1e-5)


def test_accuracy_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert accuracy(logits, torch.tensor([1, 2, 0]), topk=(1, 2)) == [1, 2]


def test_lr_schedule_warmup_then_cosine():
    args = dict(total=100, warmup=10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_factor(0, **args) == pytest.approx(1e-3)  # starts at warmup_lr
    assert lr_factor(10, **args) == pytest.approx(1.0)
    assert lr_factor(55, **args) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, **args) == pytest.approx(0.01)
    values = [lr_factor(s, **args) for s in range(101)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))
    assert not any(math.isnan(v) for v in values)


def test_crop_flip_is_seeded_and_keeps_content():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    a = crop_flip(images, 2, generator(0, 1, 2, 0), fill=-1.0)
    b = crop_flip(images, 2, generator(0, 1, 2, 0), fill=-1.0)
    assert torch.equal(a, b) and a.shape == images.shape
    for i in range(2):  # every pixel comes from the image itself or the fill
        assert set(a[i].unique().tolist()) <= set(images[i].unique().tolist()) | {-1.0}
    many = crop_flip(images.repeat(50, 1, 1, 1), 2, generator(1))
    assert not torch.equal(many[0], many[2]) or not torch.equal(many[0], many[4])  # offsets vary


def test_shards_are_disjoint_and_cover_the_epoch():
    order = epoch_order(10, seed=3, epoch=1)
    assert torch.equal(order, epoch_order(10, seed=3, epoch=1))
    assert not torch.equal(order, epoch_order(10, seed=3, epoch=2))
    a, b = shard(order, 0, 2), shard(order, 1, 2)
    assert len(a) == len(b) == 5 and set(a.tolist()) | set(b.tolist()) == set(range(10))
    ra, rb = shard(order, 0, 2, repeats=3), shard(order, 1, 2, repeats=3)
    assert len(ra) == 5 and ra[0] == rb[0] == order[0]  # repeated augmentation: one image on both ranks


def test_accuracy_on_half_precision_logits_ranks_in_float32():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen).to(torch.bfloat16)
    target = torch.randint(0, 10, (64,), generator=gen)
    assert accuracy(logits, target) == accuracy(logits.float(), target)
    assert accuracy(logits.half(), target, topk=(1, 3)) == accuracy(logits.half().float(), target, topk=(1, 3))
