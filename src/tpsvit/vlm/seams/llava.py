"""LLaVA (``LlavaForConditionalGeneration``): CLIP, SigLIP or ViT / DeiT tower, per-token MLP projector. The reduced
tokens are the projector's inputs, after ``vision_feature_layer`` and ``vision_feature_select_strategy``."""

from __future__ import annotations

from tpsvit.errors import InvalidArgumentError
from tpsvit.vlm.seams.base import ProjectorSeam


class LlavaSeam(ProjectorSeam):
    classes = ("LlavaForConditionalGeneration",)

    def default_layer(self, model):
        """The layer that produces the selected hidden state (hidden_states[v] is layer v - 1's output)."""
        layer = model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        return max(0, layer % (self.depth(model) + 1) - 1)

    def full_tokens(self, model):
        patches = super().full_tokens(model)
        if patches is None:
            return None
        return patches + self.prefix(model)

    def prefix(self, model):
        return int(model.config.vision_feature_select_strategy == "full" and self._has_class(model))

    def _has_class(self, model):
        return type(self.tower(model)).__name__ != "SiglipVisionModel"

    def run_encoder(self, model, kwargs):
        if kwargs.get("image_sizes") is not None:
            raise InvalidArgumentError("tpsvit.vlm reduces fixed-size LLaVA images; image_sizes (per-image sizes, "
                                       "as Pixtral-style towers take) is not supported")
        return model.model.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            return_dict=True,
        )
