"""Choose the squeeze options (beyond the paper) on calibration images, at equal GMACs.

:func:`calibrate` patches a model with a squeezing method (etps, or dtps with trained predictors) at a GMACs budget
for every combination of the option values it is given (``squeeze_floor``, ``squeeze_floor_action``,
``squeeze_weighting``, ``temperature``; see :func:`tpsvit.patch`), solves each combination's keep rate for the budget
at the same locations (the floor's fused token costs tokens, so it gets a lower rate), scores each by top-1 on the
calibration images and returns them all with the best. The paper's squeeze (every option at its default) is always
a candidate and wins ties; among other tied candidates the one that changes fewer options wins.

Use training images for calibration, never the test split.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import nn

from tpsvit.core.config import DEFAULT_LOCATIONS, FLOOR_ACTIONS, SQUEEZE_WEIGHTINGS
from tpsvit.core.methods import get_method
from tpsvit.errors import InvalidArgumentError
from tpsvit.measure.budget import model_shape, schedule_gmacs, solve_keep_rate, target_gmacs
from tpsvit.measure.plan import _calibration_batches, _top1, trial_patches

# option -> its paper value; the order in which a grid's columns are printed
PAPER = {"squeeze_floor": None, "squeeze_floor_action": "drop", "squeeze_weighting": "similarity", "temperature": 1.0}


@dataclass(frozen=True)
class Trial:
    """One combination of option values scored by :func:`calibrate`."""

    options: dict  # only the options that differ from the paper's values
    keep_rate: float
    gmacs: float
    top1: float  # percent, on the calibration images

    def as_dict(self) -> dict:
        return {"options": dict(self.options), "keep_rate": self.keep_rate, "gmacs": self.gmacs, "top1": self.top1}


@dataclass(frozen=True)
class Calibration:
    """Every trial of :func:`calibrate`, the paper's squeeze among them, and the best."""

    method: str
    budget: float
    target_gmacs: float
    locations: tuple[int, ...]
    best: Trial
    paper: Trial
    trials: tuple[Trial, ...] = field(default_factory=tuple)
    calibration_images: int = 0

    def best_single(self, option: str) -> Trial:
        """The best trial that changes only ``option`` (the floor's action counts with the floor), else the paper."""
        def alone(trial: Trial) -> bool:
            keys = set(trial.options) - ({"squeeze_floor_action"} if option == "squeeze_floor" else set())
            return keys == {option}

        return max([self.paper, *[t for t in self.trials if alone(t)]], key=lambda t: t.top1)

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {"method": self.method, "budget": self.budget, "target_gmacs": self.target_gmacs,
                "locations": list(self.locations), "calibration_images": self.calibration_images,
                "paper": self.paper.as_dict(), "best": self.best.as_dict(),
                "best_single": {k: self.best_single(k).as_dict() for k in PAPER if k != "squeeze_floor_action"},
                "trials": [t.as_dict() for t in self.trials]}


def option_grid(values: dict) -> list[dict]:
    """Every valid combination of ``values`` (option -> list of values), each as the options that differ from the
    paper's; the paper's own combination ({}) first. A floor action without a floor is skipped (it does nothing)."""
    unknown = [k for k in values if k not in PAPER]
    if unknown:
        raise InvalidArgumentError(f"unknown squeeze option {unknown[0]!r}; allowed: {', '.join(PAPER)}")
    for key, choices in values.items():
        if not choices:
            raise InvalidArgumentError(f"option {key!r} has no values to try")
    keys = list(values)
    combos, seen = [{}], [{}]
    for picked in itertools.product(*(values[k] for k in keys)):
        combo = {k: v for k, v in zip(keys, picked, strict=True) if v != PAPER[k]}
        if combo.get("squeeze_floor") is None and "squeeze_floor_action" in combo:
            continue
        if combo not in seen:
            seen.append(combo)
            combos.append(combo)
    return combos


def parse_option(text: str) -> tuple[str, list]:
    """``KEY=V1,V2,...`` -> (key, values), values typed: the floor a number or ``none``/``off``, the temperature a
    number > 0, the action and the weighting one of their names."""
    key, sep, raw = str(text).partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not raw.strip():
        raise InvalidArgumentError(f"--option {text!r} is not KEY=V1,V2,...; e.g. squeeze_floor=none,0,0.2,0.4")
    if key not in PAPER:
        raise InvalidArgumentError(f"unknown squeeze option {key!r}; allowed: {', '.join(PAPER)}")
    out = []
    for item in (v.strip() for v in raw.split(",")):
        if key in ("squeeze_floor", "temperature"):
            if key == "squeeze_floor" and item.lower() in ("none", "off"):
                out.append(None)
                continue
            try:
                out.append(float(item))
            except ValueError:
                raise InvalidArgumentError(f"--option {key}: {item!r} is not a number") from None
        else:
            allowed = FLOOR_ACTIONS if key == "squeeze_floor_action" else SQUEEZE_WEIGHTINGS
            if item not in allowed:
                raise InvalidArgumentError(f"--option {key}: {item!r}; allowed: {', '.join(allowed)}")
            out.append(item)
    return key, out


def calibrate(model: nn.Module, method: str, budget: float, data, values: dict, *,
              locations=DEFAULT_LOCATIONS, batch_size: int = 256, img_size=None) -> Calibration:
    """Score every combination of squeeze option ``values`` (option -> list) for ``method`` at a GMACs ``budget``.

    Args:
        model: the base model (unpatched) for etps; for dtps a model patched with dtps (its trained predictors fix
            the locations). Its patch is restored afterwards.
        method: ``"etps"`` or ``"dtps"``.
        budget: fraction of the unpatched GMACs in (0, 1]; each combination's keep rate is solved for it.
        data: calibration images, ``(images, labels)`` tensors or an iterable of batches, from the training split.
        values: e.g. ``{"squeeze_floor": [None, 0.2, 0.4], "squeeze_floor_action": ["drop", "fuse"]}``.
        locations: where the keep rate is solved (etps; dtps keeps its trained locations).

    Returns a :class:`Calibration`; prints nothing.
    """
    from tpsvit.io.loading import patch_spec
    from tpsvit.patch import is_patched, patch

    spec = get_method(method)
    if spec.reducer != "squeeze":
        raise InvalidArgumentError(f"the squeeze options are for etps and dtps; {spec.name!r} squeezes nothing")
    previous = patch_spec(model) if is_patched(model) else None
    if spec.learned:
        if previous is None or previous["method"] != spec.name:
            raise InvalidArgumentError(f"calibrating {spec.name} needs a model patched with {spec.name} (its trained "
                                       "predictors); load the fine-tuned checkpoint")
        locations = tuple(previous["locations"])
    locations = tuple(locations)
    shape = model_shape(model, img_size)
    target = target_gmacs(shape, budget=budget)
    batches = _calibration_batches(data, batch_size)
    device = next(model.parameters()).device
    trials: list[Trial] = []
    with trial_patches(model, previous):
        for options in option_grid(values):
            rate = solve_keep_rate(shape, spec.name, gmacs=target, locations=locations, options=options)
            gmacs = schedule_gmacs(shape, spec.name, rate, locations, options=options)
            patch(model, spec.name, keep_rate=rate, locations=locations, **options)
            trials.append(Trial(options, rate, gmacs, _top1(model, batches, device)))
    paper = trials[0]
    best = paper
    for trial in trials[1:]:  # strictly better wins; ties keep the paper's, then the one changing fewer options
        if trial.top1 > best.top1 or (trial.top1 == best.top1 and best is not paper
                                      and len(trial.options) < len(best.options)):
            best = trial
    count = sum(len(labels) for _, labels in batches)
    return Calibration(spec.name, float(budget), target, locations, best, paper, tuple(trials), count)
