"""Dense prediction on reduced tokens: per-pixel heads on the patch grid that :func:`tpsvit.restore` rebuilds.

- :mod:`tpsvit.dense.heads`: ``LinearHead`` and ``ConvHead`` on a (B, C, h, w) grid, with their MACs;
- :mod:`tpsvit.dense.segmenter`: ``Segmenter``, a (patched) timm ViT + restore + head -> per-pixel logits;
- :mod:`tpsvit.dense.checkpoint`: save / load a segmenter (backbone and head) as one safetensors file.
"""

from tpsvit.dense.checkpoint import load_segmenter, save_segmenter
from tpsvit.dense.heads import HEADS, ConvHead, LinearHead, make_head, tokens_to_grid
from tpsvit.dense.segmenter import Segmenter

__all__ = ["HEADS", "ConvHead", "LinearHead", "Segmenter", "load_segmenter", "make_head", "save_segmenter",
           "tokens_to_grid"]
