"""Schedules at equal GMACs: pick where (and how much) a method reduces tokens for a budget, on calibration images.

Beyond the papers (they fix the schedule: TPS, EViT, DynamicViT reduce at blocks 3/6/9, ToMe merges r tokens in every
block). :func:`plan` tries a few schedule families, solves each one's keep rate (ToMe: r) for the budget with the
analytic GMACs of :mod:`tpsvit.budget`, scores each by top-1 on the calibration images and returns the best. The paper's
schedule is always a candidate and wins ties, so the plan never scores below it on the calibration set.

Families (pruning methods): the paper's 3/6/9; every k-th block from block b (k = 2, 3); every block from block b.
ToMe: a constant r from block b (b = 0 is ToMe's usual schedule). Learned methods (dtps, dynamicvit) keep their trained
locations (their predictors are trained per location), so only their keep rate is solved.

Use training images for calibration, never the test split.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tpsvit.core.config import DEFAULT_LOCATIONS
from tpsvit.core.methods import get_method
from tpsvit.errors import InvalidArgumentError
from tpsvit.families import logits_of
from tpsvit.measure.budget import model_shape, schedule_gmacs, solve_keep_rate, target_gmacs

STARTS = (1, 2, 3, 4)  # first block of the "every k-th block from b" / "every block from b" families
STRIDES = (3, 2, 1)
TOME_STARTS = (0, 1, 2, 3, 4, 6)


@dataclass(frozen=True)
class Candidate:
    """One schedule tried by :func:`plan`."""

    family: str  # e.g. "blocks 3/6/9 (paper)", "every 2nd block from 1", "r from block 2"
    locations: tuple[int, ...]
    keep_rate: float | None  # the same at every location (None for ToMe's r)
    r: int | None
    gmacs: float
    top1: float  # percent, on the calibration images

    def patch_kwargs(self, method: str) -> dict:
        """Keyword arguments of :func:`tpsvit.patch` that apply this schedule."""
        if self.r is not None:
            return {"method": method, "r": self.r, "locations": self.locations}
        return {"method": method, "keep_rate": self.keep_rate, "locations": self.locations}

    def as_dict(self) -> dict:
        return {"family": self.family, "locations": list(self.locations), "keep_rate": self.keep_rate, "r": self.r,
                "gmacs": self.gmacs, "top1": self.top1}


@dataclass(frozen=True)
class Schedule:
    """The schedule :func:`plan` chose, with every candidate it scored (best first is :attr:`best`)."""

    method: str
    budget: float  # fraction of the unpatched GMACs
    target_gmacs: float
    best: Candidate
    fixed: Candidate | None  # the paper's schedule (ToMe: r in every block), None when it cannot meet the budget
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    calibration_images: int = 0

    @property
    def locations(self) -> tuple[int, ...]:
        return self.best.locations

    @property
    def keep_rate(self) -> float | None:
        return self.best.keep_rate

    @property
    def r(self) -> int | None:
        return self.best.r

    @property
    def top1(self) -> float:
        return self.best.top1

    @property
    def gmacs(self) -> float:
        return self.best.gmacs

    def patch_kwargs(self) -> dict:
        """Keyword arguments of :func:`tpsvit.patch` (after the model) that apply the chosen schedule."""
        return self.best.patch_kwargs(self.method)

    def __str__(self) -> str:
        amount = f"r={self.r}" if self.r is not None else f"keep_rate={self.keep_rate}"
        return (f"{self.method}: {self.best.family}, blocks {list(self.locations)}, {amount}, "
                f"{self.gmacs:.4g} GMACs, calibration top-1 {self.top1:.2f}% on {self.calibration_images} images")

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {"method": self.method, "budget": self.budget, "target_gmacs": self.target_gmacs,
                "chosen": self.best.as_dict(), "fixed": None if self.fixed is None else self.fixed.as_dict(),
                "candidates": [c.as_dict() for c in self.candidates], "calibration_images": self.calibration_images}


def _ordinal(k: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")


def candidate_schedules(method: str, depth: int, fixed_locations=DEFAULT_LOCATIONS) -> list[tuple[str, tuple]]:
    """(family, locations) pairs :func:`plan` tries for a ``depth``-block model; the fixed schedule first."""
    spec = get_method(method)
    if spec.reducer == "merge":
        return [(f"r from block {b}" if b else "r in every block (ToMe)", tuple(range(b, depth)))
                for b in TOME_STARTS if b < depth]
    out: list[tuple[str, tuple]] = []
    fixed = tuple(fixed_locations)
    if fixed and all(0 <= loc < depth for loc in fixed):
        label = "blocks 3/6/9 (paper)" if fixed == DEFAULT_LOCATIONS else "fixed blocks " + "/".join(map(str, fixed))
        out.append((label, fixed))
    if spec.learned:
        return out
    seen = {locs for _, locs in out}
    for k in STRIDES:
        for b in STARTS:
            locs = tuple(range(b, depth, k))
            if b < depth and locs not in seen:
                seen.add(locs)
                out.append(("every block from " + str(b) if k == 1 else f"every {_ordinal(k)}block from {b}", locs))
    return out


@contextmanager
def trial_patches(model: nn.Module, previous: dict | None):
    """Evaluate trial patches of ``model`` in eval mode inside the block; afterwards its patch ``previous`` (a
    :func:`~tpsvit.io.loading.patch_spec`, or None: unpatched) and its train/eval mode are put back."""
    from tpsvit.io.loading import apply_patch_spec
    from tpsvit.patch import unpatch

    training = model.training
    model.eval()
    try:
        yield
    finally:
        if previous is not None:
            apply_patch_spec(model, previous)
        else:
            unpatch(model)
        model.train(training)


def _calibration_batches(data, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if len(images) != len(labels) or len(images) == 0:
            raise InvalidArgumentError(f"data: {len(images)} images but {len(labels)} labels (need >= 1 of each)")
        return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if isinstance(data, Iterable):
        batches = [(images, labels) for images, labels in data]
        if not batches:
            raise InvalidArgumentError("data holds no calibration batches")
        return batches
    raise InvalidArgumentError("data must be (images, labels) tensors or an iterable of (images, labels) batches")


@torch.inference_mode()
def _top1(model: nn.Module, batches, device) -> float:
    correct = count = 0
    for images, labels in batches:
        logits = logits_of(model(images.to(device)))
        correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
        count += len(labels)
    return 100.0 * correct / count


def _solve_r(shape, target: float, locations: tuple[int, ...]) -> int | None:
    for r in range(shape.num_patches + 1):
        if schedule_gmacs(shape, "tome", r=r, locations=locations) <= target:
            return r
    return None


def plan(model: nn.Module, method: str, budget: float, data, *, batch_size: int = 256, img_size=None,
         fixed_locations=DEFAULT_LOCATIONS, options: dict | None = None) -> Schedule:
    """The best schedule of ``method`` for a GMACs ``budget`` (fraction of the unpatched model's), by calibration top-1.

    Args:
        model: a timm ViT (unpatched, or patched: its patch is restored afterwards). For dtps / dynamicvit it must be
            patched with that method (the trained predictors fix the locations).
        method: a registered method.
        budget: fraction of the unpatched GMACs in (0, 1].
        data: calibration images: ``(images, labels)`` tensors or an iterable of ``(images, labels)`` batches, from the
            training split (a few hundred to a few thousand images).
        fixed_locations: the paper's schedule, always a candidate, which wins ties.
        options: further keywords of :func:`tpsvit.patch` every candidate gets (e.g. the squeeze options); they
            enter its GMACs too. The returned schedule's ``patch_kwargs()`` leaves them out: pass them again.

    Returns a :class:`Schedule`; prints nothing. Raises InvalidArgumentError when no family meets the budget.
    """
    from tpsvit.io.loading import patch_spec
    from tpsvit.patch import is_patched, patch

    spec = get_method(method)
    shape = model_shape(model, img_size)
    target = target_gmacs(shape, budget=budget)
    previous = patch_spec(model) if is_patched(model) else None
    if previous is not None and get_method(previous["method"]).learned and previous["method"] != spec.name:
        raise InvalidArgumentError(f"this model is patched with {previous['method']}, whose trained predictors a "
                                   f"{spec.name} plan would discard; plan on the unpatched base model")
    if spec.learned:
        if previous is None or previous["method"] != spec.name:
            raise InvalidArgumentError(f"plan for {spec.name} needs a model patched with {spec.name} (its trained "
                                       "predictors); load the fine-tuned checkpoint")
        fixed_locations = tuple(previous["locations"])
    batches = _calibration_batches(data, batch_size)
    device = next(model.parameters()).device
    scored: list[Candidate] = []
    fixed: Candidate | None = None
    fixed_key = tuple(range(shape.depth)) if spec.reducer == "merge" else tuple(fixed_locations)
    with trial_patches(model, previous):
        for family, locations in candidate_schedules(spec.name, shape.depth, fixed_locations):
            rate = r = None
            if spec.reducer == "merge":
                r = _solve_r(shape, target, locations)
                if r is None:
                    continue
            else:
                try:
                    rate = solve_keep_rate(shape, spec.name, gmacs=target, locations=locations, options=options)
                except InvalidArgumentError:
                    continue  # this family cannot reach the budget
            kwargs = {"r": r} if r is not None else {"keep_rate": rate}
            gmacs = schedule_gmacs(shape, spec.name, locations=locations, options=options, **kwargs)
            patch(model, spec.name, locations=locations, **kwargs, **(options or {}))
            candidate = Candidate(family, locations, rate, r, gmacs, _top1(model, batches, device))
            scored.append(candidate)
            if locations == fixed_key:
                fixed = candidate
    if not scored:
        raise InvalidArgumentError(f"no schedule of {spec.name} meets {budget:.0%} of the unpatched GMACs "
                                   f"({target:.4g} GMACs); raise the budget")
    best = fixed if fixed is not None else scored[0]
    for candidate in scored:
        if candidate.top1 > best.top1:  # strictly better: ties keep the paper's schedule (or the earlier family)
            best = candidate
    count = sum(len(labels) for _, labels in batches)
    return Schedule(spec.name, float(budget), target, best, fixed, tuple(scored), count)
