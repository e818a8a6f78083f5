"""The family-free engine of a patched model: the per-forward state and the reduction step at each location.

A :class:`Runtime` is shared by a patched model and its blocks. The blocks' mixins (one per family,
:mod:`tpsvit.families`) call :meth:`Runtime.attend` for their attention and :meth:`Runtime.reduce` at their
location; what differs between families (q/k, masked attention, per-token extras) is asked of the family adapter.
Two paths: inference gathers the kept tokens (a shorter sequence); learned methods in train mode keep the full length
and carry a keep mask into attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tpsvit.core.attention import size_bias
from tpsvit.core.config import TPSConfig
from tpsvit.core.methods import CLASS_FREE_SCORER, keep_count, tome_merge_count
from tpsvit.core.reducers import SCORED_REDUCERS, Reduction, bipartite_merge, scores_are_log_probs
from tpsvit.core.scoring import (
    attention_received,
    class_attention_qk,
    gumbel_keep,
    random_scores,
    top_k_mask,
    top_k_split,
)
from tpsvit.core.squeeze import importance, importance_log_weight, squeeze_masked
from tpsvit.core.trace import LocationTrace, Trace
from tpsvit.families.base import Family


@dataclass
class ForwardState:
    """What one forward pass of a patched model carries from block to block (read it with :func:`forward_state`).

    Attributes:
        masked: True on the full-length training path (learned methods in train mode): tokens are masked, not removed.
        policy: (B, N_tokens) keep mask incl. prefix tokens on the masked path, else None.
        decisions: per location, the (B, N_patches) keep mask after it (masked path; straight-through gradients).
        size: (B, N_tokens, 1) original tokens each token stands for (ToMe), else None.
        positions: (B, N_patch_tokens) original grid index of each current patch token (-1: EViT's fused token, the
            similarity floor's fused token) on the gather path, None before the first reduction; on the masked path
            None unless the floor appended fused tokens (then the grid, then -1 for each). Per-token extras follow
            from it: an Eva block gathers the rotary rows of these positions
            (:func:`tpsvit.families.timm_eva.gather_rope`).
        ranking: masked path with ``record_class_attention``: per location, (predictor keep log-probs (B, N, 2),
            the block's class attention over the alive tokens (B, N), the alive mask before it (B, N)).
    """

    masked: bool
    policy: Tensor | None = None
    decisions: list[Tensor] = field(default_factory=list)
    size: Tensor | None = None
    positions: Tensor | None = None
    ranking: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    extra: int = 0  # masked path: fused tokens the similarity floor appended after the grid tokens so far


class Runtime:
    """Shared by a patched model and its blocks: the config, the trace and the current forward state."""

    def __init__(self, config: TPSConfig, grid_size, family: Family):
        self.config = config
        self.grid_size = grid_size
        self.family = family
        self.state: ForwardState | None = None
        self.trace: Trace | None = None
        self.force_masked = False  # tests: run the masked path with top-k decisions in eval mode
        self.training_decisions = "gumbel"  # masked path in train mode: "gumbel" samples or "topk" by score
        self.restore_mode = "host"  # feature maps of grid-returning models (tpsvit.restore's mode)
        self.record_class_attention = False  # masked path: record ForwardState.ranking (predictor distillation)

    def begin(self, model: nn.Module) -> None:
        masked = self.force_masked or (self.config.spec.learned and model.training)
        self.state = ForwardState(masked=masked)
        if self.trace is not None:
            self.trace.reset(self.config.method, self.config.num_prefix_tokens, self.grid_size, masked)

    def ensure_state(self, module: nn.Module) -> ForwardState:
        """The current forward state (a block called on its own starts one)."""
        if self.state is None:
            self.begin(module)
        return self.state

    def attend(self, block: nn.Module, x: Tensor, extras: dict, attn_mask=None, is_causal: bool = False) -> Tensor:
        """The block's attention on ``x`` (after norm1) under the current state: masked, size-biased or plain."""
        state = self.state
        if (attn_mask is not None or is_causal) and (state.policy is not None or state.size is not None):
            raise ValueError("attn_mask / is_causal are not supported by a patched model once tokens are reduced")
        if state.policy is not None:
            return self.family.masked_attention(block, x, state.policy, extras)
        if state.size is not None:
            return self.family.attention(block, x, extras, size_bias(state.size, x.dtype), False)
        return self.family.attention(block, x, extras, attn_mask, is_causal)

    def reduce(self, block: nn.Module, x: Tensor, extras: dict) -> Tensor:
        """The reduction step of ``block`` (a no-op away from its locations)."""
        return _reduce(block, x, self, extras)


# ----------------------------------------------------------------------------------------------- reduction step


def _reduce(block: nn.Module, x: Tensor, runtime: Runtime, extras: dict) -> Tensor:
    config, state = runtime.config, runtime.state
    capture = runtime.family.take_capture(block)
    reduction = config.reduction_at(block._tps_index)
    if reduction is None:
        return x
    if state.masked:
        return _reduce_masked(block, x, runtime, reduction, extras)
    prefix_len = config.num_prefix_tokens
    prefix, patches = x[:, :prefix_len], x[:, prefix_len:]
    batch, n = patches.shape[:2]
    spec = config.spec
    scores = None
    if spec.reducer == "merge":
        r = tome_merge_count(n, **reduction)
        if r == 0:
            return x
        keys = runtime.family.query_key(block, capture, extras)[1]
        result = bipartite_merge(x, keys.mean(dim=1), state.size, r, prefix_len)
        state.size = torch.cat([x.new_ones(batch, prefix_len, 1), result.size], dim=1)
    else:
        k = keep_count(n, reduction["keep_rate"])
        if k >= n:
            return x
        scores = _scores(block, patches, capture, extras, state, runtime)
        kept, pruned = top_k_split(scores, k)
        result = SCORED_REDUCERS[spec.reducer](patches, kept, pruned, scores, config)
    _track(block, state, runtime, result, scores, patches)
    return torch.cat([prefix, result.tokens], dim=1)


def _scores(block: nn.Module, patches: Tensor, capture, extras: dict, state: ForwardState, runtime: Runtime) -> Tensor:
    config = runtime.config
    if config.scorer == "random":
        return random_scores(patches.shape[:2], patches.device)
    if config.spec.scorer == "predictor":
        return block._tps_predictor(patches)[..., 0]
    q, k = runtime.family.query_key(block, capture, extras)
    bias = size_bias(state.size, k.dtype) if state.size is not None else None
    if config.scorer == CLASS_FREE_SCORER:
        return attention_received(q, k, runtime.family.attn_scale(block), config.num_prefix_tokens, bias)
    return class_attention_qk(q, k, runtime.family.attn_scale(block), config.num_prefix_tokens, bias)


def _track(block, state: ForwardState, runtime: Runtime, result: Reduction, scores, patches: Tensor) -> None:
    """Carry grid positions forward and, when tracing, record the step and the features of the tokens it removes."""
    n = patches.shape[1]
    positions = state.positions
    if positions is None:
        positions = torch.arange(n, device=result.kept.device).expand(result.kept.shape[0], -1)
    new_positions = positions.gather(1, result.kept)
    if result.extra:
        no_cell = new_positions.new_full((new_positions.shape[0], result.extra), -1)
        new_positions = torch.cat([new_positions, no_cell], dim=1)
    state.positions = new_positions
    trace = runtime.trace
    if trace is not None:
        if not trace.locations:
            trace.num_patches = n
        trace.locations.append(
            LocationTrace(
                block=block._tps_index,
                positions=positions.detach(),
                kept=result.kept.detach(),
                pruned=result.pruned.detach(),
                host=result.host.detach(),
                num_out=result.tokens.shape[1],
                scores=None if scores is None else scores.detach().float(),
            )
        )
        trace.freeze(positions.gather(1, result.pruned), patches.detach().gather(
            1, result.pruned.unsqueeze(-1).expand(-1, -1, patches.shape[-1])))


def _reduce_masked(block: nn.Module, x: Tensor, runtime: Runtime, reduction: dict, extras: dict) -> Tensor:
    """Full-length path: decide keep masks (Gumbel in training, else top-k), squeeze by mask, carry the policy."""
    config, state = runtime.config, runtime.state
    prefix_len = config.num_prefix_tokens
    prefix, patches = x[:, :prefix_len], x[:, prefix_len:]
    batch, n = patches.shape[:2]
    prev = state.policy[:, prefix_len:] if state.policy is not None else patches.new_ones(batch, n)
    if config.scorer == "random":
        scores = random_scores((batch, n), x.device)
        keep = top_k_mask(scores, prev, reduction["keep_rate"])
    else:
        log_probs = block._tps_predictor(patches, prev)
        scores = log_probs[..., 0]
        if block.training and not runtime.force_masked and runtime.training_decisions == "gumbel":
            keep = gumbel_keep(log_probs, prev)
        else:
            keep = top_k_mask(log_probs[..., 0], prev, reduction["keep_rate"])
        if runtime.record_class_attention:
            with torch.no_grad():
                q, k = runtime.family.fresh_query_key(block, runtime.family.attn_input(block, x), extras)
                alive = torch.cat([prev.new_ones(batch, prefix_len), prev], dim=1)
                bias = torch.zeros_like(alive).masked_fill(alive <= 0, float("-inf"))[:, None, None, :]
                target = class_attention_qk(q, k, runtime.family.attn_scale(block), prefix_len, bias)
            state.ranking.append((log_probs, target, prev))
    if config.spec.reducer == "squeeze":
        patches, keep = _squeeze_masked(patches, keep, prev, scores, config, state, reduction)
    state.policy = torch.cat([keep.new_ones(batch, prefix_len), keep], dim=1)
    state.decisions.append(keep[:, : keep.shape[1] - state.extra])  # grid tokens: the keep-ratio loss's fractions
    return torch.cat([prefix, patches], dim=1)


def _squeeze_masked(patches: Tensor, keep: Tensor, prev: Tensor, scores: Tensor, config: TPSConfig,
                    state: ForwardState, reduction: dict) -> tuple[Tensor, Tensor]:
    """The masked-path squeeze with the config's options (beyond the paper); returns (patches, keep), one longer
    each when the similarity floor fuses the tokens below it into an extra token (as the gather path appends it)."""
    if not config.floor_active and config.squeeze_weighting == "similarity":
        return squeeze_masked(patches, keep, prev, config.temperature), keep
    share = importance(scores, prev, log_probs=scores_are_log_probs(config))
    log_weight = importance_log_weight(share, prev.sum(dim=1)) if config.squeeze_weighting == "importance" else None
    floor = config.squeeze_floor if config.floor_active else None
    fused, below = squeeze_masked(patches, keep, prev, config.temperature, floor=floor, log_weight=log_weight,
                                  return_below=True)
    if not config.floor_fuses or reduction["keep_rate"] >= 1:
        return fused, keep
    weight = share * (prev - keep) * below.float()  # straight-through gradients of the decisions, as the squeeze's
    extra = (patches.float() * weight.unsqueeze(-1)).sum(dim=1, keepdim=True).to(patches.dtype)
    batch, n = keep.shape
    if state.positions is None:
        state.positions = torch.arange(n, device=keep.device).expand(batch, -1)
    state.positions = torch.cat([state.positions, state.positions.new_full((batch, 1), -1)], dim=1)
    state.extra += 1
    return torch.cat([fused, extra], dim=1), torch.cat([keep, keep.new_ones(batch, 1)], dim=1)
