"""A toy vision-language model that trains on a CPU: the shipped cluttered-Fashion-MNIST mini-DeiT as a frozen
tower of a real ``transformers`` LlavaForConditionalGeneration, a small projector and a tiny causal LM that answer
generated questions about the canvas.

The tower is the timm mini-DeiT (``deit_mini_patch8_56``, 49 patch tokens, 64 wide) converted weight for weight into
an HF ``ViTModel`` (:func:`vit_from_timm`); LLaVA reads the patch tokens of its last block (class token dropped,
``vision_feature_select_strategy="default"``). Questions and answers are words of a fixed vocabulary
(:class:`ToyTokenizer`); every prompt has the same length, every answer is one word and ``<eos>``:

    <bos> <image> x 49  what garment is shown in the picture ?  ->  coat <eos>
    <bos> <image> x 49  is it on the left or right ?       ->  left <eos>
    <bos> <image> x 49  is it at the top or bottom ?       ->  bottom <eos>

The side and height answers come from the centre of mass of the garment's own pixels (the canvas composed without
clutter from the same draws, :meth:`ClutterSpec.compose_layers`), against the canvas centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tpsvit.data.cluttered import TEST_SEED, ClutterSpec, compose_fixed_layers
from tpsvit.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from tpsvit.errors import CheckpointError, InvalidArgumentError

GARMENT_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
QUESTIONS = {
    "garment": "what garment is shown in the picture ?",
    "side": "is it on the left or right ?",
    "height": "is it at the top or bottom ?",
}
KINDS = tuple(QUESTIONS)
SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>")
IMAGE_TOKENS = 49  # the mini-DeiT's 7 x 7 patch tokens
SPEC = ClutterSpec()  # the cluttered testbed's canvases


class ToyTokenizer:
    """Word-level tokenizer of the toy VLM: the special tokens, the question words and the answer words."""

    def __init__(self):
        words = [w for q in QUESTIONS.values() for w in q.split()]
        words += [*GARMENT_WORDS, "left", "right", "top", "bottom"]
        self.vocab = list(dict.fromkeys([*SPECIAL, *words]))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id = (self.ids[s] for s in SPECIAL)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Space-separated words -> ids; an unknown word is an error naming it."""
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            raise InvalidArgumentError(f"words {unknown} are not in the toy vocabulary; allowed: {self.vocab}")
        return [self.ids[w] for w in text.split()]

    def decode(self, ids) -> str:
        """Ids -> space-separated words (``<image>`` runs kept as they are)."""
        return " ".join(self.vocab[int(i)] for i in ids)

    def prompt(self, kind: str, image_tokens: int = IMAGE_TOKENS) -> list[int]:
        """``<bos>``, the image placeholders and the question of ``kind`` (garment, side or height)."""
        if kind not in QUESTIONS:
            raise InvalidArgumentError(f"question kind {kind!r} is not one of {', '.join(KINDS)}")
        return [self.bos_id, *[self.image_id] * image_tokens, *self.encode(QUESTIONS[kind])]

    def answer_ids(self, kind: str) -> list[int]:
        """The ids of the words that answer ``kind``, in label order (garment classes; left/right; top/bottom)."""
        words = {"garment": GARMENT_WORDS, "side": ("left", "right"), "height": ("top", "bottom")}[kind]
        return [self.ids[w] for w in words]


@dataclass(frozen=True)
class ToyLMConfig:
    """The tiny causal LM (a Llama) and the projector width it sets."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384


# ---------------------------------------------------------------------------------------------- the tower


def vit_config_from_timm(timm_model):
    """The HF ``ViTConfig`` of a timm VisionTransformer with a class token, no registers and no layer scale."""
    from transformers import ViTConfig

    blocks = timm_model.blocks
    if getattr(timm_model, "num_prefix_tokens", 1) != 1 or not hasattr(timm_model, "cls_token"):
        raise InvalidArgumentError("vit_from_timm needs a timm ViT with one class token and no registers")
    patch = timm_model.patch_embed
    return ViTConfig(
        hidden_size=timm_model.embed_dim, num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        intermediate_size=blocks[0].mlp.fc1.out_features, image_size=patch.img_size[0], patch_size=patch.patch_size[0],
        num_channels=patch.proj.in_channels, layer_norm_eps=blocks[0].norm1.eps, hidden_act="gelu",
        qkv_bias=blocks[0].attn.qkv.bias is not None,
    )


def vit_from_timm(timm_model):
    """An HF ``ViTModel`` with the weights of the timm ``timm_model`` (same hidden states, same final norm)."""
    from transformers import ViTModel

    hf = ViTModel(vit_config_from_timm(timm_model), add_pooling_layer=False)
    src = timm_model.state_dict()
    mapped = {
        "embeddings.cls_token": src["cls_token"], "embeddings.position_embeddings": src["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"],
    }
    for i in range(len(timm_model.blocks)):
        s, d = f"blocks.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            for name, chunk in zip("qkv", src[s + f"attn.qkv.{part}"].chunk(3)):
                mapped[d + f"attention.{name}_proj.{part}"] = chunk
            mapped[d + f"attention.o_proj.{part}"] = src[s + f"attn.proj.{part}"]
            mapped[d + f"layernorm_before.{part}"] = src[s + f"norm1.{part}"]
            mapped[d + f"layernorm_after.{part}"] = src[s + f"norm2.{part}"]
            mapped[d + f"mlp.fc1.{part}"] = src[s + f"mlp.fc1.{part}"]
            mapped[d + f"mlp.fc2.{part}"] = src[s + f"mlp.fc2.{part}"]
    if set(mapped) != set(hf.state_dict()):
        raise CheckpointError("this transformers version names ViT weights differently from the 5.x names that "
                              "vit_from_timm maps (layers.N.attention.q_proj ...); use transformers 5")
    hf.load_state_dict(mapped)
    return hf.eval()


# ---------------------------------------------------------------------------------------------- the model


def build_toy_vlm(lm: ToyLMConfig = ToyLMConfig(), seed: int = 0, tokenizer: ToyTokenizer | None = None):
    """The untrained toy LLaVA: the shipped mini-DeiT as its frozen tower (eval mode), a projector and an LM drawn
    from ``seed``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tpsvit.io.assets import load_demo_model

    tok = tokenizer or ToyTokenizer()
    tower = vit_from_timm(load_demo_model())
    text = LlamaConfig(
        hidden_size=lm.hidden, num_hidden_layers=lm.layers, num_attention_heads=lm.heads,
        num_key_value_heads=lm.kv_heads, intermediate_size=lm.intermediate, vocab_size=len(tok),
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    config = LlavaConfig(
        vision_config=tower.config, text_config=text, image_token_id=tok.image_id, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)  # the tower's pooler stays unused
    model.model.vision_tower.requires_grad_(False)
    for key, value in (("pad_token_id", tok.pad_id), ("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        setattr(model.generation_config, key, value)
    return model.eval()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights a toy VLM learns (projector and LM), without the frozen tower."""
    return {k: v for k, v in model.state_dict().items() if ".vision_tower." not in f".{k}"}


def save_toy_vlm(model, path: str | Path, lm: ToyLMConfig, meta: dict | None = None) -> Path:
    """Save the learned weights (fp16) and the LM config as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from tpsvit.io.atomic import atomic_write

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in trainable_state(model).items()}
    metadata = {k: str(v) for k, v in {**asdict(lm), **(meta or {})}.items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


SHIPPED_SEEDS = (0, 1)


def shipped_toy_vlm(seed: int = 0) -> Path:
    """Path of the toy VLM shipped in the package for training seed ``seed`` (0 or 1)."""
    from tpsvit.io.assets import ASSETS

    if seed not in SHIPPED_SEEDS:
        raise InvalidArgumentError(f"no shipped toy VLM for seed {seed!r}; shipped seeds: {SHIPPED_SEEDS}")
    return ASSETS / f"toy_vlm_seed{seed}.safetensors"


def load_toy_vlm(path: str | Path | int = 0):
    """A trained toy VLM (eval mode) from a :func:`save_toy_vlm` file, or the shipped one of a training seed (int);
    the tower is rebuilt from the shipped mini-DeiT."""
    from safetensors import safe_open

    path = shipped_toy_vlm(path) if isinstance(path, int) else Path(path)
    if not path.is_file():
        raise CheckpointError(f"no toy VLM at {path}; train one with `python -m tpsvit.vlm.toy_train --out DIR`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    lm = ToyLMConfig(**{k: int(meta[k]) for k in asdict(ToyLMConfig()) if k in meta})
    model = build_toy_vlm(lm)
    missing, unexpected = model.load_state_dict(state, strict=False)
    learned = [k for k in missing if ".vision_tower." not in f".{k}"]
    if learned or unexpected:
        raise CheckpointError(f"{path} does not fit the toy VLM: missing {learned[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- the data


def pixel_values(canvases: torch.Tensor) -> torch.Tensor:
    """uint8 canvases (B, H, W) -> the tower's normalised input (B, 1, H, W)."""
    return ((canvases.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)


def answer_labels(labels: torch.Tensor, alone: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per canvas, the label index of each question: the garment class, side (0 left, 1 right) and height (0 top,
    1 bottom) of the centre of mass of the garment's own pixels ``alone`` (B, H, W) against the canvas centre."""
    mass = alone.float()
    total = mass.sum((1, 2)).clamp_min(1e-6)
    side = alone.shape[-1]
    coords = torch.arange(side, dtype=torch.float32)
    cx = (mass.sum(1) * coords).sum(1) / total
    cy = (mass.sum(2) * coords).sum(1) / total
    centre = (side - 1) / 2
    return {"garment": labels.long(), "side": (cx > centre).long(), "height": (cy > centre).long()}


@dataclass
class QABatch:
    """Prompts (B, L), pixel values (B, 1, H, W), the answer word ids (B,), the label index and question kind."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answers: torch.Tensor
    kinds: list[str]


def make_batch(canvases: torch.Tensor, labels: dict[str, torch.Tensor], kinds: list[str],
               tok: ToyTokenizer) -> QABatch:
    """One question per canvas (``kinds[i]`` for canvas i) with its answer word."""
    ids = torch.tensor([tok.prompt(k) for k in kinds])
    answers = torch.tensor([tok.answer_ids(k)[int(labels[k][i])] for i, k in enumerate(kinds)])
    return QABatch(ids, pixel_values(canvases), answers, list(kinds))


def training_batch(garments: torch.Tensor, classes: torch.Tensor, size: int, gen: torch.Generator,
                   tok: ToyTokenizer, spec: ClutterSpec = SPEC) -> QABatch:
    """A fresh batch from training garments: new placements, flips and clutter, a random question per canvas."""
    index = torch.randint(0, len(garments), (size,), generator=gen)
    canvases, alone = spec.compose_layers(garments[index], garments, gen, flip=True)
    kinds = [KINDS[int(k)] for k in torch.randint(0, len(KINDS), (size,), generator=gen)]
    return make_batch(canvases, answer_labels(classes[index], alone), kinds, tok)


def test_split(spec: ClutterSpec = SPEC) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 10,000 fixed test canvases (the same as ``ClutteredFashionMNIST(train=False).images``) and their answer
    labels."""
    from tpsvit.data.datasets import ClutteredFashionMNIST

    data = ClutteredFashionMNIST(train=False, spec=spec)
    canvases, alone = compose_fixed_layers(data.garments, TEST_SEED, spec)
    return canvases, answer_labels(data.labels, alone)


def training_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 60,000 training garments (28 x 28 uint8) and their classes; canvases are composed per batch."""
    from tpsvit.data.datasets import ClutteredFashionMNIST

    data = ClutteredFashionMNIST(train=True)
    return data.garments, data.labels
