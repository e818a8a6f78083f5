"""One forward's or one generate's preparation: encode the images with the reduction, shrink every tensor aligned
with ``input_ids`` to the kept counts, give the kept tokens their positions, hand the features over as
``mm_encoder_outputs`` so the model's own forward runs unchanged on the shorter sequence."""

from __future__ import annotations

import torch

from tpsvit.errors import InvalidArgumentError
from tpsvit.vlm.placeholders import keep_columns, padding_side, removed_before, shrink


def prepare(model, kwargs: dict, generating: bool) -> dict:
    """``kwargs`` of the model's forward (or of generate) with images -> the same call on the reduced sequence."""
    state = model._tps_vlm
    seam = state.seam
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise InvalidArgumentError("tpsvit.vlm needs input_ids with the image placeholder tokens (it shrinks their "
                                   "runs); inputs_embeds alone cannot be reduced")
    if kwargs.get("pixel_values_videos") is not None:
        raise InvalidArgumentError("tpsvit.vlm reduces image tokens; pixel_values_videos is not supported")
    encoded, images = seam.encode(model, kwargs, state)
    state.last_counts = [int(rep.numel()) for _, rep in images]
    state.last_kept = [rep.detach().cpu() for _, rep in images]
    keep = keep_columns(input_ids, seam.image_token_id(model), images)
    out = dict(kwargs)
    out["position_ids"] = seam.base_positions(model, kwargs, generating)
    if out.get("attention_mask") is None and len(set(keep.sum(dim=1).tolist())) > 1:
        out["attention_mask"] = torch.ones_like(input_ids)  # rows of different lengths need padding now
    side = padding_side(out.get("attention_mask"))
    pads = {**seam.sequence_pads, "input_ids": seam.pad_token_id(model)}
    for name, pad in pads.items():
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == keep.shape[1] and value.dim() >= 2:
            out[name] = shrink(value, keep, pad, side)
    shift = shrink(removed_before(keep), keep, 0, side)
    positions = out["position_ids"]
    if state.config.positions == "compact":
        out["position_ids"] = positions - shift
    elif seam.text_row and positions.dim() == 3 and positions.shape[0] == 4:
        out["position_ids"] = torch.cat([positions[:1] - shift, positions[1:]])  # the text row stays compact
    removed = (~keep).sum(dim=1)
    seam.after_shrink(model, removed)
    # without position_ids a decoding step sits at the cache length; the full prompt would have put it this much later
    lost = keep.shape[1] - out["input_ids"].shape[1]
    state.decode_offset = removed.new_full(removed.shape, lost) if state.config.positions == "original" else None
    out["pixel_values"] = None
    out["mm_encoder_outputs"] = {"image": encoded}
    return out


def continue_positions(model, kwargs: dict) -> dict:
    """A decoding step of a hand-written loop (cache, no images, no position_ids) after a reduced prompt with
    "original" positions: the new tokens' positions continue the full prompt's, as generate's do."""
    state = model._tps_vlm
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    offset, input_ids = state.decode_offset, kwargs.get("input_ids")
    if offset is None or kwargs.get("position_ids") is not None or cache is None or input_ids is None:
        return kwargs
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    if past == 0 or offset.shape[0] != input_ids.shape[0]:
        return kwargs
    positions = state.seam.forward_positions(model, input_ids, past)
    return {**kwargs, "position_ids": positions + offset.to(positions.device).view(-1, 1)}


def restore_prompt(output, prompt: torch.Tensor, reduced_length: int):
    """generate's output with the user's full prompt in front of the new tokens instead of the reduced one, so
    ``output[:, inputs["input_ids"].shape[1]:]`` is still the generated text."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    repeat = sequences.shape[0] // prompt.shape[0]
    full = torch.cat([prompt.repeat_interleave(repeat, dim=0).to(sequences.device), sequences[:, reduced_length:]],
                     dim=1)
    if isinstance(output, torch.Tensor):
        return full
    output.sequences = full
    return output
