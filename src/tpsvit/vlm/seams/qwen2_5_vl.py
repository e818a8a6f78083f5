"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): the merged tokens after the 2x2 patch merger are reduced, per
image (images differ in size). Kept tokens keep their multimodal rotary (t, h, w) positions: positions come from the
model's own ``get_rope_index`` on the full prompt, and the kept columns keep theirs.

Scores come from q/k of one vision block, captured by hooks (the block keeps its fused attention): the attention each
patch receives within the segments that block attends over (whole images on full-attention blocks, windows on the
others), with the block's rotary embedding applied, averaged over the 2x2 patches of each merged token. The blocks run
in window order; ``get_vision_window_index`` gives the merged tokens' original order back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpsvit.core.scoring import attention_received
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.vlm.methods.base import Context, select
from tpsvit.vlm.seams.base import Seam


class QwenCapture:
    """Hooks on one vision block: its attention's inputs (segments, rotary angles) and its qkv projection's output."""

    def __init__(self, block):
        self.attn = block.attn
        self.seen: dict = {}

        def inputs(module, args, kwargs):
            self.seen["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            self.seen["rotary"] = kwargs.get("position_embeddings")

        def qkv(module, args, output):
            self.seen["qkv"] = output

        self.handles = [self.attn.register_forward_pre_hook(inputs, with_kwargs=True),
                        self.attn.qkv.register_forward_hook(qkv)]

    def take(self) -> tuple[Tensor, Tensor]:
        """(scores (seq,), keys (seq, D)) of every patch of the last forward, in the blocks' (window) order."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        seen, self.seen = self.seen, {}
        if "qkv" not in seen:
            raise UnsupportedModelError("the vision block tpsvit.vlm scores with did not run in this forward pass")
        heads = self.attn.num_heads
        q, k, _ = seen["qkv"].reshape(seen["qkv"].shape[0], 3, heads, -1).unbind(1)  # (seq, H, D) each
        keys = k.float().mean(dim=1)
        if seen["rotary"] is not None:
            q, k = apply_rotary_pos_emb_vision(q, k, *seen["rotary"])
        bounds = seen["cu_seqlens"].tolist()
        scores = torch.cat([
            attention_received(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], self.attn.scaling, 0)[0]
            for a, b in zip(bounds[:-1], bounds[1:])
        ])
        return scores, keys

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class QwenSeam(Seam):
    classes = ("Qwen2_5_VLForConditionalGeneration",)
    positions = ("original",)
    text_row = True
    continues_positions = False
    sequence_pads = {**Seam.sequence_pads, "mm_token_type_ids": 0}

    def depth(self, model):
        return len(model.model.visual.blocks)

    def default_layer(self, model):
        return self.depth(model) - 1

    def attach(self, model, state):
        state.capture = QwenCapture(model.model.visual.blocks[state.config.layer])

    def encode(self, model, kwargs, state):
        from transformers.vision_utils import get_vision_window_index

        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise InvalidArgumentError("Qwen2.5-VL needs image_grid_thw with pixel_values (the processor gives it)")
        if bool((grid[:, 0] != 1).any()):
            raise InvalidArgumentError(f"tpsvit.vlm reduces still images (t = 1); image_grid_thw has t = "
                                       f"{grid[:, 0].tolist()}")
        visual = model.model.visual
        out = model.model.get_image_features(kwargs["pixel_values"], grid, return_dict=True)
        scores, keys = state.capture.take()
        unit = visual.spatial_merge_size ** 2
        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        order = torch.argsort(window_index.to(scores.device))  # merged tokens: original order from window order
        scores = scores.view(-1, unit).mean(dim=1)[order]
        keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)[order]
        features, images, start = [], [], 0
        for x, (_, h, w) in zip(out.pooler_output, grid.tolist()):
            n = x.shape[0]
            span = slice(start, start + n)
            ctx = Context(grid=(h // visual.spatial_merge_size, w // visual.spatial_merge_size),
                          score_fn=lambda span=span: scores[span][None], keys_fn=lambda span=span: keys[span][None],
                          scorer="attention received")
            selection = select(state.method, x[None], state.config.budget(n), 0, ctx)
            (tokens, rep), = selection.per_image()
            features.append(tokens)
            images.append((n, rep))
            start += n
        out.pooler_output = tuple(features)
        return out, images

    def base_positions(self, model, kwargs, generating):
        state = model._tps_vlm
        state.rope_deltas = None
        given = kwargs.get("position_ids")
        if given is not None:
            return given
        input_ids = kwargs["input_ids"]
        if generating:
            rest = {k: v for k, v in kwargs.items() if k != "input_ids" and v is not None}
            positions = model._prepare_position_ids_for_generation(input_ids, rest)
            state.rope_deltas = model.model.rope_deltas
            return positions
        if kwargs.get("mm_token_type_ids") is None:  # the model itself would fall back to 1-D positions
            return super().base_positions(model, kwargs, generating).expand(3, -1, -1)
        positions, state.rope_deltas = model.model.get_rope_index(
            input_ids, kwargs["mm_token_type_ids"], image_grid_thw=kwargs.get("image_grid_thw"),
            attention_mask=kwargs.get("attention_mask"))
        return positions

    def after_shrink(self, model, removed):
        deltas = model._tps_vlm.rope_deltas
        if deltas is not None:  # decoding positions = cache length + delta: the delta grows by what was removed
            model.model.rope_deltas = deltas + removed.to(deltas.device).view(-1, 1)
