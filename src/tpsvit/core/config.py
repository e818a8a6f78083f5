"""The validated, readable configuration of a patch (``model.tps``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tpsvit.core.methods import CLASS_FREE_SCORER, SCORER_OVERRIDES, Method, get_method
from tpsvit.errors import InvalidArgumentError

DEFAULT_LOCATIONS = (3, 6, 9)
FUSE_MODES = ("sum", "mean")  # EViT's fused token: the release's weighted sum, or a renormalised weighted mean
# Squeeze options beyond the paper (etps / dtps only; see TPSConfig): what a pruned token below the similarity floor
# does, and how a donor is weighted.
FLOOR_ACTIONS = ("drop", "fuse")
SQUEEZE_WEIGHTINGS = ("similarity", "importance")


@dataclass(frozen=True)
class TPSConfig:
    """What :func:`tpsvit.patch` applied to a model.

    Attributes:
        method: registry name (``etps``, ``dtps``, ``evit``, ``dynamicvit``, ``tome``).
        locations: 0-based block indices where tokens are reduced, ascending.
        keep_rate: one keep rate per location, relative to the patch tokens alive there (kept = ceil(rate * n)).
            ``None`` for ToMe with a fixed ``r``.
        r: ToMe's tokens merged per location (one per location), or ``None``.
        temperature: similarity temperature of the squeeze (TPS methods).
        scorer: ``"default"``, ``"random"`` (random scores, for robustness studies) or ``"attention_received"``
            (etps / evit: the attention each patch token receives, averaged over queries and heads, instead of the
            class token's row; beyond the paper, and the default on a model without a class token).
        depth: number of blocks of the model.
        num_prefix_tokens: class / distillation / register tokens, never reduced.
        fuse: EViT's fused token: ``"sum"`` (the release: class-attention-weighted sum of the pruned tokens) or
            ``"mean"`` (the same weights renormalised; not in the release).
        squeeze_floor: beyond the paper (etps / dtps): a pruned token whose best host has cosine similarity below
            this floor is not squeezed; ``None`` (the paper) or -1 (no cosine is below it) squeezes every token.
        squeeze_floor_action: beyond the paper: what a token below the floor does, ``"drop"`` (DynamicViT's rule)
            or ``"fuse"`` (EViT's rule: the tokens below the floor are summed, weighted by their importance, into one
            extra token appended after the kept ones, at every location where tokens are pruned).
        squeeze_weighting: ``"similarity"`` (the paper: a donor weighs ``exp(cos / temperature)``) or
            ``"importance"`` (beyond the paper: that weight times ``n * a_i``, the donor's share ``a_i`` of the
            importance of the ``n`` tokens alive at the location, so an average-importance donor keeps the paper's
            weight and an unimportant one hardly moves its host).
    """

    method: str
    locations: tuple[int, ...]
    keep_rate: tuple[float, ...] | None
    r: tuple[int, ...] | None
    temperature: float
    scorer: str
    depth: int
    num_prefix_tokens: int
    fuse: str = "sum"
    squeeze_floor: float | None = None
    squeeze_floor_action: str = "drop"
    squeeze_weighting: str = "similarity"

    @property
    def spec(self) -> Method:
        """The registry entry of :attr:`method`."""
        return get_method(self.method)

    @property
    def floor_active(self) -> bool:
        """True when the similarity floor can leave a token unsqueezed (set, and above -1)."""
        return self.squeeze_floor is not None and self.squeeze_floor > -1

    @property
    def floor_fuses(self) -> bool:
        """True when tokens below an active floor are fused into one extra token per location."""
        return self.floor_active and self.squeeze_floor_action == "fuse"

    def tokens_after(self, n: int, keep_rate: float | None = None, r: int | None = None) -> int:
        """Patch tokens left after reducing ``n`` (the method's count, plus the floor's extra token)."""
        out = self.spec.tokens_after(n, keep_rate=keep_rate, r=r)
        return out + 1 if self.floor_fuses and out < n else out

    def reduction_at(self, block: int) -> dict | None:
        """``{"keep_rate": ..., "r": ...}`` applied at ``block`` (one of them None), or None if it reduces nothing."""
        if block not in self.locations:
            return None
        i = self.locations.index(block)
        if self.r is not None:
            return {"keep_rate": None, "r": self.r[i]}
        return {"keep_rate": self.keep_rate[i], "r": None}

    def patch_tokens_per_block(self, num_patches: int) -> list[tuple[int, int]]:
        """For each block, (patch tokens seen by attention, patch tokens seen by the MLP) at inference.

        Prefix tokens are not included. This is the analytic schedule used for GMACs and budgets; the runtime
        computes the same counts from the real sequence.
        """
        out, n = [], num_patches
        for block in range(self.depth):
            reduction = self.reduction_at(block)
            if reduction is not None and self.spec.placement == "before":
                n = self.tokens_after(n, **reduction)
            n_attn = n
            if reduction is not None and self.spec.placement == "inside":
                n = self.tokens_after(n, **reduction)
            out.append((n_attn, n))
        return out

    def with_keep_rate(self, keep_rate) -> TPSConfig:
        """A copy with new keep rates (validated), e.g. to anneal the keep rate while fine-tuning."""
        rates = _validate_keep_rate(keep_rate, self.locations)
        return replace(self, keep_rate=rates, r=None)

    def __str__(self) -> str:
        amounts = (f"keep_rate={list(self.keep_rate)}" if self.keep_rate is not None else f"r={list(self.r)}")
        extra = f", scorer={self.scorer}" if self.scorer != "default" else ""
        extra += f", fuse={self.fuse}" if self.fuse != "sum" else ""
        if self.squeeze_floor is not None:
            extra += f", squeeze_floor={self.squeeze_floor:g} ({self.squeeze_floor_action})"
        extra += f", squeeze_weighting={self.squeeze_weighting}" if self.squeeze_weighting != "similarity" else ""
        return f"{self.method} at blocks {list(self.locations)}, {amounts}, temperature={self.temperature}{extra}"


def make_config(
    method: str,
    depth: int,
    num_prefix_tokens: int,
    keep_rate=0.7,
    locations: Sequence[int] | None = DEFAULT_LOCATIONS,
    r=None,
    temperature: float = 1.0,
    scorer: str = "default",
    fuse: str = "sum",
    class_token: bool = True,
    *,
    squeeze_floor: float | None = None,
    squeeze_floor_action: str = "drop",
    squeeze_weighting: str = "similarity",
) -> TPSConfig:
    """Validate user arguments into a :class:`TPSConfig`, with errors that say what is allowed.

    ``class_token=False`` (a model without one): etps / evit with ``scorer="default"`` get the class-free scorer
    ``"attention_received"`` (the caller tells the user).
    """
    spec = get_method(method)
    if locations is None:
        locations = ()
    if isinstance(locations, int):
        locations = (locations,)
    if r is not None:
        if spec.reducer != "merge":
            raise InvalidArgumentError(f"r={r!r} is ToMe's option; method {spec.name!r} takes keep_rate")
        if locations == DEFAULT_LOCATIONS:
            locations = tuple(range(depth))  # ToMe's usual: merge r tokens in every block
    locs = _validate_locations(locations, depth)
    rates, rs = None, None
    if r is not None:
        rs = _validate_r(r, locs)
    else:
        rates = _validate_keep_rate(keep_rate, locs)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise InvalidArgumentError(f"temperature must be a finite number > 0, got {temperature!r}")
    if scorer not in SCORER_OVERRIDES:
        raise InvalidArgumentError(f"unknown scorer {scorer!r}; allowed: {', '.join(SCORER_OVERRIDES)}")
    if scorer == "random" and spec.reducer == "merge":
        raise InvalidArgumentError("scorer='random' is not defined for ToMe (its matching is its scorer)")
    if scorer == CLASS_FREE_SCORER and not spec.needs_class_token:
        raise InvalidArgumentError(
            f"scorer={CLASS_FREE_SCORER!r} replaces the class-token attention of etps / evit; method {spec.name!r} "
            "has no such scorer"
        )
    if scorer == "default" and spec.needs_class_token and not class_token:
        scorer = CLASS_FREE_SCORER
    if fuse not in FUSE_MODES:
        raise InvalidArgumentError(f"unknown fuse {fuse!r}; allowed: {', '.join(FUSE_MODES)}")
    if fuse != "sum" and spec.reducer != "fuse_one":
        raise InvalidArgumentError(f"fuse={fuse!r} is EViT's option; method {spec.name!r} fuses no token")
    floor = _validate_squeeze_options(spec, squeeze_floor, squeeze_floor_action, squeeze_weighting)
    return TPSConfig(spec.name, locs, rates, rs, float(temperature), scorer, depth, num_prefix_tokens, fuse,
                     floor, squeeze_floor_action, squeeze_weighting)


def _validate_squeeze_options(spec: Method, floor, action: str, weighting: str) -> float | None:
    """The squeeze options beyond the paper: only for squeezing methods, each value checked; the floor as a float."""
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                              or not (math.isfinite(floor) and -1 <= floor <= 1)):
        raise InvalidArgumentError(f"squeeze_floor must be a cosine similarity in [-1, 1] (or None: off), "
                                   f"got {floor!r}")
    if action not in FLOOR_ACTIONS:
        raise InvalidArgumentError(f"unknown squeeze_floor_action {action!r}; allowed: {', '.join(FLOOR_ACTIONS)}")
    if weighting not in SQUEEZE_WEIGHTINGS:
        raise InvalidArgumentError(f"unknown squeeze_weighting {weighting!r}; allowed: {', '.join(SQUEEZE_WEIGHTINGS)}")
    if action != "drop" and floor is None:
        raise InvalidArgumentError(f"squeeze_floor_action={action!r} acts on the tokens below squeeze_floor; set "
                                   "squeeze_floor too (a cosine in [-1, 1])")
    used = [name for name, value, default in (("squeeze_floor", floor, None), ("squeeze_floor_action", action, "drop"),
                                              ("squeeze_weighting", weighting, "similarity")) if value != default]
    if used and spec.reducer != "squeeze":
        raise InvalidArgumentError(f"{', '.join(used)} {'is an option' if len(used) == 1 else 'are options'} of the "
                                   f"TPS squeeze (etps, dtps); method {spec.name!r} squeezes nothing")
    return None if floor is None else float(floor)


def _validate_locations(locations, depth: int) -> tuple[int, ...]:
    try:
        locs = tuple(locations)
    except TypeError:
        raise InvalidArgumentError(f"locations must be a sequence of block indices, got {locations!r}") from None
    for loc in locs:
        if isinstance(loc, bool) or not isinstance(loc, int) or not 0 <= loc < depth:
            raise InvalidArgumentError(
                f"location {loc!r} is not a block of this model; allowed: integers 0..{depth - 1}"
            )
    if len(set(locs)) != len(locs):
        raise InvalidArgumentError(f"locations must not repeat, got {list(locs)}")
    if list(locs) != sorted(locs):
        raise InvalidArgumentError(f"locations must be ascending, got {list(locs)}")
    return locs


def _validate_keep_rate(keep_rate, locs: tuple[int, ...]) -> tuple[float, ...]:
    if isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool):
        rates = (float(keep_rate),) * len(locs)
    elif isinstance(keep_rate, (str, bytes)):
        raise InvalidArgumentError(f"keep_rate must be a number in (0, 1] or a list of them, got {keep_rate!r}")
    else:
        try:
            rates = tuple(keep_rate)
        except TypeError:
            raise InvalidArgumentError(f"keep_rate must be a number or a list of numbers, got {keep_rate!r}") from None
        if len(rates) != len(locs):
            raise InvalidArgumentError(
                f"keep_rate has {len(rates)} values but there are {len(locs)} locations {list(locs)}; "
                "give one value, or one per location"
            )
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= 1):
            raise InvalidArgumentError(f"keep_rate {rate!r} is outside (0, 1]; allowed: 0 < keep_rate <= 1")
    return tuple(float(x) for x in rates)


def _validate_r(r, locs: tuple[int, ...]) -> tuple[int, ...]:
    rs = (r,) * len(locs) if isinstance(r, int) and not isinstance(r, bool) else tuple(r)
    if len(rs) != len(locs):
        raise InvalidArgumentError(f"r has {len(rs)} values but there are {len(locs)} locations {list(locs)}")
    for value in rs:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"ToMe's r must be an integer >= 0, got {value!r}")
    return rs
