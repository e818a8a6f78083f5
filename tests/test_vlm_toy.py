"""The toy VLM (tpsvit.vlm.toy): the converted tower, the questions, training that resumes exactly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tpsvit.errors import CheckpointError, InvalidArgumentError  # noqa: E402
from tpsvit.io.assets import load_demo_model  # noqa: E402
from tpsvit.vlm import toy, toy_train  # noqa: E402

TINY = toy.ToyLMConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)


def _timm_block_outputs(model, x):
    tokens = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


def test_converted_tower_matches_the_timm_mini_deit():
    timm_model = load_demo_model()
    hf = toy.vit_from_timm(timm_model)
    x = torch.randn(3, 1, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], _timm_block_outputs(timm_model, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.last_hidden_state, timm_model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_llava_reads_the_mini_deit_patch_tokens():
    model = toy.build_toy_vlm(TINY)
    x = torch.randn(2, 1, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = torch.stack(list(model.get_image_features(pixel_values=x).pooler_output))
        expected = model.model.multi_modal_projector(_timm_block_outputs(load_demo_model(), x)[:, 1:])
    assert features.shape == (2, toy.IMAGE_TOKENS, TINY.hidden)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


def test_prompts_share_one_length_and_answers_are_single_words():
    tok = toy.ToyTokenizer()
    assert len({len(tok.prompt(kind)) for kind in toy.KINDS}) == 1
    assert tok.prompt("side").count(tok.image_id) == toy.IMAGE_TOKENS
    words = [i for kind in toy.KINDS for i in tok.answer_ids(kind)]
    assert len(set(words)) == len(words) == 14
    assert tok.decode(tok.encode("is it on the left or right ?")) == "is it on the left or right ?"
    with pytest.raises(InvalidArgumentError, match="'colour'"):
        tok.encode("what colour ?")
    with pytest.raises(InvalidArgumentError, match="garment, side, height"):
        tok.prompt("count")


def test_side_and_height_follow_the_garments_own_pixels():
    alone = torch.zeros(2, 56, 56, dtype=torch.uint8)
    alone[0, 2:20, 3:25] = 200  # top left
    alone[1, 30:50, 33:55] = 90  # bottom right
    labels = toy.answer_labels(torch.tensor([4, 7]), alone)
    assert labels["side"].tolist() == [0, 1] and labels["height"].tolist() == [0, 1]
    assert labels["garment"].tolist() == [4, 7]


def test_the_test_split_is_the_cluttered_benchmark():
    from tpsvit.data.datasets import ClutteredFashionMNIST

    canvases, labels = toy.test_split()
    assert canvases.shape == (10_000, 56, 56)
    assert torch.equal(canvases, ClutteredFashionMNIST(train=False).images)
    assert 0.4 < labels["side"].float().mean() < 0.6 and 0.4 < labels["height"].float().mean() < 0.6


class _Interrupted(Exception):
    pass


def _synthetic_garments(n=40):
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 28, 28), generator=gen).to(torch.uint8), torch.arange(n) % 10


def test_training_resumes_to_the_same_weights_and_generate_answers(tmp_path):
    recipe = toy_train.ToyRecipe(steps=4, batch=4, warmup=2, seed=5)
    data = _synthetic_garments()
    straight = toy_train.train(tmp_path / "a", recipe, TINY, save_every=4, log=lambda m: None, data=data)
    toy_train.train(tmp_path / "b", toy_train.ToyRecipe(steps=2, batch=4, warmup=2, seed=5), TINY, log=lambda m: None,
                    data=data)  # a different schedule: refused on resume below
    with pytest.raises(CheckpointError, match="use another --out"):
        toy_train.train(tmp_path / "b", recipe, TINY, log=lambda m: None, data=data)
    halfway = tmp_path / "c"

    def stop_at_step_3(message):
        if '"step": 3' in message:
            raise _Interrupted

    with pytest.raises(_Interrupted):  # after step 2's checkpoint, before step 3's
        toy_train.train(halfway, recipe, TINY, save_every=2, log_every=1, log=stop_at_step_3, data=data)
    assert torch.load(halfway / "checkpoint.pt", weights_only=False)["step"] == 2
    messages = []
    resumed = toy_train.train(halfway, recipe, TINY, save_every=2, log=messages.append, data=data)
    assert messages[0].startswith("resumed") and "step 2" in messages[0]
    a, b = toy.load_toy_vlm(straight), toy.load_toy_vlm(resumed)
    for (name, x), y in zip(toy.trainable_state(a).items(), toy.trainable_state(b).values(), strict=True):
        assert torch.equal(x, y), name
    tok = toy.ToyTokenizer()
    batch = toy.make_batch(torch.zeros(2, 56, 56, dtype=torch.uint8), toy.answer_labels(torch.tensor([1, 2]),
                           torch.ones(2, 56, 56)), ["garment", "side"], tok)
    out = a.generate(input_ids=batch.input_ids, pixel_values=batch.pixel_values, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        first = a(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[:, -1].argmax(-1)
    prompt = batch.input_ids.shape[1]
    assert torch.equal(out[:, :prompt], batch.input_ids) and torch.equal(out[:, prompt], first)


def test_a_missing_toy_model_says_how_to_train_one(tmp_path):
    with pytest.raises(CheckpointError, match="toy_train"):
        toy.load_toy_vlm(tmp_path / "none.safetensors")


@pytest.mark.parametrize("seed", toy.SHIPPED_SEEDS)
def test_the_shipped_toy_vlms_answer_the_test_questions(seed):
    """The shipped toy VLMs (python -m tpsvit.vlm.toy_train --seed S, 2000 steps) answer most of the first 300 test
    questions; side and height are easy, the garment is as hard as for the mini-DeiT itself."""
    model = toy.load_toy_vlm(seed)
    canvases, labels = toy.test_split()
    kinds = [toy.KINDS[i % 3] for i in range(300)]
    batch = toy.make_batch(canvases[:300], {k: v[:300] for k, v in labels.items()}, kinds, toy.ToyTokenizer())
    with torch.no_grad():
        answer = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[:, -1].argmax(-1)
    right = answer == batch.answers
    side = torch.tensor([k != "garment" for k in kinds])
    assert right[side].float().mean() > 0.85 and right[~side].float().mean() > 0.4
    with pytest.raises(InvalidArgumentError, match="shipped seeds"):
        toy.shipped_toy_vlm(7)
