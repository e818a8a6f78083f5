"""benchmarks/vlm_speed.py --quick and benchmarks/vlm_fidelity.py (toy form on a tiny toy VLM, HF form on a tiny
random LLaVA saved to a folder) run end to end in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
vlm = pytest.importorskip("tpsvit.vlm")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_speed_quick_times_every_method_beside_the_unpatched_model(tmp_path, capsys):
    speed = _load("vlm_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--quick", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = {(r["method"], r["tokens"]): r for r in saved["rows"]}
    base = rows[("unpatched", 49)]
    assert base["seq_len"] == 49 + speed.TEXT_BEFORE + speed.TEXT_AFTER and base["reduction_ms"] == 0
    for method in vlm.METHODS:
        for n in speed.QUICK_TOKENS:
            row = rows[(method, n)]
            if method != "prumerge":  # adaptive: N is its cap
                assert row["seq_len"] == n + speed.TEXT_BEFORE + speed.TEXT_AFTER
                assert row["kv_bytes"] * base["seq_len"] == base["kv_bytes"] * row["seq_len"]
            assert row["seq_len"] <= n + speed.TEXT_BEFORE + speed.TEXT_AFTER
            assert row["ttft_ms"] > row["vision_ms"] > 0 and row["gen_ms"] > row["ttft_ms"]
            assert row["reduction_ms"] > 0  # the selection ran (at N = 49 it returns its input)
    assert rows[("tps", 12)]["gmacs"] < rows[("tps", 24)]["gmacs"] < base["gmacs"]
    assert any("reduction <" in t["target"] for t in saved["targets"])
    assert "unpatched" in capsys.readouterr().out


def _tiny_toy(folder: Path) -> None:
    from tpsvit.vlm import toy, toy_train

    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (30, 28, 28), generator=gen).to(torch.uint8), torch.arange(30) % 10
    lm = toy.ToyLMConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    toy_train.train(folder, toy_train.ToyRecipe(steps=2, batch=4, warmup=1, seed=0), lm, log=lambda m: None,
                    data=data)


def test_fidelity_toy_form_scores_every_method_and_resumes(tmp_path):
    fidelity = _load("vlm_fidelity")
    _tiny_toy(tmp_path)
    out, png = tmp_path / "fidelity.json", tmp_path / "fidelity.png"
    args = ["--toy-dir", str(tmp_path), "--seeds", "0", "--limit", "30", "--batch", "16", "--tokens", "37", "25", "5",
            "--methods", "tps", "random", "prumerge", "pool", "--json", str(out)]
    assert fidelity.main([*args, "--plot", str(png)]) == 0
    saved = json.loads(out.read_text())
    table = {(r["method"], r["tokens"]): r for r in saved["table"]}
    full = table[("full", 49)]
    assert full["agreement"] == 1.0 and full["kl"] == 0.0 and full["mean_tokens"] == 49
    assert table[("tps", 5)]["mean_tokens"] == 5 and table[("random", 25)]["mean_tokens"] == 25
    assert table[("prumerge", 5)]["mean_tokens"] <= 5
    assert [table[("pool", n)]["mean_tokens"] for n in (37, 25, 5)] == [36, 25, 5]
    assert table[("visionzip compact", 5)]["mean_tokens"] == 5 and ("tps compact", 25) not in table
    for row in saved["table"]:
        assert 0 <= row["accuracy"] <= 100 and 0 <= row["agreement"] <= 1 and row["kl"] >= 0
    assert png.stat().st_size > 0
    before = out.read_text()
    assert fidelity.main(args) == 0  # everything already there: reused, not recomputed
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]


def _tiny_llava(folder: Path) -> Path:
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = transformers
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "What", "is", "shown", "in", "this",
             "image?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = t.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                          eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = t.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = t.LlavaConfig(
        vision_config=t.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8),
        text_config=t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=64, vocab_size=64),
        image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    t.LlavaForConditionalGeneration(config).save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    pictures = folder / "images"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    return folder


def test_fidelity_hf_form_on_a_saved_tiny_llava(tmp_path):
    fidelity = _load("vlm_fidelity")
    _tiny_llava(tmp_path)
    out = tmp_path / "hf.json"
    assert fidelity.main(["--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
                          "--methods", "tps", "pool", "--keep-rates", "0.5", "0.25", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["images"] == 3
    rows = {(r["method"], r["keep_rate"]): r for r in saved["table"]}
    assert rows[("full", 1.0)]["mean_tokens"] == 16 and rows[("full", 1.0)]["agreement"] == 1.0
    assert rows[("tps", 0.25)]["mean_tokens"] == 4 and rows[("pool", 0.5)]["mean_tokens"] == 8
    assert all(r["kl"] >= 0 for r in saved["table"])


def test_fidelity_refuses_images_without_a_model():
    fidelity = _load("vlm_fidelity")
    with pytest.raises(SystemExit):
        fidelity.main(["--images", "somewhere"])
