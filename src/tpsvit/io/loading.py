"""Build models from timm names and load / save weights (safetensors or weights-only torch files).

A tpsvit checkpoint is a safetensors file whose metadata key ``"tpsvit"`` holds JSON: the timm model name and its
keyword arguments, the patch that was applied (if any) and free-form provenance (command, seed, ...). Such a file is
enough to rebuild the model: ``load_model(checkpoint="model.safetensors")``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from tpsvit.errors import CheckpointError, InvalidArgumentError
from tpsvit.io import hub
from tpsvit.io.atomic import atomic_write
from tpsvit.patch import is_patched, patch

META_KEY = "tpsvit"


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with an error that names the model and suggests close names when it is unknown."""
    import tpsvit.io.models  # noqa: F401  (registers tpsvit's own small models)

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models('*deit*')"
        raise InvalidArgumentError(f"unknown timm model {name!r}{hint}")
    host = _weights_host(name, kwargs) if pretrained else None
    if host is not None and not hub.reachable(host):
        # No network: timm would retry for about a minute. Try the local cache only, then fail on one line.
        try:
            with hub.hub_offline():
                return timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError):
            raise CheckpointError(f"cannot reach {host} and the pretrained weights of {name!r} are not in the local "
                                  f"cache; {hub.OFFLINE_HINT}") from None
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise CheckpointError(
                f"could not download pretrained weights for {name!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}); {hub.OFFLINE_HINT}"
            ) from None
        raise


def _weights_host(name: str, kwargs: dict) -> str | None:
    """The host timm would download ``name``'s pretrained weights from; None when no download is needed (a local
    file in the pretrained config, HF_HUB_OFFLINE set) or the source is unknown (then timm decides)."""
    from urllib.parse import urlparse

    if hub.hub_offline_requested():
        return None
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        if isinstance(kwargs.get(key), dict) and kwargs[key].get("file"):
            return None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 (an unusual name or tag: let timm report it)
        return None
    if cfg is None or getattr(cfg, "file", None):
        return None
    if getattr(cfg, "hf_hub_id", None):
        return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    url = getattr(cfg, "url", None)
    return urlparse(url).hostname if url else None


def patch_spec(model: nn.Module) -> dict | None:
    """The patch of a model as plain JSON-able data (or None when unpatched), for checkpoint metadata."""
    if not is_patched(model):
        return None
    cfg = model.tps
    return {
        "method": cfg.method,
        "locations": list(cfg.locations),
        "keep_rate": None if cfg.keep_rate is None else list(cfg.keep_rate),
        "r": None if cfg.r is None else list(cfg.r),
        "temperature": cfg.temperature,
        "fuse": cfg.fuse,
        **squeeze_options(cfg),
    }


def squeeze_options(cfg) -> dict:
    """The squeeze options beyond the paper that a config sets (none: {}), as keyword arguments of ``patch``."""
    out = {}
    if cfg.squeeze_floor is not None:
        out.update(squeeze_floor=cfg.squeeze_floor, squeeze_floor_action=cfg.squeeze_floor_action)
    if cfg.squeeze_weighting != "similarity":
        out["squeeze_weighting"] = cfg.squeeze_weighting
    return out


def apply_patch_spec(model: nn.Module, spec: dict | None) -> nn.Module:
    """Re-apply a patch recorded by :func:`patch_spec`."""
    if spec:
        patch(
            model,
            spec["method"],
            keep_rate=spec["keep_rate"] if spec.get("keep_rate") is not None else 1.0,
            locations=spec["locations"],
            r=spec.get("r"),
            temperature=spec.get("temperature", 1.0),
            fuse=spec.get("fuse", "sum"),
            squeeze_floor=spec.get("squeeze_floor"),
            squeeze_floor_action=spec.get("squeeze_floor_action", "drop"),
            squeeze_weighting=spec.get("squeeze_weighting", "similarity"),
        )
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, model_name: str, model_kwargs: dict | None = None,
                    extra: dict[str, torch.Tensor] | None = None, **provenance) -> Path:
    """Write the model's weights (predictors included) and how to rebuild it as safetensors, atomically; ``extra``
    tensors (e.g. a dense head's, under a prefix of their own) are stored beside them."""
    path = Path(path)
    meta = {"model": model_name, "model_kwargs": model_kwargs or {}, "patch": patch_spec(model), **provenance}
    tensors = {k: v.detach().cpu().contiguous() for k, v in {**model.state_dict(), **(extra or {})}.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state_dict and tpsvit metadata from a safetensors file or a weights-only torch file (never unpickles
    arbitrary objects). Torch files may wrap the weights as ``{"model": state_dict}`` or ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        meta = checkpoint_metadata(path)
        try:
            return load_file(str(path)), meta
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read {str(path)!r} as a weights-only torch checkpoint ({type(err).__name__}); use a "
            "safetensors file or a plain state_dict saved with torch.save"
        ) from None
    meta = {}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), dict) else {}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state_dict of tensors")
    return obj, meta


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load a state_dict strictly, turning key or shape mismatches into one clear :class:`CheckpointError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint {tuple(state_dict[k].shape)} "
                         f"vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if unexpected and all(k.startswith("tps_predictors.") for k in unexpected):
            parts.append("it holds learned predictors: patch with dtps/dynamicvit at the same locations first")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict)
    return model


def load_model(name: str | None = None, checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
               **model_kwargs) -> nn.Module:
    """A timm model from its name, from a tpsvit checkpoint, or a name plus a checkpoint of plain weights; or a
    transformers model from ``hf:ORG/NAME`` or a ``save_pretrained`` folder (:mod:`tpsvit.hf_loading`).

    A checkpoint's recorded patch is re-applied before loading, so fine-tuned dTPS predictors load too.
    """
    if name is None and checkpoint is None:
        raise InvalidArgumentError("give a timm model name, a --checkpoint file, or both")
    from tpsvit.io.hf_loading import is_hf_source, load_hf_model

    state_dict, meta = read_weights(checkpoint) if checkpoint is not None else ({}, {})
    if meta.get("task") == "segment":
        raise CheckpointError(f"{str(checkpoint)!r} is a segmentation checkpoint (backbone + dense head); load it "
                              "with tpsvit.dense.load_segmenter")
    name = name or meta.get("model")
    kwargs = {**meta.get("model_kwargs", {}), **model_kwargs}
    if is_hf_source(name):
        if set(kwargs) - {"num_labels"}:
            raise InvalidArgumentError(f"{', '.join(sorted(set(kwargs) - {'num_labels'}))}: a transformers model "
                                       "runs at the image size of its config; set it there (config.image_size)")
        model = load_hf_model(name, kwargs.get("num_labels"))
        model.__dict__.pop("_tps_fresh_head", None)
    else:
        if name is None:
            raise CheckpointError(f"{str(checkpoint)!r} does not record its model; pass the timm model name too")
        if checkpoint is not None and "num_classes" not in kwargs:
            head = state_dict.get("head.weight")
            if head is not None:
                kwargs["num_classes"] = head.shape[0]
        model = create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        apply_patch_spec(model, meta.get("patch"))
        load_weights(model, state_dict, source=f"checkpoint {str(checkpoint)!r}")
    return model


def checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The tpsvit metadata of a checkpoint (empty when it has none); a safetensors file is read header only."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_weights(path)[1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY)
        return json.loads(raw) if raw else {}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from None
