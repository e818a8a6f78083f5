"""Positions of the kept visual tokens: LLaVA / PaliGemma "original" (as in the full prompt) or "compact"
(renumbered); Qwen2.5-VL's multimodal rotary (t, h, w) positions of the kept merged tokens."""

from __future__ import annotations

import pytest
import torch
from vlm_tiny import case, language_model_inputs

import tpsvit.vlm as vlm

GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=[96, 97, 98, 99])
N = 4


def _image_columns(input_ids: torch.Tensor, row: int = 0) -> torch.Tensor:
    return (input_ids[row] == 99).nonzero().squeeze(1)


def _kept_columns(model, input_ids) -> torch.Tensor:
    """Columns of the full prompt that stay: the text and the kept images' places."""
    image = _image_columns(input_ids)
    gone = torch.ones(image.numel(), dtype=torch.bool)
    gone[vlm.kept_indices(model)[0]] = False
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    keep[image[gone]] = False
    return keep.nonzero().squeeze(1)


@pytest.mark.parametrize("name, first", [("llava-clip", 0), ("paligemma", 1)])
def test_original_positions_are_those_of_the_full_prompt(name, first):
    c = case(name)
    inputs = c.inputs()
    length = inputs["input_ids"].shape[1]
    vlm.patch(c.model, "drop", tokens=N, positions="original")
    records, hook = language_model_inputs(c.model)
    with torch.no_grad():
        c.model(**inputs)
    columns = _kept_columns(c.model, inputs["input_ids"])
    assert torch.equal(records[-1][1][0], columns + first)  # the full prompt's positions, kept columns only
    records.clear()
    c.model.generate(**inputs, **GEN)
    hook.remove()
    prefill, *steps = records
    assert torch.equal(prefill[1][0], columns + first)
    assert [int(p[1][0, -1]) for p in steps] == [length + first, length + first + 1]  # decoding goes on after them


@pytest.mark.parametrize("name, first", [("llava-clip", 0), ("paligemma", 1)])
def test_compact_positions_renumber_the_shorter_prompt(name, first):
    c = case(name)
    inputs = c.inputs()
    reduced = inputs["input_ids"].shape[1] - c.full() + N
    vlm.patch(c.model, "drop", tokens=N, positions="compact")
    records, hook = language_model_inputs(c.model)
    with torch.no_grad():
        c.model(**inputs)
    assert torch.equal(records[-1][1][0], torch.arange(reduced) + first)
    records.clear()
    c.model.generate(**inputs, **GEN)
    hook.remove()
    assert [int(p[1][0, -1]) for p in records] == [reduced - 1 + first, reduced + first, reduced + 1 + first]


def test_original_and_compact_positions_change_the_output():
    c = case("llava-clip")
    inputs = c.inputs()
    with torch.no_grad():
        original = vlm.patch(c.model, "drop", tokens=N, positions="original")(**inputs).logits
        compact = vlm.patch(c.model, "drop", tokens=N, positions="compact")(**inputs).logits
    assert original.shape == compact.shape and not torch.allclose(original, compact)


@pytest.mark.parametrize("name", ["llava-clip", "paligemma", "qwen"])
def test_a_hand_written_decoding_loop_matches_generate(name):
    c = case(name)
    inputs = c.inputs(rows=(1,))  # one prompt: no padding, which a plain forward would not mask in the loop
    vlm.patch(c.model, "tps", tokens=N)
    ids = c.model.generate(**inputs, **GEN)
    with torch.no_grad():
        out = c.model(**inputs, use_cache=True)
        mine = []
        for _ in range(GEN["max_new_tokens"]):
            logits = out.logits[:, -1]
            logits[:, GEN["suppress_tokens"]] = float("-inf")
            token = logits.argmax(dim=-1, keepdim=True)
            mine.append(token)
            out = c.model(input_ids=token, cache=out.cache, use_cache=True)
    assert torch.equal(torch.cat(mine, dim=1), ids[:, inputs["input_ids"].shape[1]:])


def test_qwen_kept_tokens_keep_their_multimodal_positions():
    c = case("qwen")
    inputs = c.inputs(rows=(0, 1))
    with torch.no_grad():
        full, _ = c.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               image_grid_thw=inputs["image_grid_thw"],
                                               attention_mask=inputs["attention_mask"])
    vlm.patch(c.model, "tome", tokens=N)
    records, hook = language_model_inputs(c.model)
    with torch.no_grad():
        c.model(**inputs)
    hook.remove()
    positions = records[-1][1]  # (3, B, L')
    for row in range(2):
        image = (inputs["input_ids"][row] == 99).nonzero().squeeze(1)
        kept = image[vlm.kept_indices(c.model)[row]]
        text = (inputs["input_ids"][row] != 99).nonzero().squeeze(1)
        columns = torch.cat([text, kept]).sort().values
        width = positions.shape[-1]
        got = positions[:, row, width - columns.numel():]  # left-padded row
        assert torch.equal(got, full[:, row, columns])
        # (t, h, w) of the kept image tokens are distinct grid places, the text after the image is unmoved
        assert len({tuple(p) for p in full[:, row, kept].T.tolist()}) == N


def test_qwen_generate_rows_continue_after_their_full_prompt():
    c = case("qwen")
    inputs = c.inputs(rows=(0, 1))
    with torch.no_grad():
        _, deltas = c.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"])
    full_next = inputs["attention_mask"].sum(dim=1) + deltas.view(-1)  # the first new token's position, unpatched
    vlm.patch(c.model, "drop", tokens=N)
    records, hook = language_model_inputs(c.model)
    c.model.generate(**inputs, **GEN)
    hook.remove()
    first_step = records[1][1]  # (4, B, 1): a text row, then t, h, w
    assert torch.equal(first_step[1:, :, 0], full_next.expand(3, -1))
