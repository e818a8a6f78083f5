"""timm integration: patch a ViT in place with any registered method, and undo it.

The model's class and each block's class are swapped for thin subclasses (never copies of timm's code): the block
subclass reduces tokens before its attention or between its attention and MLP; everything else (LayerScale, q/k norm,
drop-path, prefix tokens, fused attention, rotary embeddings) is timm's own. What differs between model families
(timm VisionTransformer, timm Eva) sits behind the small adapter interface of :mod:`tpsvit.families`; this module is
the family-free engine. Per-forward state (keep masks, ToMe sizes, grid positions, the trace) lives on a small
runtime object shared by the model and its blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tpsvit.config import DEFAULT_LOCATIONS, TPSConfig, make_config
from tpsvit.errors import InvalidArgumentError
from tpsvit.families import Family, family_of
from tpsvit.methods import CLASS_FREE_SCORER, keep_count, tome_merge_count
from tpsvit.reducers import Reduction, bipartite_merge, drop_reduce, fuse_one_reduce, squeeze_reduce
from tpsvit.scoring import (
    TokenPredictor,
    attention_received,
    class_attention_qk,
    gumbel_keep,
    random_scores,
    split_qkv,
    top_k_mask,
    top_k_split,
)
from tpsvit.squeeze import squeeze_masked
from tpsvit.trace import LocationTrace, Trace

PREDICTORS = "tps_predictors"  # state_dict prefix of the learned predictors (dTPS, DynamicViT)


@dataclass
class ForwardState:
    """What one forward pass of a patched model carries from block to block (read it with :func:`forward_state`).

    Attributes:
        masked: True on the full-length training path (learned methods in train mode): tokens are masked, not removed.
        policy: (B, N_tokens) keep mask incl. prefix tokens on the masked path, else None.
        decisions: per location, the (B, N_patches) keep mask after it (masked path; straight-through gradients).
        size: (B, N_tokens, 1) original tokens each token stands for (ToMe), else None.
        positions: (B, N_patch_tokens) original grid index of each current patch token (-1: EViT's fused token)
            on the gather path, None before the first reduction. Per-token extras follow from it: an Eva block gathers
            the rotary rows of these positions (:func:`tpsvit.families.gather_rope`).
        ranking: masked path with ``record_class_attention``: per location, (predictor keep log-probs (B, N, 2),
            the block's class attention over the alive tokens (B, N), the alive mask before it (B, N)).
    """

    masked: bool
    policy: Tensor | None = None
    decisions: list[Tensor] = field(default_factory=list)
    size: Tensor | None = None
    positions: Tensor | None = None
    ranking: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


class _Runtime:
    """Shared by a patched model and its blocks: the config, the trace and the current forward state."""

    def __init__(self, config: TPSConfig, grid_size, family: Family):
        self.config = config
        self.grid_size = grid_size
        self.family = family
        self.state: ForwardState | None = None
        self.trace: Trace | None = None
        self.force_masked = False  # tests: run the masked path with top-k decisions in eval mode
        self.training_decisions = "gumbel"  # masked path in train mode: "gumbel" samples or "topk" by score
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
            return self.family.attention(block, x, extras, _size_bias(state.size, x.dtype), False)
        return self.family.attention(block, x, extras, attn_mask, is_causal)

    def reduce(self, block: nn.Module, x: Tensor, extras: dict) -> Tensor:
        """The reduction step of ``block`` (a no-op away from its locations)."""
        return _reduce(block, x, self, extras)


def _size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """ToMe's proportional attention: log(size) added to every key's logit, (B, 1, 1, N)."""
    return size.log().to(dtype)[:, None, None, :, 0]


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, policy: Tensor, dropout=None) -> Tensor:
    """Attention (B, H, N, D) where each query sees only kept tokens and itself (DynamicViT's masked softmax).

    ``policy`` (B, N) is multiplied into the exponentiated logits, so straight-through gradients reach the keep
    decisions; ``dropout`` (a callable, e.g. the attention's dropout module) is applied to the weights.
    """
    logits = ((q * scale) @ k.transpose(-2, -1)).float()  # (B, H, N, N)
    allowed = policy.float()[:, None, None, :]
    eye = torch.eye(q.shape[2], device=q.device, dtype=allowed.dtype)
    allowed = allowed + (1.0 - allowed) * eye  # a query always sees itself
    peak = logits.masked_fill(allowed <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(logits - peak) * allowed
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v


def masked_attention(attn: nn.Module, x: Tensor, policy: Tensor) -> Tensor:
    """timm ``Attention`` where each query sees only kept tokens and itself (DynamicViT's masked softmax).

    ``policy`` (B, N) is multiplied into the exponentiated logits, so straight-through gradients reach the keep
    decisions. Used on the full-length training path only; inference keeps timm's fused attention.
    """
    batch, tokens, _ = x.shape
    q, k, v = split_qkv(attn, attn.qkv(x))
    out = masked_softmax_attention(q, k, v, attn.scale, policy, attn.attn_drop)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


# ----------------------------------------------------------------------------------------------- reduction step


def _reduce(block: nn.Module, x: Tensor, runtime: _Runtime, extras: dict) -> Tensor:
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
        if spec.reducer == "squeeze":
            result = squeeze_reduce(patches, kept, pruned, config.temperature)
        elif spec.reducer == "drop":
            result = drop_reduce(patches, kept, pruned)
        else:
            result = fuse_one_reduce(patches, kept, pruned, scores, config.fuse)
    _track(block, state, runtime, result, scores, n)
    return torch.cat([prefix, result.tokens], dim=1)


def _scores(block: nn.Module, patches: Tensor, capture, extras: dict, state: ForwardState, runtime: _Runtime) -> Tensor:
    config = runtime.config
    if config.scorer == "random":
        return random_scores(patches.shape[:2], patches.device)
    if config.spec.scorer == "predictor":
        return block._tps_predictor(patches)[..., 0]
    q, k = runtime.family.query_key(block, capture, extras)
    bias = _size_bias(state.size, k.dtype) if state.size is not None else None
    if config.scorer == CLASS_FREE_SCORER:
        return attention_received(q, k, runtime.family.attn_scale(block), config.num_prefix_tokens, bias)
    return class_attention_qk(q, k, runtime.family.attn_scale(block), config.num_prefix_tokens, bias)


def _track(block, state: ForwardState, runtime: _Runtime, result: Reduction, scores, n: int) -> None:
    """Carry grid positions forward and, when tracing, record the step."""
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


def _reduce_masked(block: nn.Module, x: Tensor, runtime: _Runtime, reduction: dict, extras: dict) -> Tensor:
    """Full-length path: decide keep masks (Gumbel in training, else top-k), squeeze by mask, carry the policy."""
    config, state = runtime.config, runtime.state
    prefix_len = config.num_prefix_tokens
    prefix, patches = x[:, :prefix_len], x[:, prefix_len:]
    batch, n = patches.shape[:2]
    prev = state.policy[:, prefix_len:] if state.policy is not None else patches.new_ones(batch, n)
    if config.scorer == "random":
        keep = top_k_mask(random_scores((batch, n), x.device), prev, reduction["keep_rate"])
    else:
        log_probs = block._tps_predictor(patches, prev)
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
        patches = squeeze_masked(patches, keep, prev, config.temperature)
    state.policy = torch.cat([keep.new_ones(batch, prefix_len), keep], dim=1)
    state.decisions.append(keep)
    return torch.cat([prefix, patches], dim=1)


# --------------------------------------------------------------------------------------------------- model mixin


class _Patched:
    """Base of every model mixin (one per family): exposes ``model.tps``."""

    @property
    def tps(self) -> TPSConfig:
        """The validated configuration of the patch."""
        return self._tps_runtime.config


class _TPSModel(_Patched):
    """Mixed into the model (timm ``VisionTransformer`` or ``Eva``): starts a fresh forward state per pass; exposes
    ``model.tps``; pools only the kept tokens on the masked path."""

    def forward_features(self, *args, **kwargs):
        self._tps_runtime.begin(self)
        return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        self._tps_runtime.begin(self)
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        state = self._tps_runtime.state
        pool_type = self.global_pool if pool_type is None else pool_type
        if state is not None and state.policy is not None and pool_type == "avg" and self.attn_pool is None:
            keep = state.policy[:, self.num_prefix_tokens :, None].to(x.dtype)
            return (x[:, self.num_prefix_tokens :] * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        if state is not None and state.policy is not None and pool_type not in ("token", "avg", ""):
            raise ValueError(f"pooling {pool_type!r} is not supported on the masked training path; use token or avg")
        return super().pool(x, pool_type)


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    key = (base, mixin)
    if key not in _CLASS_CACHE:
        cls = type(f"TPS{base.__name__}", (mixin, base), {"_tps_base": base})
        cls.__module__ = __name__
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


# ----------------------------------------------------------------------------------------------------- public API


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` is currently patched by tpsvit."""
    return isinstance(model, _Patched)


def patch(
    model: nn.Module,
    method: str = "etps",
    keep_rate=0.7,
    locations=DEFAULT_LOCATIONS,
    *,
    r=None,
    temperature: float = 1.0,
    scorer: str = "default",
    fuse: str = "sum",
) -> nn.Module:
    """Patch a timm VisionTransformer or Eva, or a transformers ViT, in place with a token-reduction method; returns
    the model.

    Args:
        model: a timm ``VisionTransformer`` (DeiT, ViT, DeiT-III, distilled DeiT, register-token ViTs, CLIP, SigLIP,
            ...), a timm ``Eva`` (EVA-02, DINOv3, Perception Encoder, RoPE ViTs: rotary angles follow the tokens) or
            a Hugging Face ViT / DeiT, DINOv2 (+registers, backbones), CLIP or SigLIP vision model (:mod:`tpsvit.hf`).
        method: ``"etps"``, ``"dtps"`` (TPS) or a baseline: ``"evit"``, ``"dynamicvit"``, ``"tome"``.
        keep_rate: keep rate in (0, 1], one for all locations or one per location, relative to the patch tokens
            alive at that location (kept = ceil(keep_rate * n)). The DynamicViT / TPS releases count from the initial
            tokens instead (floor(N * ratio^i)); :func:`tpsvit.methods.release_keep_rates` converts.
        locations: 0-based block indices where tokens are reduced (paper: 3, 6, 9).
        r: ToMe only: tokens merged per location instead of a keep rate; with the default locations, ToMe's usual
            "r in every block".
        temperature: similarity temperature of the squeeze (etps, dtps).
        scorer: ``"random"`` replaces the method's scorer by random scores (robustness studies);
            ``"attention_received"`` (etps / evit, beyond the paper) scores each patch token by the attention it
            receives, averaged over all queries and heads, instead of the class token's row. It is the default, with
            a warning, on a model without a class token (SigLIP-style, ``class_token=False``, ``global_pool='avg'``).
        fuse: EViT only: ``"sum"`` (the release: the pruned tokens' class-attention-weighted sum) or ``"mean"``
            (those weights renormalised to a weighted mean; not in the release).

    Re-patching a patched model unpatches it first; learned predictors at locations that stay are kept.
    """
    family = family_of(model)
    blocks = family.blocks(model)
    config = make_config(
        method, len(blocks), family.num_prefix_tokens(model), keep_rate, locations, r, temperature, scorer, fuse,
        class_token=family.has_class_token(model),
    )
    grid = family.grid_size(model)
    if config.r is not None and grid is not None and max(config.r) > grid[0] * grid[1] // 2:
        raise InvalidArgumentError(
            f"r={max(config.r)} is more than ToMe can merge in one block: at most half of the {grid[0] * grid[1]} "
            f"patch tokens ({grid[0] * grid[1] // 2}); later blocks merge at most half of what is left"
        )
    if scorer == "default" and config.scorer == CLASS_FREE_SCORER:
        warnings.warn(
            f"tpsvit: this model has no class token, so {config.method} scores tokens by the attention they receive "
            f"(scorer={CLASS_FREE_SCORER!r}, beyond the paper) instead of class-token attention",
            UserWarning, stacklevel=2,
        )
    previous = getattr(model, PREDICTORS, None) if is_patched(model) else None
    unpatch(model)  # only once the new patch is known to be valid: a bad call leaves the model as it was
    runtime = _Runtime(config, family.grid_size(model), family)
    predictors = _make_predictors(model, config, previous, family.embed_dim(model))
    model.__class__ = _subclass(type(model), family.model_mixin or _TPSModel)
    model._tps_runtime = runtime
    if predictors is not None:
        setattr(model, PREDICTORS, predictors)
    captures = config.spec.scorer in ("cls_attention", "matching") and config.scorer in ("default", CLASS_FREE_SCORER)
    for index, block in enumerate(blocks):
        block.__class__ = _subclass(type(block), family.block_mixin)
        block._tps_runtime = runtime
        block._tps_index = index
        block._tps_placement = config.spec.placement if index in config.locations else None
        if predictors is not None and index in config.locations:
            object.__setattr__(block, "_tps_predictor", predictors[str(index)])  # not registered: no duplicate keys
        if captures and index in config.locations:
            family.install(block)
    family.attach(model, runtime)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock timm model in place (classes, state_dict keys); learned predictors are removed."""
    if not is_patched(model):
        return model
    family = model._tps_runtime.family
    family.detach(model)
    for block in family.blocks(model):
        block.__class__ = block._tps_base
        for name in ("_tps_runtime", "_tps_index", "_tps_placement", "_tps_predictor"):
            block.__dict__.pop(name, None)
        family.uninstall(block)
    if PREDICTORS in model._modules:
        del model._modules[PREDICTORS]
    del model._tps_runtime
    model.__class__ = model._tps_base
    return model


def set_predictor_training(model: nn.Module, decisions: str = "gumbel", record_class_attention: bool = False) -> None:
    """How a patched dtps/dynamicvit model decides in train mode: ``"gumbel"`` (the paper's straight-through samples)
    or ``"topk"`` (the inference decisions); ``record_class_attention`` fills :attr:`ForwardState.ranking` for the
    predictors' class-attention distillation (:func:`tpsvit.train.losses.attention_ranking_loss`)."""
    if decisions not in ("gumbel", "topk"):
        raise ValueError(f"decisions {decisions!r}; allowed: gumbel, topk")
    runtime = _runtime(model)
    runtime.training_decisions, runtime.record_class_attention = decisions, bool(record_class_attention)


def set_keep_rate(model: nn.Module, keep_rate) -> TPSConfig:
    """Change the keep rates of a patched model without touching its weights (e.g. to anneal while fine-tuning)."""
    runtime = _runtime(model)
    runtime.config = runtime.config.with_keep_rate(keep_rate)
    return runtime.config


def forward_state(model: nn.Module) -> ForwardState:
    """The :class:`ForwardState` of the last forward pass of a patched model (keep decisions, positions, sizes)."""
    state = _runtime(model).state
    if state is None:
        raise ValueError("the patched model has not run a forward pass yet")
    return state


@contextmanager
def tracing(model: nn.Module) -> Iterator[Trace]:
    """Record what the patched model does to its tokens; the yielded :class:`Trace` holds the last forward pass.

    >>> with tpsvit.tracing(model) as trace:
    ...     model(images)
    >>> trace.locations[0].kept, trace.locations[0].host
    """
    runtime = _runtime(model)
    trace, before = Trace(), runtime.trace
    runtime.trace = trace
    try:
        yield trace
    finally:
        runtime.trace = before


def _runtime(model: nn.Module) -> _Runtime:
    if not is_patched(model):
        raise ValueError("this model is not patched; call tpsvit.patch(model, ...) first")
    return model._tps_runtime


def _make_predictors(
    model: nn.Module, config: TPSConfig, previous: nn.ModuleDict | None, dim: int
) -> nn.ModuleDict | None:
    if not config.spec.learned:
        return None
    reference = next(model.parameters())
    predictors = nn.ModuleDict()
    for loc in config.locations:
        old = previous[str(loc)] if previous is not None and str(loc) in previous else None
        predictors[str(loc)] = old if old is not None else TokenPredictor(dim).to(reference.device, reference.dtype)
    return predictors
