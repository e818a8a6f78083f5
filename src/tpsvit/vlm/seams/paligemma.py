"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP tower without class token (scored by attention received),
linear projector on its last hidden state. Sequence-aligned ``token_type_ids`` (prefix / suffix) shrink too."""

from __future__ import annotations

import torch

from tpsvit.vlm.seams.base import ProjectorSeam, Seam


class PaliGemmaSeam(ProjectorSeam):
    classes = ("PaliGemmaForConditionalGeneration",)
    sequence_pads = {**Seam.sequence_pads, "token_type_ids": 0}

    def default_layer(self, model):
        return self.depth(model) - 1

    def forward_positions(self, model, input_ids, past):
        return super().forward_positions(model, input_ids, past) + 1  # PaliGemma counts positions from 1

    def run_encoder(self, model, kwargs):
        return model.model.get_image_features(kwargs["pixel_values"], return_dict=True)

    def features_output(self, pooled, counts):
        if all(c == pooled.shape[1] for c in counts):
            return pooled
        return torch.cat([f[:c] for f, c in zip(pooled, counts)]).unsqueeze(0)
