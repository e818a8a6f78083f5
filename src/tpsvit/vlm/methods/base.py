"""What every VLM reduction method shares: its inputs (:class:`Context`), its output (:class:`Selection`) and
:func:`select`, which protects prefix tokens and returns the input unchanged when nothing is to be removed.

A method is ``fn(x, k, ctx) -> Selection``: ``x`` (B, n, C) the patch features of one kind of image (the projector's
inputs, or Qwen2.5-VL's merged tokens), ``k`` the tokens to return per image (1 <= k < n). Every output token has a
*representative*: the input token whose place it takes in the sequence (itself for a kept token, a host for a
squeezed one, the pooling window's centre, ...). Outputs are sorted by representative, so the placeholder columns
kept in the language model's input are those of the representatives and "original" positions are theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tpsvit.errors import InvalidArgumentError


@dataclass
class Context:
    """What a method may read besides the features: scores, keys and the patch grid, each possibly unavailable.

    ``score_fn`` / ``keys_fn`` are called at most once, only by the methods that need them, so methods that do not
    score (random, pool) cost nothing extra.
    """

    grid: tuple[int, int] | None = None
    score_fn: Callable[[], Tensor] | None = None  # () -> (B, n) importance of each patch token, higher = keep
    keys_fn: Callable[[], Tensor] | None = None  # () -> (B, n, D) keys of the scoring layer, mean over heads
    scorer: str = "class attention"
    _cache: dict = field(default_factory=dict)

    def scores(self) -> Tensor:
        """(B, n) float32 scores of the patch tokens."""
        if "scores" not in self._cache:
            if self.score_fn is None:
                raise InvalidArgumentError("this model gives no attention scores for its visual tokens")
            self._cache["scores"] = self.score_fn().float()
        return self._cache["scores"]

    def keys(self, fallback: Tensor) -> Tensor:
        """(B, n, D) keys of the scoring layer (mean over heads), or ``fallback`` (the features) without them."""
        if "keys" not in self._cache:
            self._cache["keys"] = self.keys_fn().float() if self.keys_fn is not None else fallback.float()
        return self._cache["keys"]


@dataclass
class Selection:
    """Output tokens (B, K, C), their representatives (B, K) sorted ascending, and, for adaptive methods, the
    number of valid leading rows per image (B,) (the rest is padding with representative -1)."""

    tokens: Tensor
    rep: Tensor
    counts: Tensor | None = None

    def per_image(self) -> list[tuple[Tensor, Tensor]]:
        """[(tokens (K_i, C), rep (K_i,))] per image, padding removed."""
        counts = self.counts.tolist() if self.counts is not None else [self.rep.shape[1]] * self.rep.shape[0]
        return [(self.tokens[i, :c], self.rep[i, :c]) for i, c in enumerate(counts)]


def sort_by_rep(tokens: Tensor, rep: Tensor) -> Selection:
    """The selection with its tokens in ascending representative order."""
    rep, order = rep.sort(dim=1)
    return Selection(tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), rep)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, n, C), index (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def select(method, x: Tensor, budget: int, prefix: int, ctx: Context) -> Selection:
    """Run ``method`` (a :class:`~tpsvit.vlm.methods.VLMMethod`) on ``x`` (B, n, C) for ``budget`` tokens per image.

    The first ``prefix`` tokens (LLaVA's class token under the "full" select strategy) are always kept, unchanged,
    and count in the budget; the method sees the patch tokens only. A budget of at least ``n`` returns ``x`` itself
    (bit-for-bit) unless the method is adaptive.
    """
    batch, n, _ = x.shape
    patches = n - prefix
    k = budget - prefix
    if k < 1:
        raise InvalidArgumentError(f"tokens={budget} leaves no patch token: this model's features start with "
                                   f"{prefix} class token(s) that are always kept; ask for at least {prefix + 1}")
    if k >= patches and not method.adaptive:
        rep = torch.arange(n, device=x.device).expand(batch, -1)
        return Selection(x, rep)
    out = method.fn(x[:, prefix:], min(k, patches), ctx)
    if prefix == 0:
        return out
    head = torch.arange(prefix, device=x.device).expand(batch, -1)
    rep = torch.cat([head, torch.where(out.rep >= 0, out.rep + prefix, out.rep)], dim=1)
    counts = None if out.counts is None else out.counts + prefix
    return Selection(torch.cat([x[:, :prefix].to(out.tokens.dtype), out.tokens], dim=1), rep, counts)
