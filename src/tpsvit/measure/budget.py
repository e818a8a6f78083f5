"""Equal-cost comparisons: solve the keep rate (or ToMe's r) that meets a GMACs budget, from the analytic model.

A budget is either a fraction of the unpatched model's GMACs (``budget=0.35``: the paper's "35% budget") or an
absolute ``gmacs=1.6``. Nothing is run: the schedules are costed with :mod:`tpsvit.flops` from the config alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tpsvit.core.config import DEFAULT_LOCATIONS, make_config
from tpsvit.core.methods import get_method
from tpsvit.errors import InvalidArgumentError
from tpsvit.measure.flops import ViTShape, total_macs, vit_shape

_MIN_RATE = 1e-9  # keeps exactly one patch token at every location


def model_shape(model, img_size=None) -> ViTShape:
    """A :class:`~tpsvit.flops.ViTShape` from a model, a timm model name (built on the meta device) or a shape."""
    if isinstance(model, ViTShape):
        if img_size is not None:
            raise InvalidArgumentError("img_size cannot be changed on a ViTShape; pass the model or its name")
        return model
    if isinstance(model, str):
        from tpsvit.io.loading import create_model

        with torch.device("meta"):
            model = create_model(model)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"expected a timm ViT, its name or a ViTShape, got {type(model).__name__}")
    return vit_shape(model, img_size)


def schedule_gmacs(model, method: str | None = None, keep_rate=1.0, locations=DEFAULT_LOCATIONS, r=None,
                   img_size=None, options: dict | None = None) -> float:
    """Analytic GMACs of ``model`` (model, timm name or ViTShape) under a patch, without patching anything.

    ``method=None`` gives the unpatched cost. Arguments are those of :func:`tpsvit.patch`; ``options`` holds its
    other keywords (``squeeze_floor_action="fuse"`` adds a token per location, for example).
    """
    shape = model_shape(model, img_size)
    if method is None:
        return total_macs(shape) / 1e9
    config = make_config(method, shape.depth, shape.num_prefix_tokens, keep_rate, locations, r, **(options or {}))
    return total_macs(shape, config) / 1e9


def target_gmacs(model, budget: float | None = None, gmacs: float | None = None, img_size=None) -> float:
    """The GMACs a budget allows: ``budget`` x unpatched GMACs, or ``gmacs`` itself (exactly one of them)."""
    if (budget is None) == (gmacs is None):
        raise InvalidArgumentError("give exactly one of budget (fraction of the unpatched GMACs) or gmacs")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise InvalidArgumentError(f"budget {budget!r} is outside (0, 1]; it is a fraction of the unpatched GMACs")
        return budget * schedule_gmacs(model, img_size=img_size)
    if isinstance(gmacs, bool) or not isinstance(gmacs, (int, float)) or not (math.isfinite(gmacs) and gmacs > 0):
        raise InvalidArgumentError(f"gmacs {gmacs!r} must be a finite number > 0")
    return float(gmacs)


def _unreachable(method: str, target: float, smallest: float, full: float, how: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{target:.3f} GMACs ({target / full:.1%} of {full:.3f}) cannot be met by {method} {how}; the smallest "
        f"reachable is {smallest:.3f} GMACs ({smallest / full:.1%}); raise the budget or reduce earlier/more often"
    )


def solve_keep_rate(model, method: str, budget: float | None = None, gmacs: float | None = None,
                    locations: Sequence[int] = DEFAULT_LOCATIONS, img_size=None, options: dict | None = None) -> float:
    """The keep rate (the same at every location, the paper's schedule) for ``method`` that meets a budget.

    Returns the rate whose analytic GMACs is the **largest not exceeding** the target (never above it), written
    with as few decimals as give the same token schedule (e.g. 0.7 rather than 0.70408). 1.0 when the unpatched
    model already fits. ``model`` is a timm ViT, its timm name or a ViTShape.

    Raises InvalidArgumentError naming the smallest reachable GMACs when even keeping one patch token per location
    costs more than the target. ``options``: further keywords of :func:`tpsvit.patch` that change the token counts
    (the squeeze options).
    """
    get_method(method)
    shape = model_shape(model, img_size)
    target = target_gmacs(shape, budget, gmacs)
    locations = tuple(locations)

    def cost(rate: float) -> float:
        return schedule_gmacs(shape, method, rate, locations, options=options)

    def schedule(rate: float):
        config = make_config(method, shape.depth, shape.num_prefix_tokens, rate, locations, **(options or {}))
        return config.patch_tokens_per_block(shape.num_patches)

    if cost(1.0) <= target:
        return 1.0
    smallest = cost(_MIN_RATE)
    if smallest > target:
        raise _unreachable(method, target, smallest, schedule_gmacs(shape), f"at locations {list(locations)}")
    lo, hi = _MIN_RATE, 1.0  # cost(lo) <= target < cost(hi); token counts are monotone in the rate
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    # The rates giving one schedule form an interval between rationals of denominators <= the token counts, so a
    # real one holds a decimal of at most 9 digits. A schedule that only a rate like 0.50000000002 gives is a
    # float-rounding artefact at a boundary where several locations step together: take the schedule just below.
    for rate in (lo, math.floor(lo * 10**9) / 10**9):
        wanted = schedule(rate)
        for digits in range(1, 10):
            scale = 10**digits
            for candidate in (math.ceil(rate * scale) / scale, math.floor(rate * scale) / scale):
                if 0 < candidate <= 1 and schedule(candidate) == wanted and cost(candidate) <= target:
                    return candidate
    return lo


def solve_tome_r(model, budget: float | None = None, gmacs: float | None = None, img_size=None) -> int:
    """ToMe's r (tokens merged in every block, its usual schedule) that meets a budget.

    Returns the smallest r, i.e. the largest analytic GMACs not exceeding the target; raises InvalidArgumentError
    naming the smallest reachable GMACs when merging as much as possible still costs more.
    """
    shape = model_shape(model, img_size)
    target = target_gmacs(shape, budget, gmacs)
    for r in range(shape.num_patches + 1):
        if schedule_gmacs(shape, "tome", r=r) <= target:
            return r
    smallest = schedule_gmacs(shape, "tome", r=shape.num_patches)
    raise _unreachable("tome", target, smallest, schedule_gmacs(shape), "merging in every block")


# --------------------------------------------------------------------------------------------- comparison plans


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: the unpatched model (``method=None``) or one patch.

    ``locations=None`` with ``r`` set means ToMe's r in every block. ``budget`` records the budget it was solved for.
    ``scorer="random"`` replaces the method's scorer by random scores (robustness rows). ``options``: further
    keywords of :func:`tpsvit.patch` as (name, value) pairs (the squeeze options of etps / dtps).
    """

    method: str | None = None
    keep_rate: float | tuple[float, ...] | None = None
    r: int | None = None
    locations: tuple[int, ...] | None = DEFAULT_LOCATIONS
    budget: str | None = None
    scorer: str = "default"
    options: tuple = ()

    @property
    def label(self) -> str:
        """Short readable name, e.g. ``unpatched``, ``etps 0.7``, ``tome r=13``, ``etps 0.188 [35% budget]``."""
        if self.method is None:
            return "unpatched"
        amount = self.amount
        where = "" if self.locations in (None, DEFAULT_LOCATIONS) else f" @{','.join(map(str, self.locations))}"
        budget = f" [{self.budget}]" if self.budget else ""
        scorer = " (random scores)" if self.scorer != "default" else ""
        options = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.method}{scorer}{options} {amount}{where}{budget}"

    @property
    def amount(self) -> str:
        """The keep rate or r as text, for tables ('' when unpatched)."""
        if self.method is None:
            return ""
        if self.r is not None:
            return f"r={self.r}"
        if isinstance(self.keep_rate, tuple):
            return "/".join(f"{rate:g}" for rate in self.keep_rate)
        return f"{self.keep_rate:g}"

    @property
    def blocks(self) -> str:
        """Where it reduces, for tables: ``3,6,9``, ``all`` (ToMe's r in every block) or '' when unpatched."""
        if self.method is None:
            return ""
        return "all" if self.locations is None else ",".join(map(str, self.locations))

    def patch_kwargs(self) -> dict:
        """Keyword arguments of :func:`tpsvit.patch` (after the model)."""
        kwargs = {"method": self.method}
        if self.scorer != "default":
            kwargs["scorer"] = self.scorer
        kwargs.update(self.options)
        if self.r is not None:
            kwargs["r"] = self.r
            kwargs["locations"] = self.locations if self.locations is not None else DEFAULT_LOCATIONS
        else:
            kwargs["keep_rate"] = self.keep_rate
            kwargs["locations"] = self.locations
        return kwargs

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch (or unpatch) ``model`` in place to this variant and return it."""
        from tpsvit.patch import patch, unpatch

        if self.method is None:
            return unpatch(model)
        return patch(model, **self.patch_kwargs())

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        rate = list(self.keep_rate) if isinstance(self.keep_rate, tuple) else self.keep_rate
        return {"label": self.label, "method": self.method, "keep_rate": rate, "r": self.r,
                "locations": None if self.locations is None else list(self.locations), "blocks": self.blocks,
                "budget": self.budget, "scorer": self.scorer, "options": dict(self.options)}


def plan_variants(model, methods: Sequence[str] = ("etps",), keep_rates: Sequence[float] = (0.7,),
                  rs: Sequence[int] = (), locations: Sequence[int] = DEFAULT_LOCATIONS, budget: float | None = None,
                  gmacs: float | None = None, img_size=None, unpatched: bool = True,
                  options: dict | None = None) -> list[Variant]:
    """The rows of a comparison: unpatched, then every method x keep rate, ToMe at each r, and each method at the
    budget (keep rate solved at ``locations``; ToMe's r solved for every block). ``options`` (the squeeze options
    of :func:`tpsvit.patch`) go to the squeezing methods' rows (etps, dtps) and into their budget solve."""
    locations = tuple(locations)
    methods = [get_method(m).name for m in methods]
    if options and not any(get_method(m).reducer == "squeeze" for m in methods):
        raise InvalidArgumentError(f"the squeeze options {', '.join(options)} are for etps / dtps; add one of them "
                                   "to the methods")
    rows = [Variant()] if unpatched else []
    for method in methods:
        own = tuple(options.items()) if options and get_method(method).reducer == "squeeze" else ()
        rows += [Variant(method, keep_rate=tuple(map(float, rate)) if isinstance(rate, (tuple, list)) else float(rate),
                         locations=locations, options=own) for rate in keep_rates]
        if method == "tome":
            rows += [Variant("tome", r=int(r), locations=None) for r in rs]
    if rs and "tome" not in methods:
        raise InvalidArgumentError("r values are ToMe's; add 'tome' to the methods or drop --r")
    if budget is not None or gmacs is not None:
        tag = f"{budget:.0%} budget" if budget is not None else f"{gmacs:g} GMACs"
        for method in methods:
            if method == "tome":
                rows.append(Variant("tome", r=solve_tome_r(model, budget, gmacs, img_size), locations=None, budget=tag))
            else:
                own = tuple(options.items()) if options and get_method(method).reducer == "squeeze" else ()
                rate = solve_keep_rate(model, method, budget, gmacs, locations, img_size, options=dict(own))
                rows.append(Variant(method, keep_rate=rate, locations=locations, budget=tag, options=own))
    return rows
