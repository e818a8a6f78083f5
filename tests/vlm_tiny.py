"""Tiny random VLMs built from configs (offline, a fraction of a second each) and prompts for them: LLaVA with a CLIP,
ViT or SigLIP tower, PaliGemma (SigLIP) and Qwen2.5-VL. Each :class:`Case` makes left-padded batches of prompts whose
image placeholder runs have the model's full length, as a processor would."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SiglipVisionConfig,
    ViTConfig,
)
from transformers.utils import logging

logging.set_verbosity_error()  # tiny vocabularies: transformers warns that Qwen's default bos/eos ids lie outside

IMAGE, PAD, BOS, EOS, VISION_START, VISION_END = 99, 0, 1, 2, 97, 96
VOCAB = 100
# prompts of different lengths around one image each
TEXTS = [([BOS, 5, 6], [7, 8]), ([BOS, 9], [10, 11, 12, 13, 14]), ([BOS, 20, 21, 22, 23], [24])]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
             patch_size=8)  # a 4 x 4 grid of patches
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2)


def llava(tower: str = "clip", strategy: str = "default", feature_layer: int = -2) -> LlavaForConditionalGeneration:
    """LLaVA with a 3-layer CLIP / ViT / SigLIP tower on 32 x 32 images (16 patches) and a 2-layer Llama."""
    vision = {"clip": CLIPVisionConfig, "vit": ViTConfig, "siglip": SiglipVisionConfig}[tower](**TOWER)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT, max_position_embeddings=256),
                         image_token_id=IMAGE, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, pad_token_id=PAD)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def paligemma() -> PaliGemmaForConditionalGeneration:
    """PaliGemma with a 3-layer SigLIP tower (16 patches, no class token) and a 2-layer Gemma."""
    vision = SiglipVisionConfig(**TOWER, projection_dim=32)
    config = PaliGemmaConfig(vision_config=vision, text_config=GemmaConfig(**TEXT, head_dim=16), image_token_id=IMAGE,
                             projection_dim=32)
    torch.manual_seed(0)
    return PaliGemmaForConditionalGeneration(config).eval()


def qwen() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 2 vision blocks (window attention, then full attention) on 4 x 4 patches merged 2 x 2."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=98,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, pad_token_id=PAD,
                              bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _left_pad(rows: list[list[int]], *aligned: list[list[int]]) -> tuple[torch.Tensor, ...]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    extra = [torch.tensor([[0] * (width - len(r)) + r for r in rows_]) for rows_ in aligned]
    return (ids, mask, *extra)


@dataclass
class Case:
    """One tiny model and how to prompt it."""

    name: str
    build: object

    def __post_init__(self):
        self.model = self.build()

    @property
    def qwen(self) -> bool:
        return self.name == "qwen"

    def full(self, row: int = 0) -> int:
        """Visual tokens of prompt ``row``'s image without reduction."""
        if self.qwen:
            h, w = self.grid(row)
            return h * w // 4
        if self.name == "llava-full":
            return 17
        return 16

    def grid(self, row: int) -> tuple[int, int]:
        """Qwen2.5-VL images differ in size by row: (h, w) in patches."""
        return [(8, 8), (4, 8), (8, 4)][row % 3]

    def pixels(self, row: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + row)
        if self.qwen:
            h, w = self.grid(row)
            return torch.randn(h * w, 3 * 2 * 4 * 4, generator=g)
        return torch.randn(1, 3, 32, 32, generator=g)

    def inputs(self, rows=(0,)) -> dict:
        """Left-padded kwargs for the prompts ``rows`` of :data:`TEXTS`, one image each, as a processor gives."""
        rows = list(rows)
        ids, types = [], []
        for row in rows:
            before, after = TEXTS[row % len(TEXTS)]
            n = self.full(row)
            if self.qwen:
                seq = before + [VISION_START] + [IMAGE] * n + [VISION_END] + after
            elif self.name == "paligemma":
                seq = [IMAGE] * n + before + after
            else:
                seq = before + [IMAGE] * n + after
            ids.append(seq)
            types.append([int(t == IMAGE) for t in seq] if self.qwen else [0] * len(seq))
        input_ids, mask, type_ids = _left_pad(ids, types)
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        if self.qwen:
            kwargs.update(pixel_values=torch.cat([self.pixels(r) for r in rows]), mm_token_type_ids=type_ids,
                          image_grid_thw=torch.tensor([[1, *self.grid(r)] for r in rows]))
        else:
            kwargs["pixel_values"] = torch.cat([self.pixels(r) for r in rows])
        if self.name == "paligemma":
            kwargs["token_type_ids"] = type_ids
        return kwargs


BUILDERS = {
    "llava-clip": llava,
    "llava-vit": lambda: llava("vit"),
    "llava-siglip": lambda: llava("siglip", strategy="full", feature_layer=-1),
    "llava-full": lambda: llava("clip", strategy="full"),
    "paligemma": paligemma,
    "qwen": qwen,
}


def case(name: str) -> Case:
    return Case(name, BUILDERS[name])


def language_model_inputs(model):
    """A hook on the language model recording each call's (inputs_embeds length, position_ids); returns
    (records, handle)."""
    records = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        records.append((embeds.shape[1], kwargs.get("position_ids")))

    return records, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
