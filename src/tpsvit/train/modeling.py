"""The models of a run: the student (built, loaded, patched), the frozen teacher, parameter groups, checkpointing.

Gradient checkpointing recomputes every block in the backward pass, patched blocks included. A patched block reads
and writes per-forward state (keep policy, positions, ToMe sizes, decisions) on the model's runtime; by the time a
block is recomputed, that state is the one left by the last block. So each checkpointed call keeps a snapshot of the
state as the block found it; the recomputation runs on a copy of that snapshot (with the trace off) and then puts the
runtime back, so it computes exactly what the block ran (the RNG, for Gumbel noise and drop-path, is replayed by
``torch.utils.checkpoint``). The state the block wrote during the real forward (decisions, policy) keeps its autograd
graph: non-reentrant checkpointing drops saved activations, not the graph.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tpsvit
from tpsvit.errors import CheckpointError, InvalidArgumentError
from tpsvit.families import family_of
from tpsvit.io.loading import checkpoint_metadata, create_model, load_model
from tpsvit.measure.budget import solve_keep_rate, solve_tome_r


@dataclass
class Models:
    """The student, the teacher (or None), and how to rebuild the student (timm name + keywords)."""

    student: nn.Module
    teacher: nn.Module | None
    name: str
    kwargs: dict
    notes: list
    distill_logits: bool = False


def _warn(notes: list, message: str) -> None:
    notes.append(message)


SHIPPED = "shipped"  # checkpoint value: the base model shipped with tpsvit for the recipe's mini-DeiT


def start_checkpoint(cfg) -> str | None:
    """The starting checkpoint file of ``cfg``: ``checkpoint: shipped`` is the shipped base model of the recipe's
    embedded dataset (``tpsvit.io.assets.demo_checkpoint``; when ``data`` is not one, the mini-DeiT's dataset; for a
    transformers model, its own weights), ``shipped:DATA`` the one shipped for the embedded dataset DATA (a warm
    start from another testbed's model, e.g. ``shipped:fashion-mnist-cluttered``); anything else is taken as given."""
    from tpsvit.io.hf_loading import is_hf_source

    if cfg.checkpoint != SHIPPED and not str(cfg.checkpoint or "").startswith(SHIPPED + ":"):
        return cfg.checkpoint
    from tpsvit.data.datasets import embedded_name
    from tpsvit.io.assets import DEMO_MODELS, demo_checkpoint
    from tpsvit.io.loading import checkpoint_metadata
    from tpsvit.io.models import MINI_DEIT, MINI_DEIT_CLUTTERED

    if str(cfg.checkpoint).startswith(SHIPPED + ":"):
        named = str(cfg.checkpoint)[len(SHIPPED) + 1:]
        data = embedded_name(named)
        if data not in DEMO_MODELS:
            raise InvalidArgumentError(f"checkpoint {cfg.checkpoint!r}: {named!r} has no shipped base model; "
                                       f"allowed: {', '.join(SHIPPED + ':' + d for d in DEMO_MODELS)}")
        return str(demo_checkpoint(None, data))
    if is_hf_source(cfg.model):
        return None
    data = embedded_name(cfg.data) if cfg.data else None
    if data in DEMO_MODELS:
        path = demo_checkpoint(None, data)
        if checkpoint_metadata(path).get("model") == cfg.model:
            return str(path)
    data = {MINI_DEIT: "fashion-mnist", MINI_DEIT_CLUTTERED: "fashion-mnist-cluttered"}.get(cfg.model)
    if data is None:
        raise InvalidArgumentError(f"checkpoint {SHIPPED!r} is the shipped {MINI_DEIT} or {MINI_DEIT_CLUTTERED}, not "
                                   f"{cfg.model!r}; pass --checkpoint FILE (or --set checkpoint=null for hub weights)")
    return str(demo_checkpoint(None, data))


def _start_model(cfg, num_classes: int, notes: list) -> tuple[nn.Module, dict, bool]:
    """(model, rebuild kwargs, trained?) from a checkpoint (see :func:`start_checkpoint`) or a timm name."""
    from tpsvit.io.hf_loading import is_hf_source

    if is_hf_source(cfg.model):
        return _start_hf_model(cfg, num_classes, notes)
    kwargs = dict(cfg.model_kwargs)
    train_only = {"drop_path_rate": cfg.drop_path} if "drop_path_rate" not in kwargs else {}
    path = start_checkpoint(cfg)
    if path is not None:
        meta = checkpoint_metadata(path)
        recorded = meta.get("model")
        if recorded and recorded != cfg.model:
            raise CheckpointError(f"checkpoint {path!r} is a {recorded!r} but model is {cfg.model!r}; "
                                  f"set model={recorded} or give a checkpoint of {cfg.model}")
        model = _fit_head(load_model(cfg.model, path, **kwargs, **train_only), num_classes, notes)
        kwargs = {**meta.get("model_kwargs", {}), **kwargs}
        kwargs["num_classes"] = num_classes
        return model, kwargs, True
    kwargs.setdefault("num_classes", num_classes)
    model = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs, **train_only)
    hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if cfg.pretrained and hub_classes not in (None, model.num_classes):
        model._tps_fresh_head = True
    return model, kwargs, cfg.pretrained


def _fit_head(model: nn.Module, num_classes: int, notes: list) -> nn.Module:
    """A checkpoint's model with a new head (flagged ``_tps_fresh_head``) when its classes differ from the data's."""
    family = family_of(model)
    classes = family.num_classes(model)
    if classes != num_classes:
        _warn(notes, f"checkpoint head has {classes} classes, the data {num_classes}: new head")
        family.reset_head(model, num_classes)
        model._tps_fresh_head = True
    return model


def _start_hf_model(cfg, num_classes: int, notes: list) -> tuple[nn.Module, dict, bool]:
    """A transformers classifier from its folder / hub name (a new head when the classes differ), or from a tpsvit
    checkpoint of one; the config's drop path and model_kwargs do not apply (the model's own config decides)."""
    from tpsvit.core.methods import get_method
    from tpsvit.families.hf_common import masked_path_refusal
    from tpsvit.io.hf_loading import load_hf_model

    if cfg.model_kwargs:
        raise InvalidArgumentError(f"model_kwargs {cfg.model_kwargs} are timm.create_model keywords; a transformers "
                                   "model is configured by its config.json")
    kwargs = {"num_labels": num_classes}
    path = start_checkpoint(cfg)
    if path is None:
        model = load_hf_model(cfg.model, num_classes)
        if getattr(model, "_tps_fresh_head", False):
            _warn(notes, f"the model's head is new for these {num_classes} classes")
    else:
        model = _fit_head(load_model(cfg.model, path), num_classes, notes)
    if family_of(model).num_classes(model) is None:
        raise InvalidArgumentError(f"{cfg.model} is a {type(model).__name__}, a feature extractor; tpsvit train needs "
                                   "a classifier (ViTForImageClassification, DeiTForImageClassification, "
                                   "Dinov2ForImageClassification, ...)")
    refusal = masked_path_refusal(model, cfg.method) if cfg.method != "none" and get_method(cfg.method).learned \
        else None
    if refusal is not None:
        raise InvalidArgumentError(refusal)
    if cfg.drop_path:
        _warn(notes, f"drop_path={cfg.drop_path} is not applied to a transformers model (its config decides)")
    return model, kwargs, True


def _solve_budget(cfg, model) -> dict:
    """keep_rate (or ToMe's r) meeting ``cfg.budget`` (fraction of the unpatched GMACs), via tpsvit.budget."""
    img_size = cfg.img_size
    if cfg.method == "tome" and cfg.r is not None:
        return {"keep_rate": 1.0, "r": solve_tome_r(model, budget=cfg.budget, img_size=img_size)}
    rate = solve_keep_rate(model, cfg.method, budget=cfg.budget, locations=tuple(cfg.locations), img_size=img_size,
                           options=squeeze_options(cfg))
    return {"keep_rate": rate, "r": None}


def squeeze_options(cfg) -> dict:
    """The config's squeeze keywords of :func:`tpsvit.patch` that differ from the paper's ({} when none do)."""
    out = {"temperature": cfg.temperature} if cfg.temperature != 1.0 else {}
    if cfg.squeeze_floor is not None:
        out.update(squeeze_floor=cfg.squeeze_floor, squeeze_floor_action=cfg.squeeze_floor_action)
    elif cfg.squeeze_floor_action != "drop":
        out["squeeze_floor_action"] = cfg.squeeze_floor_action  # refused by patch with the reason
    if cfg.squeeze_weighting != "similarity":
        out["squeeze_weighting"] = cfg.squeeze_weighting
    return out


def apply_method(model: nn.Module, cfg) -> nn.Module:
    """Patch ``model`` as the config says (method ``none`` leaves it, or makes it, unpatched)."""
    if cfg.method == "none":
        return tpsvit.unpatch(model)
    amount = _solve_budget(cfg, model) if cfg.budget is not None else {"keep_rate": cfg.keep_rate, "r": cfg.r}
    if cfg.keep_rate_anneal_epochs and amount["r"] is not None:
        raise InvalidArgumentError("keep_rate_anneal_epochs works with keep_rate, not with ToMe's r")
    return tpsvit.patch(model, cfg.method, locations=tuple(cfg.locations), scorer=cfg.scorer, **amount,
                        **squeeze_options(cfg))


def _teacher(cfg, start: nn.Module, trained: bool, notes: list) -> nn.Module | None:
    if cfg.distill_weight == 0 and cfg.token_distill_weight == 0:
        return None
    if cfg.teacher == "none":
        _warn(notes, "teacher=none: the distillation losses are off")
        return None
    if cfg.teacher == "auto":
        teacher = copy.deepcopy(start)
        if not trained:
            _warn(notes, "the teacher is the randomly initialised starting model (no pretrained weights/checkpoint)")
    else:
        teacher = load_model(None, cfg.teacher)
        classes = [family_of(m).num_classes(m) for m in (teacher, start)]
        if classes[0] != classes[1]:
            raise CheckpointError(f"teacher {cfg.teacher!r} has {classes[0]} classes but the student {classes[1]}; "
                                  "give a teacher trained on the same classes")
    tpsvit.unpatch(teacher)
    teacher.eval().requires_grad_(False)
    return teacher


def build_models(cfg, num_classes: int) -> Models:
    """Student (patched), frozen teacher (the unpatched starting model, or ``cfg.teacher``) and rebuild recipe."""
    notes: list = []
    torch.manual_seed(cfg.seed)  # identical random init (predictors included) on every rank
    model, kwargs, trained = _start_model(cfg, num_classes, notes)
    teacher = _teacher(cfg, model, trained, notes)
    distill_logits = teacher is not None and cfg.distill_weight > 0
    if distill_logits and cfg.teacher == "auto" and getattr(model, "_tps_fresh_head", False):
        _warn(notes, "logit distillation is off: the starting model's head is new for these classes")
        distill_logits = False
    model.__dict__.pop("_tps_fresh_head", None)
    apply_method(model, cfg)
    return Models(model, teacher, _recorded_name(cfg.model), kwargs, notes, distill_logits)


def _recorded_name(model: str) -> str:
    """The model name checkpoints record: a transformers folder as an absolute path (rebuilt from anywhere)."""
    from pathlib import Path

    from tpsvit.io.hf_loading import is_hf_source

    return str(Path(model).resolve()) if is_hf_source(model) and Path(model).is_dir() else model


def _snapshot(state):
    """A copy of a forward state that later blocks cannot change (lists copied, tensors shared)."""
    if state is None:
        return None
    return replace(state, decisions=list(state.decisions), ranking=list(state.ranking))


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward
    if not torch.is_grad_enabled() or not block.training:
        return forward(block, *args, **kwargs)
    runtime = getattr(block, "_tps_runtime", None)
    if runtime is None:
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    if runtime.state is None:
        runtime.begin(block)
    before = _snapshot(runtime.state)
    first = [True]

    def run(block, *args, **kwargs):
        if first[0]:  # the real forward: writes the state the next blocks read
            first[0] = False
            return forward(block, *args, **kwargs)
        saved_state, saved_trace = runtime.state, runtime.trace
        runtime.state, runtime.trace = _snapshot(before), None
        try:  # the recomputation in backward: same inputs, same state, nothing recorded
            return forward(block, *args, **kwargs)
        finally:
            runtime.state, runtime.trace = saved_state, saved_trace

    return checkpoint(run, block, *args, use_reentrant=False, **kwargs)


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute every block (patched or not) in the backward pass instead of keeping its activations.

    Returns how many blocks are checkpointed. Works on the block's own class forward at call time, so it follows
    a later patch/unpatch of the model.
    """
    blocks = family_of(model).blocks(model)
    for block in blocks:
        block.forward = partial(_checkpointed_forward, block)
    return len(blocks)


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float, weight_decay: float,
                 skip_1d: bool = False) -> list[dict]:
    """AdamW groups. The release's default is one group: every parameter at ``lr`` with weight decay.

    ``backbone_lr_scale != 1`` puts the backbone in its own group at ``lr * backbone_lr_scale`` (predictors stay at
    ``lr``); ``skip_1d`` exempts biases, norms and the model's ``no_weight_decay`` tokens from decay (timm's default).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    split = backbone_lr_scale != 1.0
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "predictor" if name.startswith("tps_predictors.") or not split else "backbone"
        decay = not skip_1d or (param.ndim > 1 and name not in skip)
        groups.setdefault((part, decay), []).append(param)
    out = []
    for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != "predictor", not kv[0][1])):
        scale = 1.0 if part == "predictor" else backbone_lr_scale
        out.append({"params": params, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{part if split else 'all'}{'' if decay else '_no_decay'}"})
    return out


def print_notes(notes: list, enabled: bool) -> None:
    """Print set-up notes (warnings) on stderr."""
    if enabled:
        for note in notes:
            print(f"tpsvit train: note: {note}", file=sys.stderr)
