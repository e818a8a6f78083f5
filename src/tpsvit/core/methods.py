"""The method registry: every token-reduction method is a scorer, a reducer and a placement.

Adding a method is adding an entry to :data:`METHODS` (:func:`register_method`); the patch code reads only these
fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpsvit.errors import InvalidArgumentError


@dataclass(frozen=True)
class Method:
    """How one token-reduction method scores, reduces and where it acts.

    Attributes:
        name: registry key.
        scorer: ``"cls_attention"`` (class-token attention of the block), ``"predictor"`` (learned, between blocks)
            or ``"matching"`` (ToMe's bipartite matching on keys, which scores and pairs at once).
        reducer: ``"squeeze"`` (TPS), ``"drop"``, ``"fuse_one"`` (EViT) or ``"merge"`` (ToMe).
        placement: ``"inside"`` (after attention, before the MLP) or ``"before"`` (before the block).
        summary: one line for tables and ``--help``.
    """

    name: str
    scorer: str
    reducer: str
    placement: str
    summary: str

    @property
    def learned(self) -> bool:
        """True when the scorer has weights that must be trained (dTPS, DynamicViT)."""
        return self.scorer == "predictor"

    @property
    def needs_class_token(self) -> bool:
        """True when the scorer reads the class token's attention row."""
        return self.scorer == "cls_attention"

    def tokens_after(self, n: int, keep_rate: float | None = None, r: int | None = None) -> int:
        """Patch tokens left after this method reduces ``n`` patch tokens with a keep rate (or ToMe's ``r``).

        Mirrors the runtime exactly, so GMACs and budgets can be computed analytically.
        """
        if self.reducer == "merge":
            return n - tome_merge_count(n, keep_rate=keep_rate, r=r)
        kept = keep_count(n, keep_rate)
        extra = 1 if self.reducer == "fuse_one" and kept < n else 0
        return kept + extra


def keep_count(n: int, keep_rate: float) -> int:
    """``ceil(keep_rate * n)`` patch tokens kept, at least one (robust to float round-off such as 0.7 * 10)."""
    if n <= 0:
        return n
    return max(1, min(n, math.ceil(keep_rate * n - 1e-9)))


def release_keep_rates(ratio: float, num_patches: int, num_locations: int = 3) -> list[float]:
    """Per-location relative keep rates that reproduce the DynamicViT / TPS releases' token counts exactly.

    The releases keep ``int(num_patches * ratio ** (i + 1))`` of the *initial* patch tokens at the i-th location
    (ratio 0.7 on 196 patches: 137, 96, 67), while tpsvit's ``keep_rate`` is relative to the tokens alive and rounds
    up (0.7 each: 138, 97, 68). Pass the result as ``keep_rate`` to get the releases' counts.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InvalidArgumentError(f"ratio {ratio!r} is outside (0, 1]")
    rates, alive = [], num_patches
    for i in range(num_locations):
        count = max(1, int(num_patches * ratio ** (i + 1)))
        rates.append(min(1.0, count / alive))
        alive = keep_count(alive, rates[-1])
    return rates


def tome_merge_count(n: int, keep_rate: float | None = None, r: int | None = None) -> int:
    """Tokens ToMe merges at one block: ``r`` when given, else ``n - keep_count(n, keep_rate)``.

    Bipartite matching can merge at most the smaller side of the split (every second token), so r is capped there.
    """
    if r is None:
        r = n - keep_count(n, keep_rate)
    return max(0, min(r, n // 2))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("etps", "cls_attention", "squeeze", "inside",
               "TPS, intra-block: class-attention pruning + squeezing into hosts (no training needed)"),
        Method("dtps", "predictor", "squeeze", "before",
               "TPS, inter-block: learned predictor pruning + squeezing into hosts (needs fine-tuning)"),
        Method("evit", "cls_attention", "fuse_one", "inside",
               "EViT: class-attention pruning, pruned tokens fused into one extra token (attention-weighted sum)"),
        Method("dynamicvit", "predictor", "drop", "before",
               "DynamicViT: learned predictor pruning, pruned tokens dropped (needs fine-tuning)"),
        Method("tome", "matching", "merge", "inside",
               "ToMe: bipartite soft matching on keys, size-weighted merging, proportional attention"),
    )
}



def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a new combination of scorer, reducer and placement; a new reducer is
    registered with :func:`tpsvit.core.reducers.register_reducer`); returns it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} exists already")
    if method.placement not in ("inside", "before"):
        raise ValueError(f"placement {method.placement!r}; allowed: inside, before")
    METHODS[method.name] = method
    return method


SCORER_OVERRIDES = ("default", "random", "attention_received")
# Beyond the paper: the class-free scorer of etps / evit (attention each patch token receives, averaged over queries
# and heads). The default for those methods on a model without a class token.
CLASS_FREE_SCORER = "attention_received"


def get_method(name: str) -> Method:
    """Look a method up by name, with an error that lists the allowed names."""
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name.lower()]
