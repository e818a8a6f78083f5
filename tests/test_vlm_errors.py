"""tpsvit.vlm refuses bad arguments and unsupported models with one line naming what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vlm_tiny import case

import tpsvit.vlm as vlm
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError


@pytest.fixture(scope="module")
def llava():
    return case("llava-clip")


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fastv", tokens=4), "unknown tpsvit.vlm method 'fastv'; choose one of tps, drop, random"),
    (dict(method="tps"), "needs tokens=N"),
    (dict(method="tps", tokens=0), "positive int"),
    (dict(method="tps", tokens=2.5), "positive int"),
    (dict(method="tps", tokens=True), "positive int"),
    (dict(method="tps", keep_rate=0.0), r"keep_rate must be a number in \(0, 1\]"),
    (dict(method="tps", keep_rate=1.5), r"keep_rate must be a number in \(0, 1\]"),
    (dict(method="tps", tokens=4, keep_rate=0.5), "not both"),
    (dict(method="tps", tokens=17), "exceeds the 16 visual tokens"),
    (dict(method="tps", tokens=4, positions="absolute"), r"positions must be one of \('original', 'compact'\)"),
    (dict(method="tps", tokens=4, layer=3), r"layer must be an int in \[-3, 2\]"),
    (dict(method="pool", tokens=7), r"pool needs tokens = a \* b"),
])
def test_bad_arguments_are_refused(llava, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        vlm.patch(llava.model, **kwargs)
    assert not vlm.is_patched(llava.model)


def test_qwen_takes_original_positions_only():
    with pytest.raises(InvalidArgumentError, match=r"Qwen2_5_VLForConditionalGeneration takes positions \('orig"):
        vlm.patch(case("qwen").model, "tps", tokens=4, positions="compact")


def test_a_class_token_budget_is_refused():
    with pytest.raises(InvalidArgumentError, match="class token"):
        vlm.patch(case("llava-full").model, "tps", tokens=1)


@pytest.mark.parametrize("name, why", [
    ("Idefics3ForConditionalGeneration", "pixel-shuffles the full patch grid"),
    ("SmolVLMForConditionalGeneration", "pixel-shuffles the full patch grid"),
    ("LlavaNextForConditionalGeneration", "anyres tiling"),
    ("BlipForConditionalGeneration", "not a vision-language model class tpsvit.vlm knows"),
])
def test_unsupported_models_get_one_line_naming_the_supported_ones(name, why):
    model = type(name, (nn.Module,), {})()
    with pytest.raises(UnsupportedModelError) as error:
        vlm.patch(model, "tps", tokens=4)
    message = str(error.value)
    assert why in message and "\n" not in message
    assert message.endswith("supported: LlavaForConditionalGeneration, PaliGemmaForConditionalGeneration, "
                            "Qwen2_5_VLForConditionalGeneration")


def test_a_real_llava_next_is_refused():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=8),
                             text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="LlavaNextForConditionalGeneration: its anyres tiling"):
        vlm.patch(LlavaNextForConditionalGeneration(config), "tps", tokens=4)


def test_an_unpatched_model_cannot_be_unpatched_or_read(llava):
    with pytest.raises(InvalidArgumentError, match="not patched"):
        vlm.unpatch(llava.model)
    with pytest.raises(InvalidArgumentError, match="not patched"):
        vlm.kept_counts(llava.model)


def test_inputs_that_cannot_be_reduced_are_refused():
    c = case("llava-clip")
    inputs = c.inputs()
    vlm.patch(c.model, "tps", tokens=4)
    embeds = c.model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(InvalidArgumentError, match="needs input_ids"), torch.no_grad():
        c.model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])
    short = inputs["input_ids"][:, 1:]
    with pytest.raises(InvalidArgumentError, match="holds 15 image placeholder tokens .* give 16 features"):
        c.model(input_ids=short[:, [i for i in range(short.shape[1]) if i != 5]], pixel_values=inputs["pixel_values"])
