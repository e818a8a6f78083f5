"""Fewer visual tokens into a vision-language model's language model (``tpsvit.vlm.patch``).

The reduction happens on the features the projector receives (LLaVA, PaliGemma) or after Qwen2.5-VL's patch
merger; the vision tower and the language model run their own code (the tower keeps SDPA: scores come from the q/k
of one layer, captured by hooks). The prompt's image placeholder runs shrink to the kept counts, so the user's
``processor(...)`` then ``model.generate(...)`` / ``model(...)`` calls stay as they are.
"""

from tpsvit.vlm.methods import METHODS, REGISTRY
from tpsvit.vlm.patch import is_patched, kept_counts, kept_indices, patch, reduced, unpatch
from tpsvit.vlm.seams import supported

__all__ = ["METHODS", "REGISTRY", "is_patched", "kept_counts", "kept_indices", "patch", "reduced", "supported",
           "unpatch"]
