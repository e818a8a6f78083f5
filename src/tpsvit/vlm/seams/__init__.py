"""The supported VLM classes (one seam each) and the one-line refusal for any other model."""

from __future__ import annotations

from torch import nn

from tpsvit.vlm.seams.llava import LlavaSeam
from tpsvit.vlm.seams.paligemma import PaliGemmaSeam
from tpsvit.vlm.seams.qwen2_5_vl import QwenSeam

SEAMS = (LlavaSeam(), PaliGemmaSeam(), QwenSeam())

# classes whose connector needs the full grid of visual tokens: why tpsvit.vlm refuses them
REFUSED = {
    "Idefics3ForConditionalGeneration": "its connector pixel-shuffles the full patch grid (space-to-depth), so it "
                                        "cannot take a reduced set of tokens",
    "SmolVLMForConditionalGeneration": "its connector pixel-shuffles the full patch grid (space-to-depth), so it "
                                       "cannot take a reduced set of tokens",
    "LlavaNextForConditionalGeneration": "its anyres tiling packs every tile's full grid (with newline tokens) into "
                                         "the image features",
    "LlavaOnevisionForConditionalGeneration": "its anyres tiling packs every tile's full grid (with newline "
                                              "tokens) into the image features",
    "LlavaNextVideoForConditionalGeneration": "its anyres tiling packs every tile's full grid (with newline tokens) "
                                              "into the image features",
}


def supported() -> tuple[str, ...]:
    """The model classes :func:`tpsvit.vlm.patch` reduces."""
    return tuple(name for seam in SEAMS for name in seam.classes)


def refusal(model: nn.Module) -> str:
    """The one line that says why ``model`` cannot be patched and what can."""
    name = getattr(type(model), "_tps_vlm_base", type(model)).__name__
    why = REFUSED.get(name, "it is not a vision-language model class tpsvit.vlm knows")
    return f"tpsvit.vlm cannot patch {name}: {why}; supported: {', '.join(supported())}"
