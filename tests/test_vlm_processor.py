"""The user's call site, unchanged: processor(...) then model.generate(...) and the usual decoding of the new tokens."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from vlm_tiny import llava, llava_processor

import tpsvit.vlm as vlm

PROMPTS = ["<s> w5 w6 <image> w7 w8", "<s> w9 <image> w10 w11 w12 w13"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in PROMPTS]


def _answers(model, processor, prompts, images):
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[99])
    return processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_processor_then_generate_works_unchanged_on_a_patched_llava():
    model, processor, images = llava(), llava_processor(), _images()
    full = _answers(model, processor, PROMPTS, images)
    vlm.patch(model, "tps", tokens=16)
    assert _answers(model, processor, PROMPTS, images) == full
    vlm.patch(model, "tps", tokens=4)
    batch = _answers(model, processor, PROMPTS, images)
    assert vlm.kept_counts(model) == [4, 4]
    alone = [_answers(model, processor, [p], [i])[0] for p, i in zip(PROMPTS, images)]
    assert batch == alone and all(len(a.split()) == 4 for a in batch)
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 12
