"""The seam interface: what :mod:`tpsvit.vlm.patch` needs from one VLM class, and the parts 1-D-position models
(LLaVA, PaliGemma) share: a q/k capture on the vision tower, a pre-hook that reduces the projector's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tpsvit.errors import InvalidArgumentError
from tpsvit.vlm.methods.base import Context, Selection, select
from tpsvit.vlm.methods.pool import pool_grid
from tpsvit.vlm.tower import TowerCapture


@dataclass
class VLMState:
    """Everything a patch holds on the model (``model._tps_vlm``)."""

    config: object  # VLMConfig
    seam: Seam
    method: object  # VLMMethod
    capture: object | None = None
    handles: list = field(default_factory=list)
    selection: Selection | None = None
    active: bool = False
    full: int = 0  # tokens per image before the reduction, in the last encoding
    rope_deltas: object = None  # Qwen2.5-VL: the full prompt's rope deltas, until the shrink adjusts them
    last_counts: list[int] = field(default_factory=list)
    last_kept: list = field(default_factory=list)  # per image: indices (K,) of the tokens whose places are kept
    decode_offset: Tensor | None = None  # per row: columns the last prompt lost ("original" positions go on after)


class Seam:
    """One VLM class: where its visual features are reduced and how its inputs are shrunk to match."""

    classes: tuple[str, ...] = ()
    positions = ("original", "compact")
    text_row = False  # position_ids carry a compact text row first (Qwen2.5-VL in generate)
    continues_positions = True  # a hand-written decoding loop needs the "original" offset (Qwen: its rope deltas)
    # tensors aligned with input_ids (last dim) and the value their new padding takes; None: the model's pad token
    sequence_pads: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "labels": -100, "position_ids": 0}

    def depth(self, model: nn.Module) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def default_layer(self, model: nn.Module) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def full_tokens(self, model: nn.Module) -> int | None:
        """Visual tokens per image without reduction, when the model fixes it (else None)."""
        return None

    def check(self, model: nn.Module, config) -> None:
        """Refuse, at patch time, a budget this model's fixed grid cannot give (pool)."""

    def attach(self, model: nn.Module, state: VLMState) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def detach(self, model: nn.Module, state: VLMState) -> None:
        for handle in state.handles:
            handle.remove()
        state.handles.clear()
        if state.capture is not None:
            state.capture.remove()

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def pad_token_id(self, model: nn.Module) -> int:
        for config in (model.config, model.config.get_text_config()):
            pad = getattr(config, "pad_token_id", None)
            if pad is not None and pad != self.image_token_id(model):
                return int(pad)
        return 0

    def encode(self, model: nn.Module, kwargs: dict, state: VLMState):  # pragma: no cover - interface
        """(the image encoder output to pass as ``mm_encoder_outputs["image"]``, [(n, kept columns (K,))] per
        image in order)."""
        raise NotImplementedError

    def forward_positions(self, model: nn.Module, input_ids: Tensor, past: int) -> Tensor:
        """The positions the language model gives a full-length prompt when ``position_ids`` is None."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past
        return positions.expand(input_ids.shape[0], -1)

    def base_positions(self, model: nn.Module, kwargs: dict, generating: bool) -> Tensor:
        """Full-length positions of the prompt: the user's, generate's (from the mask) or the forward default."""
        given = kwargs.get("position_ids")
        if given is not None:
            return given
        input_ids = kwargs["input_ids"]
        if generating:
            mask = {"attention_mask": kwargs.get("attention_mask")}
            return model._prepare_position_ids_for_generation(input_ids, mask)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        return self.forward_positions(model, input_ids, past)

    def after_shrink(self, model: nn.Module, removed: Tensor) -> None:
        """Hook for state the model keeps about its sequence length (Qwen2.5-VL's rope deltas)."""


def feature_grid(tower_config, patches: int) -> tuple[int, int] | None:
    """(h, w) of ``patches`` tokens: the tower's configured grid if it has that many, a square if one fits."""
    size, patch = getattr(tower_config, "image_size", None), getattr(tower_config, "patch_size", None)
    if size is not None and patch is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = size[0] // patch[0], size[1] // patch[1]
        if h * w == patches:
            return h, w
    side = int(round(patches ** 0.5))
    return (side, side) if side * side == patches else None


class ProjectorSeam(Seam):
    """Models whose projector maps each vision token on its own (LLaVA, PaliGemma): the projector's input is
    reduced by a forward pre-hook, with scores from a q/k capture on the tower's scoring layer."""

    def tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def depth(self, model):
        return TowerCapture.depth(self.tower(model))

    def full_tokens(self, model):
        config = self.tower(model).config
        grid = feature_grid(config, (config.image_size // config.patch_size) ** 2)
        return None if grid is None else grid[0] * grid[1]

    def prefix(self, model) -> int:
        """Class tokens at the head of the projector's inputs (always kept)."""
        return 0

    def check(self, model, config):
        full = self.full_tokens(model)
        if full is None:
            return
        prefix = self.prefix(model)
        if config.budget(full) <= prefix:
            raise InvalidArgumentError(f"tokens={config.budget(full)} leaves no patch token: the projector's inputs "
                                       f"start with {prefix} class token(s) that are always kept")
        if config.method != "pool":
            return
        grid = feature_grid(self.tower(model).config, full - prefix)
        budget = config.budget(full)
        if grid is not None and budget < full:
            pool_grid(budget - prefix, *grid)

    def attach(self, model, state):
        state.capture = TowerCapture(self.tower(model), state.config.layer)
        tower_config = self.tower(model).config

        def reduce_inputs(module, args):
            if not state.active:
                return None
            return (self.reduce(args[0], state, tower_config), *args[1:])

        state.handles.append(self.projector(model).register_forward_pre_hook(reduce_inputs))

    def reduce(self, x: Tensor, state: VLMState, tower_config) -> Tensor:
        """The projector's input (B, n, C) -> (B, K, C); the selection is kept on ``state``."""
        capture = state.capture
        q, k = capture.take()
        offset = q.shape[2] - x.shape[1]  # 1 when the select strategy dropped the class token
        if offset not in (0, 1):
            raise InvalidArgumentError(f"the projector receives {x.shape[1]} tokens for {q.shape[2]} tower tokens; "
                                       "tpsvit.vlm cannot tell which token is which")
        prefix = int(offset == 0 and capture.class_token)
        start = offset + prefix
        ctx = Context(
            grid=feature_grid(tower_config, x.shape[1] - prefix),
            score_fn=lambda: capture.scores(q, k)[:, start:],
            keys_fn=lambda: capture.keys(k)[:, start:],
            scorer="class attention" if capture.class_token else "attention received",
        )
        state.full = x.shape[1]
        state.selection = select(state.method, x, state.config.budget(x.shape[1]), prefix, ctx)
        return state.selection.tokens

    def run_encoder(self, model, kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, model, kwargs, state):
        state.active, state.selection = True, None
        try:
            out = self.run_encoder(model, kwargs)
        finally:
            state.active = False
        selection = state.selection
        if selection is None:
            raise InvalidArgumentError("the model's projector did not run on the image features")
        n = state.full
        parts = selection.per_image()
        out.pooler_output = self.features_output(out.pooler_output, [t.shape[0] for t, _ in parts])
        return out, [(n, rep) for _, rep in parts]

    def features_output(self, pooled, counts: list[int]):
        """The projected features with each image's padding (adaptive methods) removed."""
        return [f[:c] for f, c in zip(pooled, counts)]
