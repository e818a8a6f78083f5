"""Load a Hugging Face ``transformers`` vision model for the CLI: ``hf:ORG/NAME`` (the hub) or a local folder written
by ``save_pretrained``.

The class comes from the folder's ``config.json`` (``architectures``) and must be one tpsvit supports
(:func:`tpsvit.families.hf_common.supported_classes`). Offline, a hub name is looked up in the local cache only and
otherwise fails on one line.
A ``preprocessor_config.json`` beside the weights, when there is one, gives the normalisation the model expects.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

from torch import nn

from tpsvit.errors import CheckpointError, InvalidArgumentError, UnsupportedModelError
from tpsvit.io import hub

HF_PREFIX = "hf:"


def is_hf_source(name) -> bool:
    """True for ``hf:ORG/NAME`` and for a folder holding a transformers ``config.json``."""
    if not isinstance(name, str):
        return False
    if name.startswith(HF_PREFIX):
        return True
    path = Path(name)
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_model(source: str, num_labels: int | None = None) -> nn.Module:
    """The transformers model of ``source`` (see :func:`is_hf_source`) in eval mode, with SDPA attention;
    ``num_labels`` other than the checkpoint's gives a classifier a new head (``model._tps_fresh_head``)."""
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError(
            f"{source!r} is a Hugging Face model; install transformers with: pip install 'tps-vit[hf]'"
        ) from None
    from tpsvit.families.hf_common import supported_classes

    SUPPORTED = supported_classes()

    ref = source.removeprefix(HF_PREFIX)
    local = Path(ref).is_dir()
    if not local and not ref:
        raise InvalidArgumentError("--model hf: needs a name, e.g. hf:google/vit-base-patch16-224")
    offline = not local and not hub.hub_offline_requested() and not hub.reachable(_hub_host())
    try:
        with hub.hub_offline() if offline else nullcontext():
            config = transformers.AutoConfig.from_pretrained(ref)
            name = (getattr(config, "architectures", None) or [None])[0]
            if name not in SUPPORTED:
                raise UnsupportedModelError(
                    f"{source!r} holds a transformers {name or config.model_type} model; tpsvit supports "
                    f"{', '.join(SUPPORTED)} (a CLIP / SigLIP checkpoint: save its vision tower, e.g. "
                    "CLIPVisionModel.from_pretrained(NAME).save_pretrained(FOLDER))"
                )
            fresh = num_labels is not None and num_labels != config.num_labels
            labels = {i: f"LABEL_{i}" for i in range(num_labels or 0)}
            extra = {"id2label": labels, "label2id": {v: k for k, v in labels.items()},
                     "ignore_mismatched_sizes": True} if fresh else {}
            model = getattr(transformers, name).from_pretrained(ref, attn_implementation="sdpa", **extra)
            if fresh:
                model._tps_fresh_head = True
    except OSError as err:
        where = "a local folder" if local else ("the local cache (no network)" if offline else "the hub")
        raise CheckpointError(
            f"cannot load {source!r} from {where}: {str(err).splitlines()[0][:200] if str(err) else type(err)}; "
            "offline, pass a folder written by save_pretrained (config.json + model.safetensors)"
        ) from None
    model.pretrained_cfg = _data_config(ref, local, offline)
    return model.eval()


def _data_config(ref: str, local: bool, offline: bool) -> dict:
    """timm-style ``mean`` / ``std`` from ``preprocessor_config.json`` when there is one (else timm's defaults)."""
    path = Path(ref) / "preprocessor_config.json"
    if not local:
        try:
            from huggingface_hub import hf_hub_download

            with hub.hub_offline() if offline else nullcontext():
                path = Path(hf_hub_download(ref, "preprocessor_config.json"))
        except Exception:  # noqa: BLE001 (no processor config on the hub or in the cache: timm's defaults)
            return {}
    if not path.is_file():
        return {}
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    mean, std = processor.get("image_mean"), processor.get("image_std")
    return {"mean": tuple(mean), "std": tuple(std)} if mean and std else {}


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
