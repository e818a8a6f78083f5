"""tpsvit.vlm on tiny random LLaVA (CLIP, ViT, SigLIP towers), PaliGemma and Qwen2.5-VL: the contract of issue 22."""

from __future__ import annotations

import pytest
import torch
from vlm_tiny import BUILDERS, case, language_model_inputs

import tpsvit.vlm as vlm

MODELS = list(BUILDERS)
FIXED = [m for m in vlm.METHODS if not vlm.REGISTRY[m].adaptive]
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, suppress_tokens=[96, 97, 98, 99])  # no image ids
N = 4  # visual tokens per image after the reduction (a 2 x 2 pool of the 4 x 4 grids)


def _patch(model, method, tokens=N, **kwargs):
    return vlm.patch(model, method, tokens=None if method == "prumerge" else tokens, **kwargs)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", FIXED)
def test_the_full_count_gives_the_unpatched_logits_and_ids(name, method):
    c = case(name)
    inputs = c.inputs(rows=(0, 1))
    with torch.no_grad():
        logits = c.model(**inputs).logits
    ids = c.model.generate(**inputs, **GEN)
    vlm.patch(c.model, method, tokens=max(c.full(0), c.full(1)))
    with torch.no_grad():
        assert torch.equal(c.model(**inputs).logits, logits)
    assert torch.equal(c.model.generate(**inputs, **GEN), ids)
    assert vlm.kept_counts(c.model) == [c.full(0), c.full(1)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", vlm.METHODS)
def test_the_language_model_sees_the_kept_tokens_only(name, method):
    c = case(name)
    inputs = c.inputs()
    length = inputs["input_ids"].shape[1]
    _patch(c.model, method)
    records, hook = language_model_inputs(c.model)
    with torch.no_grad():
        out = c.model(**inputs)
    hook.remove()
    kept = vlm.kept_counts(c.model)[0]
    assert kept == N or (method == "prumerge" and 1 <= kept < c.full())
    assert records[0][0] == length - c.full() + kept == out.logits.shape[1]
    indices = vlm.kept_indices(c.model)[0]
    assert indices.numel() == kept and bool((indices.diff() > 0).all()) and 0 <= int(indices.min())
    assert int(indices.max()) < c.full()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", vlm.METHODS)
def test_generate_with_cache_gives_the_ids_of_generate_without(name, method):
    c = case(name)
    inputs = c.inputs(rows=(0, 1))
    _patch(c.model, method)
    torch.manual_seed(0)
    cached = c.model.generate(**inputs, **GEN)
    torch.manual_seed(0)
    uncached = c.model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # the user's prompt, in full


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["tps", "prumerge"])
def test_each_prompt_of_a_batch_gets_what_it_gets_alone(name, method):
    c = case(name)
    rows = (0, 1, 2)
    _patch(c.model, method)
    batch = c.inputs(rows)
    generated = c.model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
    counts = vlm.kept_counts(c.model)
    with torch.no_grad():
        last = c.model(**batch).logits[:, -1]
    for i, row in enumerate(rows):
        alone = c.inputs((row,))
        assert torch.equal(c.model.generate(**alone, **GEN)[:, alone["input_ids"].shape[1]:], generated[i:i + 1])
        assert vlm.kept_counts(c.model) == [counts[i]]
        with torch.no_grad():
            torch.testing.assert_close(c.model(**alone).logits[:, -1], last[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llava-clip", "paligemma", "qwen"])
def test_the_kv_cache_holds_the_reduced_sequence(name):
    c = case(name)
    inputs = c.inputs()
    vlm.patch(c.model, "tps", tokens=N)
    out = c.model.generate(**inputs, **GEN, return_dict_in_generate=True)
    reduced = inputs["input_ids"].shape[1] - c.full() + N
    assert out.cache.get_seq_length() == reduced + GEN["max_new_tokens"] - 1
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + GEN["max_new_tokens"]


@pytest.mark.parametrize("name", MODELS)
def test_unpatch_restores_the_model(name):
    c = case(name)
    inputs = c.inputs(rows=(0, 1))
    with torch.no_grad():
        logits = c.model(**inputs).logits
    cls, hooks, keys = type(c.model), _hooks(c.model), list(c.model.state_dict())  # after transformers' own hooks
    vlm.patch(c.model, "visionzip", tokens=N)
    assert vlm.is_patched(c.model) and _hooks(c.model) > hooks
    assert c.model.tps_vlm.method == "visionzip" and c.model.tps_vlm.tokens == N
    vlm.patch(c.model, "tome", tokens=N)  # re-patching replaces the patch
    assert c.model.tps_vlm.method == "tome"
    assert list(c.model.state_dict()) == keys
    vlm.unpatch(c.model)
    assert type(c.model) is cls and _hooks(c.model) == hooks and not vlm.is_patched(c.model)
    assert not hasattr(c.model, "_tps_vlm")
    with torch.no_grad():
        assert torch.equal(c.model(**inputs).logits, logits)


def test_reduced_patches_inside_the_block_and_puts_back_what_was_there():
    c = case("llava-clip")
    cls = type(c.model)
    with vlm.reduced(c.model, "drop", tokens=N) as model:
        assert model is c.model and c.model.tps_vlm.method == "drop"
        with torch.no_grad():
            c.model(**c.inputs(rows=(0, 1)))
        assert vlm.kept_counts(c.model) == [N, N]
    assert type(c.model) is cls and not vlm.is_patched(c.model)
    vlm.patch(c.model, "tome", keep_rate=0.5, positions="compact")
    before = c.model.tps_vlm
    with pytest.raises(RuntimeError, match="inside"):
        with vlm.reduced(c.model, "pool", tokens=N):
            assert c.model.tps_vlm.method == "pool"
            raise RuntimeError("an error inside the block")
    assert c.model.tps_vlm == before  # the earlier patch, not the block's, even after an error


@pytest.mark.parametrize("name", ["llava-clip", "qwen"])
def test_keep_rate_keeps_a_fraction_of_each_image(name):
    c = case(name)
    vlm.patch(c.model, "drop", keep_rate=0.25)
    with torch.no_grad():
        c.model(**c.inputs(rows=(0, 1)))
    assert vlm.kept_counts(c.model) == [c.full(0) // 4, c.full(1) // 4]


def test_labels_shrink_with_the_prompt():
    c = case("llava-clip")
    inputs = c.inputs(rows=(0, 1))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == 99, -100).masked_fill(
        inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = c.model(**inputs, labels=labels).loss
        vlm.patch(c.model, "drop", tokens=16)
        assert torch.equal(c.model(**inputs, labels=labels).loss, loss)
        vlm.patch(c.model, "drop", tokens=N)
        out = c.model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 16 + N and torch.isfinite(out.loss)
    assert not torch.equal(out.loss, loss)


def test_the_tower_keeps_fused_attention(monkeypatch):
    c = case("llava-clip")
    vlm.patch(c.model, "tps", tokens=N)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[-2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        c.model(**c.inputs())
    assert calls.count(17) == 3  # the three CLIP layers, class token + 16 patches, through SDPA
    assert c.model.model.vision_tower.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["llava-clip", "qwen"])
def test_beam_search_expands_the_reduced_features_per_row(name):
    c = case(name)
    vlm.patch(c.model, "tps", tokens=N)
    beams = dict(GEN, num_beams=2)
    batch = c.inputs(rows=(0, 1))
    out = c.model.generate(**batch, **beams)[:, batch["input_ids"].shape[1]:]
    for row in (0, 1):
        alone = c.inputs((row,))
        assert torch.equal(c.model.generate(**alone, **beams)[:, alone["input_ids"].shape[1]:], out[row:row + 1])


@pytest.mark.parametrize("method", ["tps", "prumerge"])
def test_a_prompt_with_two_images_beside_a_prompt_with_one(method):
    c = case("llava-clip")
    two = [1, 5] + [99] * 16 + [6] + [99] * 16 + [7]
    one = [1, 9] + [99] * 16 + [10, 11]
    ids = torch.tensor([two, [0] * (len(two) - len(one)) + one])
    mask = (ids != 0).long()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _patch(c.model, method)
    out = c.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **GEN)[:, ids.shape[1]:]
    counts = vlm.kept_counts(c.model)
    assert len(counts) == 3 and (counts == [N] * 3 or method == "prumerge")
    alone = c.model.generate(input_ids=ids[:1], pixel_values=pixels[:2], **GEN)[:, ids.shape[1]:]
    assert torch.equal(alone, out[:1]) and vlm.kept_counts(c.model) == counts[:2]
    alone = c.model.generate(input_ids=torch.tensor([one]), pixel_values=pixels[2:], **GEN)[:, len(one):]
    assert torch.equal(alone, out[1:]) and vlm.kept_counts(c.model) == counts[2:]


@pytest.mark.parametrize("name", ["llava-clip", "paligemma", "qwen"])
def test_bfloat16_models_generate_with_every_method(name):
    c = case(name)
    c.model.to(torch.bfloat16)
    inputs = c.inputs(rows=(0, 1))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    for method in vlm.METHODS:
        _patch(c.model, method)
        ids = c.model.generate(**inputs, **GEN)
        assert ids.shape == (2, inputs["input_ids"].shape[1] + GEN["max_new_tokens"])
