"""Model families behind one adapter interface (:class:`~tpsvit.families.base.Family`).

One module per family: timm ``VisionTransformer`` (:mod:`.timm_vit`), timm ``Eva`` (:mod:`.timm_eva`) and the Hugging
Face ViT / DeiT (:mod:`.hf_vit`), DINOv2 (:mod:`.hf_dinov2`) and CLIP / SigLIP (:mod:`.hf_clip`) vision encoders, on
machinery they share (:mod:`.timm_common`, :mod:`.hf_common`). Every module of this package is imported here, and
each family module registers its adapter (:func:`~tpsvit.families.registry.register`), so adding a family is adding
one file. None of them imports ``transformers``: Hugging Face classes are matched by name.
"""

import importlib
import pkgutil

from tpsvit.families.base import PREDICTORS, Family, PatchedModel, logits_of
from tpsvit.families.registry import FAMILIES, REFUSED, family_of, register, unregister

# the built-in families first, in this order (the first that matches a model wins; errors list them so), then any
# other module of the package
_BUILT_IN = ("timm_vit", "timm_eva", "hf_vit", "hf_dinov2", "hf_clip")
for _module in (*_BUILT_IN, *sorted({m.name for m in pkgutil.iter_modules(__path__)} - set(_BUILT_IN))):
    importlib.import_module(f"{__name__}.{_module}")

from tpsvit.families.timm_eva import EvaFamily, gather_rope  # noqa: E402  (the old tpsvit.families names)
from tpsvit.families.timm_vit import ViTFamily  # noqa: E402

__all__ = [
    "FAMILIES", "PREDICTORS", "REFUSED", "EvaFamily", "Family", "PatchedModel", "ViTFamily", "family_of",
    "gather_rope", "logits_of", "register", "unregister",
]
