"""What a patched model did to its tokens: per location, kept / pruned tokens and each pruned token's host.

Record with :func:`tpsvit.tracing`; map back to the full patch grid with :meth:`Trace.assignment` and :func:`restore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tpsvit.errors import InvalidArgumentError


@dataclass
class LocationTrace:
    """One reduction step of one forward pass (indices refer to the patch tokens entering the step).

    Attributes:
        block: 0-based block index.
        positions: (B, N_in) original grid index of each patch token entering, -1 for tokens with no grid cell
            (EViT's fused token).
        kept: (B, K) indices of the tokens that survive as themselves; output token i is ``kept[:, i]``.
        pruned: (B, P) indices of the tokens removed here.
        host: (B, P) output index of the token each removed token was squeezed / merged / fused into; -1 if dropped.
        num_out: patch tokens leaving the step.
        scores: (B, N_in) importance scores where the method has them (higher = more important), else None.
    """

    block: int
    positions: Tensor
    kept: Tensor
    pruned: Tensor
    host: Tensor
    num_out: int
    scores: Tensor | None = None

    def output_index(self) -> Tensor:
        """(B, N_in): for each entering token, the output token it became or went into (-1 if dropped)."""
        out = torch.full_like(self.positions, -1)
        batch = self.kept.shape[0]
        out.scatter_(1, self.kept, torch.arange(self.kept.shape[1], device=out.device).expand(batch, -1))
        return out.scatter(1, self.pruned, self.host)


@dataclass
class Trace:
    """The reduction steps of the last forward pass of a patched model (see :func:`tpsvit.tracing`)."""

    method: str = ""
    num_prefix: int = 0
    num_patches: int = 0
    grid_size: tuple[int, int] | None = None
    locations: list[LocationTrace] = field(default_factory=list)
    recorded: bool = False  # a forward pass ran while tracing
    masked: bool = False  # that pass took the full-length training path, where no token is removed
    frozen: Tensor | None = None  # (B, num_patches + 1, C): each removed patch's own feature when it left (+ a sink)

    def reset(self, method: str, num_prefix: int, grid_size: tuple[int, int] | None, masked: bool = False) -> None:
        """Forget the previous forward pass."""
        self.method, self.num_prefix, self.grid_size = method, num_prefix, grid_size
        self.num_patches = 0
        self.locations = []
        self.recorded, self.masked = True, masked
        self.frozen = None

    def freeze(self, positions: Tensor, features: Tensor) -> None:
        """Keep ``features`` (B, P, C) of the tokens removed at a location, at their grid ``positions`` (B, P); -1
        (EViT's fused token, no grid cell) is not kept. One (B, num_patches, C) buffer for the whole pass."""
        if self.frozen is None:
            batch, _, dim = features.shape
            self.frozen = features.new_zeros(batch, self.num_patches + 1, dim)
        index = torch.where(positions >= 0, positions, self.num_patches)
        self.frozen.scatter_(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]), features)

    def _check_usable(self) -> None:
        if not self.recorded and not self.locations:
            raise InvalidArgumentError(
                "the trace is empty: run a forward pass of the patched model inside tpsvit.tracing()"
            )
        if self.masked:
            raise InvalidArgumentError(
                f"this trace comes from the masked training path ({self.method} in model.train()), where tokens are "
                "masked, not removed; trace in model.eval()"
            )

    def assignment(self, upto: int | None = None) -> Tensor:
        """(B, num_patches): the token each original patch ended up in after ``upto`` locations (default: all).

        Token indices count patch tokens only (prefix tokens excluded); -1 marks a patch whose token was dropped.
        """
        self._check_usable()
        if not self.locations:
            raise InvalidArgumentError(
                "nothing was reduced in the traced pass (keep rate 1?), so there is no assignment"
            )
        steps = self.locations if upto is None else self.locations[:upto]
        first = self.locations[0]
        assign = torch.arange(self.num_patches, device=first.kept.device).expand(first.kept.shape[0], -1)
        for step in steps:
            mapped = step.output_index().gather(1, assign.clamp(min=0))
            assign = torch.where(assign >= 0, mapped, assign)
        return assign

    def survivors(self, upto: int | None = None) -> Tensor:
        """(B, num_patches) bool: the patches whose own token is still there after ``upto`` locations (kept every
        time, never squeezed, merged, fused or dropped)."""
        self._check_usable()
        steps = self.locations if upto is None else self.locations[:upto]
        first = self.locations[0]
        alive = torch.ones(first.kept.shape[0], self.num_patches + 1, dtype=torch.bool, device=first.kept.device)
        for step in steps:
            gone = step.positions.gather(1, step.pruned)
            alive.scatter_(1, torch.where(gone >= 0, gone, self.num_patches), False)  # -1: the fused token, no patch
        return alive[:, : self.num_patches]


RESTORE_MODES = ("host", "frozen", "zeros")


def restore(tokens: Tensor, trace: Trace, upto: int | None = None, mode: str = "host",
            norm=None) -> tuple[Tensor, Tensor]:
    """Rebuild the full patch grid from the final tokens of a traced forward pass.

    Args:
        tokens: (B, num_prefix + N_final, C), e.g. ``model.forward_features(x)`` of the traced pass.
        trace: the :class:`Trace` recorded for that pass.
        upto: the tokens are those after the first ``upto`` locations of the trace (an intermediate layer's
            output); default: after all of them.
        mode: what a removed patch gets: ``"host"`` (default), ``"frozen"`` or ``"zeros"`` (below).
        norm: a callable applied to the frozen features (``mode="frozen"`` only).

    Returns:
        ``(prefix, grid)``: prefix tokens (B, num_prefix, C) and (B, num_patches, C). A patch whose own token
        survives takes its final feature; a removed patch, by ``mode``:

        - ``"host"``: the final feature of the token it was absorbed into (following hosts through all locations:
          TPS's host, ToMe's merge destination, which is ToMe's unmerge; EViT's fused token); dropped outright
          (DynamicViT) gives zeros;
        - ``"frozen"``: its own feature at the location where it was removed (the token stream there: the block
          input for dtps / dynamicvit, the post-attention stream for etps / evit / tome), as Token Cropr and SViT
          re-insert pruned tokens; ``norm`` (e.g. the model's final norm, when ``tokens`` come after it) is applied
          to those features;
        - ``"zeros"``: zeros.
    """
    if mode not in RESTORE_MODES:
        raise InvalidArgumentError(f"restore mode {mode!r}; allowed: {', '.join(RESTORE_MODES)}")
    if norm is not None and mode != "frozen":
        raise InvalidArgumentError(f"norm applies to mode='frozen' only, not mode={mode!r}")
    trace._check_usable()
    prefix, patches = tokens[:, : trace.num_prefix], tokens[:, trace.num_prefix :]
    steps = trace.locations if upto is None else trace.locations[:upto]
    if not steps:
        return prefix, patches
    expected = steps[-1].num_out
    if patches.shape[1] != expected:
        raise InvalidArgumentError(
            f"tokens hold {patches.shape[1]} patch tokens but the trace has {expected} after location "
            f"{len(steps)}; pass the tokens of the same forward pass that was traced"
        )
    assign = trace.assignment(upto)
    index = assign.clamp(min=0).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    grid = patches.gather(1, index) * (assign >= 0).unsqueeze(-1).to(patches.dtype)
    if mode == "host":
        return prefix, grid
    alive = trace.survivors(upto).unsqueeze(-1)
    if mode == "zeros":
        return prefix, grid * alive.to(grid.dtype)
    frozen = trace.frozen[:, : trace.num_patches].to(grid.dtype)
    if norm is not None:
        frozen = norm(frozen)
    return prefix, torch.where(alive, grid, frozen)
