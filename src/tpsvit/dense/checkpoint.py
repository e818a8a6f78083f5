"""A segmenter as one tpsvit safetensors file: the backbone's weights and patch (as any tpsvit checkpoint), the head's
weights under ``seg_head.``, and the metadata ``task: segment``, ``seg_head`` (its kind) and ``restore``."""

from __future__ import annotations

import os
from pathlib import Path

from tpsvit.dense.heads import ConvHead, LinearHead, head_kind
from tpsvit.dense.segmenter import Segmenter
from tpsvit.errors import CheckpointError
from tpsvit.io.loading import apply_patch_spec, create_model, load_weights, read_weights, save_checkpoint

HEAD_PREFIX = "seg_head."


def save_segmenter(segmenter: Segmenter, path: str | os.PathLike, model_name: str, model_kwargs: dict | None = None,
                   **provenance) -> Path:
    """Write backbone + head of ``segmenter`` atomically; :func:`load_segmenter` rebuilds it."""
    head = {HEAD_PREFIX + k: v for k, v in segmenter.head.state_dict().items()}
    return save_checkpoint(segmenter.backbone, path, model_name, model_kwargs, extra=head, task="segment",
                           seg_head=head_kind(segmenter.head), restore=segmenter.restore, **provenance)


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """The :class:`Segmenter` saved in ``path`` (by ``tpsvit train --task segment`` or :func:`save_segmenter`), in
    eval mode: the backbone rebuilt with its recorded patch, the head with its recorded kind and restore mode."""
    state, meta = read_weights(path)
    if meta.get("task") != "segment":
        raise CheckpointError(f"{str(path)!r} is not a segmentation checkpoint (no task: segment in its metadata); "
                              "load a classifier with tpsvit.load_model")
    head_state = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    backbone_state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    backbone = create_model(meta["model"], **meta.get("model_kwargs", {}))
    apply_patch_spec(backbone, meta.get("patch"))
    load_weights(backbone, backbone_state, source=f"checkpoint {str(path)!r}")
    try:
        if meta.get("seg_head") == "linear":
            classes, dim = head_state["proj.weight"].shape
            head = LinearHead(dim, classes)
        else:
            hidden, dim = head_state["conv1.weight"].shape[:2]
            head = ConvHead(dim, head_state["conv2.weight"].shape[0], hidden)
    except KeyError as err:
        raise CheckpointError(f"{str(path)!r} lacks the {meta.get('seg_head')} head's {err} tensor") from None
    load_weights(head, head_state, source=f"the head in {str(path)!r}")
    return Segmenter(backbone, head, restore=meta.get("restore", "host")).eval()
