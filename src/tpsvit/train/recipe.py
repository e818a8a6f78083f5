"""Training configuration: every key with its default, YAML recipes, and ``key=value`` overrides.

A recipe is a YAML mapping of keys of :class:`TrainConfig` (read with ``yaml.safe_load``, never ``eval``); the
recipes shipped with tpsvit live in ``tpsvit/recipes/<name>.yaml``. Any key can be overridden afterwards; an unknown
key is an :class:`~tpsvit.errors.InvalidArgumentError` that lists the valid keys.

Learning-rate rule: ``lr`` is used exactly as written, for the recipe's *global* batch (``batch_size``, summed over
ranks and accumulation steps); it is never rescaled automatically (the TPS/DynamicViT release does not scale either).
If you change ``batch_size``, scale ``lr`` yourself (the usual linear rule: lr x new_batch / recipe_batch).
Like the release, every parameter trains at ``lr`` in one AdamW group with weight decay on everything; the options
``backbone_lr_scale`` (the backbone at ``lr x backbone_lr_scale``, the predictors at ``lr``) and
``weight_decay_skip_1d`` (no decay on biases, norms and tokens, timm's default) are off by default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tpsvit.core.config import FLOOR_ACTIONS, SQUEEZE_WEIGHTINGS
from tpsvit.errors import InvalidArgumentError

METHOD_NAMES = ("none", "etps", "dtps", "evit", "dynamicvit", "tome")
TOKEN_DISTILL_LOSSES = ("kl", "mse")
PREDICTOR_INITS = ("release", "class-attention")
PREDICTOR_LOSSES = ("gumbel", "attention-distill")
AUGMENTS = ("deit", "fmnist", "none")
AMP_MODES = ("auto", "none", "bf16", "fp16")
TASKS = ("classify", "segment")
SEG_HEADS = ("linear", "conv")  # tpsvit.dense.HEADS
SEGMENT_DATA = ("fashion-mnist-cluttered", "fashion-mnist-textures")  # the testbeds with pixel labels
TEACHERS_HELP = "'auto' (the starting model, unpatched), 'none', or a checkpoint file"


@dataclass
class TrainConfig:
    """Every setting of a training run (the defaults are the paper's dTPS release on DeiT-S / ImageNet-1k)."""

    # model
    model: str = "deit_small_patch16_224"  # timm name
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model keywords (e.g. depth, embed_dim)
    pretrained: bool = True  # timm hub weights (ignored with a checkpoint)
    checkpoint: str | None = None  # starting weights (tpsvit safetensors or a weights-only torch file)
    teacher: str = "auto"  # 'auto' (starting model, unpatched, frozen), 'none', or a checkpoint file
    # task (segment: per-pixel labels of the cluttered testbed, see tpsvit.train.segment)
    task: str = "classify"  # classify | segment
    seg_head: str = "conv"  # segment: linear | conv (tpsvit.dense heads on the restored patch grid)
    restore: str = "host"  # segment: how removed patches get a feature back (tpsvit.restore): host | frozen | zeros
    freeze_backbone: bool = False  # segment: only the head trains (the backbone, patched or not, stays as loaded)
    # token reduction
    method: str = "dtps"  # none | etps | dtps | evit | dynamicvit | tome
    keep_rate: Any = 0.7  # per location, relative to the patch tokens alive there (one value or one per location)
    locations: list = field(default_factory=lambda: [3, 6, 9])
    r: Any = None  # ToMe: tokens merged per location instead of a keep rate
    budget: float | None = None  # fraction of the unpatched GMACs; keep_rate (ToMe with r set: r) solved to meet it
    keep_rate_anneal_epochs: float = 0.0  # EViT-style: keep rate goes linearly from 1 to keep_rate over these epochs
    schedule: str = "fixed"  # fixed (keep rate solved at locations) | auto (tpsvit.plan on training images; budget)
    calib_images: int = 1000  # schedule auto: the first N training images (un-augmented) calibrate
    scorer: str = "default"  # default | random (random scores: the robustness study's fine-tuned rows)
    temperature: float = 1.0  # the squeeze's similarity temperature (etps / dtps; the paper's is 1)
    squeeze_floor: float | None = None  # beyond the paper: a cosine floor in [-1, 1] below which nothing is squeezed
    squeeze_floor_action: str = "drop"  # beyond the paper: drop | fuse (the tokens below the floor into one token)
    squeeze_weighting: str = "similarity"  # similarity (the paper) | importance (beyond the paper)
    # data
    data: str | None = None  # 'fashion-mnist', a folder of Fashion-MNIST IDX files, or an ImageFolder root
    train_split: str = "train"  # ImageFolder: sub-folder for training (if present)
    val_split: str = "val"  # ImageFolder: sub-folder for evaluation (if present)
    img_size: int | None = None  # default: the model's input size
    limit: int | None = None  # train on the first N images (Fashion-MNIST) / N spread over classes (ImageFolder)
    val_limit: int | None = None
    workers: int = 8  # DataLoader workers per rank (ImageFolder only)
    # schedule
    epochs: int = 30
    steps_per_epoch: int | None = None  # cap the optimiser steps per epoch (quick runs, tests)
    batch_size: int = 1024  # global batch: per-rank batch = batch_size / (world_size * accum_steps), see device_batch
    accum_steps: int = 1
    device_batch: int | None = None  # at most N images per device and micro-step; accumulation keeps batch_size
    lr: float = 2.5e-4
    backbone_lr_scale: float = 1.0  # the release: one lr for every parameter (its scale branch is dead code)
    weight_decay: float = 0.05
    weight_decay_skip_1d: bool = False  # the release decays every parameter; true: none on biases/norms/tokens
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    opt_eps: float = 1e-8
    clip_grad: float | None = None  # max gradient norm, or None
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # augmentation and regularisation
    augment: str = "deit"  # deit (ImageFolder: RandAugment, jitter, erasing) | fmnist (crop+flip on tensors) | none
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    aug_repeats: int = 3  # repeated augmentation: each image seen this many times per epoch across ranks (1: off)
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    drop_path: float = 0.1
    # losses
    distill_weight: float = 0.5  # KL(student logits || teacher logits)
    token_distill_weight: float = 0.5  # final kept patch tokens vs the teacher's at the same positions
    token_distill_loss: str = "kl"  # kl (the release: KL over the channel softmax) | mse
    keep_ratio_weight: float = 2.0  # dtps / dynamicvit only (gumbel predictor_loss)
    # learned predictors (dtps / dynamicvit)
    predictor_init: str = "release"  # release (trunc-normal 0.02) | class-attention (warm start, beyond the paper)
    predictor_init_steps: int = 300  # class-attention warm start: optimiser steps on the training data
    predictor_init_lr: float = 1e-3
    predictor_loss: str = "gumbel"  # gumbel (the paper) | attention-distill (top-k forward, ranking loss)
    attention_distill_weight: float = 1.0  # predictor_loss attention-distill
    # engine
    amp: str = "auto"  # auto (GPU: bf16 from capability 8.0, else fp16 + scaler; CPU: none) | none | bf16 | fp16
    grad_checkpointing: bool = False  # recompute every block in backward (patched ones too); less memory, ~1/3 slower
    find_unused_parameters: bool = False  # DDP; needed only if some parameter gets no gradient
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is much faster on a busy small CPU
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    save_every_steps: int | None = None  # also checkpoint every N optimiser steps (mid-epoch resume)
    log_every: int = 20  # read the loss terms back from the device every N steps (progress bar, non-finite check)
    out: str = "runs/train"
    resume: bool = False
    recipe: str | None = None  # the recipe this config came from (informational)

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able dict of every key."""
        return dataclasses.asdict(self)


# Keys that may differ from the checkpoint's when resuming (they do not change the maths of the run; device_batch
# only regroups the same global batch into micro-batches, so a run that ran out of memory can go on with less).
RESUME_FREE_KEYS = ("epochs", "workers", "device", "device_batch", "threads", "eval_every", "save_every_steps",
                    "log_every", "out", "resume", "recipe")


def valid_keys() -> list[str]:
    """Names of every configuration key."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def recipe_names() -> list[str]:
    """Names of the recipes shipped with tpsvit."""
    folder = resources.files("tpsvit") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """Read a recipe (a shipped name such as ``imagenet-dtps`` or a YAML file) into a dict of keys."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise InvalidArgumentError(f"recipe file {str(path)!r} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        resource = resources.files("tpsvit") / "recipes" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise InvalidArgumentError(
                f"unknown recipe {name_or_path!r}; allowed: {', '.join(recipe_names())} or a .yaml file"
            )
        text, origin = resource.read_text(), str(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InvalidArgumentError(f"recipe {origin!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"recipe {origin!r} must be a mapping of key: value, got {type(data).__name__}")
    check_keys(data, f"recipe {origin!r}")
    return data


def check_keys(values: dict, where: str) -> None:
    """Raise InvalidArgumentError naming the first unknown key and listing the valid ones."""
    keys = valid_keys()
    for key in values:
        if key not in keys:
            raise InvalidArgumentError(f"unknown key {key!r} in {where}; valid keys: {', '.join(keys)}")


def parse_set(items: list[str]) -> dict:
    """``["lr=1e-3", "locations=[3, 6]"]`` -> ``{"lr": 0.001, "locations": [3, 6]}``; values are YAML scalars/lists."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidArgumentError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = _number_or_text(yaml.safe_load(raw)) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    check_keys(out, "--set")
    return out


def _number_or_text(value):
    """YAML 1.1 reads ``1e-3`` as text; take it as the number the user meant."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def resolve(recipe: str | dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a recipe (name, file or dict) and overrides (later wins)."""
    values: dict = {}
    if isinstance(recipe, dict):
        check_keys(recipe, "the recipe")
        values.update(recipe)
    elif recipe is not None:
        values.update(load_recipe(recipe))
        values.setdefault("recipe", recipe)
    overrides = dict(overrides or {})
    check_keys(overrides, "the overrides")
    values.update(overrides)
    return validate(TrainConfig(**values))


def _number(cfg: TrainConfig, key: str, kind=float, low=None, high=None, optional=False, open_low=False) -> None:
    value = getattr(cfg, key)
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if ok and kind is float:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f"{'>' if open_low else '>='} {low}" if low is not None else "any"
        if high is not None:
            rng += f" and <= {high}"
        what = "an integer" if kind is int else "a number"
        raise InvalidArgumentError(f"{key}={value!r} is not allowed; expected {what} ({rng})")
    if kind is float:
        setattr(cfg, key, float(value))


def _choice(cfg: TrainConfig, key: str, allowed) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, str) or value.lower() not in allowed:
        raise InvalidArgumentError(f"{key}={value!r} is not allowed; expected one of {', '.join(allowed)}")
    setattr(cfg, key, value.lower())


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check types and ranges of every key (before any compute); returns the same, normalised config."""
    if not isinstance(cfg.model, str) or not cfg.model:
        raise InvalidArgumentError(f"model={cfg.model!r} is not a timm model name")
    if not isinstance(cfg.model_kwargs, dict):
        raise InvalidArgumentError(f"model_kwargs={cfg.model_kwargs!r} must be a mapping, e.g. {{depth: 4}}")
    for key, value in cfg.model_kwargs.items():
        if not isinstance(key, str) or ":" in key or value is None:
            raise InvalidArgumentError(
                f"model_kwargs entry {key!r}: {value!r} is not a keyword and a value; write YAML with a space after "
                "each colon, e.g. model_kwargs='{depth: 4, embed_dim: 32}'"
            )
    for key in ("pretrained", "resume", "grad_checkpointing", "find_unused_parameters", "weight_decay_skip_1d",
                "freeze_backbone"):
        if not isinstance(getattr(cfg, key), bool):
            raise InvalidArgumentError(f"{key}={getattr(cfg, key)!r} must be true or false")
    if cfg.teacher is None or cfg.teacher is False:
        cfg.teacher = "none"
    if not isinstance(cfg.teacher, str):
        raise InvalidArgumentError(f"teacher={cfg.teacher!r} is not allowed; expected {TEACHERS_HELP}")
    _choice(cfg, "task", TASKS)
    _choice(cfg, "seg_head", SEG_HEADS)
    from tpsvit.core.trace import RESTORE_MODES

    _choice(cfg, "restore", RESTORE_MODES)
    _choice(cfg, "method", METHOD_NAMES)
    _choice(cfg, "augment", AUGMENTS)
    _choice(cfg, "amp", AMP_MODES)
    _choice(cfg, "token_distill_loss", TOKEN_DISTILL_LOSSES)
    _choice(cfg, "scorer", ("default", "random"))
    _number(cfg, "temperature", low=0, open_low=True)
    _number(cfg, "squeeze_floor", low=-1, high=1, optional=True)
    _choice(cfg, "squeeze_floor_action", FLOOR_ACTIONS)
    _choice(cfg, "squeeze_weighting", SQUEEZE_WEIGHTINGS)
    _choice(cfg, "schedule", ("fixed", "auto"))
    _number(cfg, "calib_images", int, low=1)
    _choice(cfg, "predictor_init", PREDICTOR_INITS)
    _choice(cfg, "predictor_loss", PREDICTOR_LOSSES)
    if isinstance(cfg.locations, int) and not isinstance(cfg.locations, bool):
        cfg.locations = [cfg.locations]
    if not isinstance(cfg.locations, (list, tuple)):
        raise InvalidArgumentError(f"locations={cfg.locations!r} must be a list of block indices, e.g. [3, 6, 9]")
    cfg.locations = list(cfg.locations)
    if isinstance(cfg.keep_rate, tuple):
        cfg.keep_rate = list(cfg.keep_rate)
    for rate in cfg.keep_rate if isinstance(cfg.keep_rate, list) else [cfg.keep_rate]:
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1):
            raise InvalidArgumentError(f"keep_rate {rate!r} is outside (0, 1]; allowed: 0 < keep_rate <= 1, one value "
                                       "or one per location")
    if isinstance(cfg.betas, tuple):
        cfg.betas = list(cfg.betas)
    if (not isinstance(cfg.betas, list) or len(cfg.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas)):
        raise InvalidArgumentError(f"betas={cfg.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _number(cfg, "budget", low=0, high=1, open_low=True, optional=True)
    _number(cfg, "keep_rate_anneal_epochs", low=0)
    _number(cfg, "img_size", int, low=1, optional=True)
    _number(cfg, "limit", int, low=1, optional=True)
    _number(cfg, "val_limit", int, low=1, optional=True)
    _number(cfg, "workers", int, low=0)
    _number(cfg, "threads", int, low=1, optional=True)
    _number(cfg, "epochs", int, low=1)
    _number(cfg, "steps_per_epoch", int, low=1, optional=True)
    _number(cfg, "log_every", int, low=1)
    _number(cfg, "batch_size", int, low=1)
    _number(cfg, "accum_steps", int, low=1)
    _number(cfg, "device_batch", int, low=1, optional=True)
    _number(cfg, "lr", low=0, open_low=True)
    _number(cfg, "backbone_lr_scale", low=0)
    _number(cfg, "weight_decay", low=0)
    _number(cfg, "opt_eps", low=0, open_low=True)
    _number(cfg, "clip_grad", low=0, open_low=True, optional=True)
    _number(cfg, "warmup_epochs", low=0)
    _number(cfg, "warmup_lr", low=0)
    _number(cfg, "min_lr", low=0)
    _number(cfg, "color_jitter", low=0)
    _number(cfg, "reprob", low=0, high=1)
    _number(cfg, "aug_repeats", int, low=1)
    _number(cfg, "smoothing", low=0, high=1)
    _number(cfg, "mixup", low=0)
    _number(cfg, "cutmix", low=0)
    _number(cfg, "mixup_prob", low=0, high=1)
    _number(cfg, "mixup_switch_prob", low=0, high=1)
    _number(cfg, "drop_path", low=0, high=1)
    _number(cfg, "distill_weight", low=0)
    _number(cfg, "token_distill_weight", low=0)
    _number(cfg, "keep_ratio_weight", low=0)
    _number(cfg, "predictor_init_steps", int, low=1)
    _number(cfg, "predictor_init_lr", low=0, open_low=True)
    _number(cfg, "attention_distill_weight", low=0)
    _number(cfg, "seed", int, low=0)
    _number(cfg, "eval_every", int, low=1)
    _number(cfg, "save_every_steps", int, low=1, optional=True)
    if cfg.data is None:
        raise InvalidArgumentError("data is not set; pass --data fashion-mnist, a Fashion-MNIST IDX folder or an "
                                   "ImageFolder root (e.g. /data/imagenet with train/ and val/)")
    cfg.data = str(cfg.data)
    if cfg.auto_augment in ("", "none", False):
        cfg.auto_augment = None
    if cfg.budget is not None and cfg.method == "none":
        raise InvalidArgumentError("budget needs a token-reduction method; set method to etps, dtps, evit, ...")
    if cfg.schedule == "auto" and cfg.budget is None:
        raise InvalidArgumentError("schedule=auto picks the schedule for a GMACs budget; set budget (e.g. 0.5)")
    if cfg.task == "segment":
        _check_segment(cfg)
    elif cfg.freeze_backbone:
        raise InvalidArgumentError("freeze_backbone=true trains a segmentation head only; it needs task=segment")
    if cfg.schedule == "auto" and cfg.method in ("dtps", "dynamicvit"):
        raise InvalidArgumentError(f"schedule=auto ranks schedules by accuracy, which {cfg.method}'s untrained "
                                   "predictors cannot give; set locations yourself (schedule=fixed)")
    return cfg


def _check_segment(cfg: TrainConfig) -> None:
    """The settings ``task: segment`` supports (see :mod:`tpsvit.train.segment`)."""
    from tpsvit.data.datasets import embedded_name

    data = embedded_name(cfg.data)
    if data not in SEGMENT_DATA:
        raise InvalidArgumentError(f"task=segment needs pixel labels, which only the cluttered testbeds have: data "
                                   f"{cfg.data!r} is not allowed; expected one of {', '.join(SEGMENT_DATA)}")
    cfg.data = data
    for key in ("distill_weight", "token_distill_weight"):
        if getattr(cfg, key):
            raise InvalidArgumentError(f"{key}={getattr(cfg, key)!r}: task=segment has no distillation losses (the "
                                       "loss is per-pixel cross-entropy); set distill_weight=0 token_distill_weight=0")
    if cfg.mixup or cfg.cutmix:
        raise InvalidArgumentError("task=segment does not mix images (their pixel labels would not follow); set "
                                   "mixup=0 cutmix=0")
    if cfg.augment != "none":
        raise InvalidArgumentError(f"augment={cfg.augment!r}: task=segment trains on the training split's fixed "
                                   "composition and its pixel labels, unaugmented; set augment=none")
    if cfg.schedule == "auto":
        raise InvalidArgumentError("schedule=auto ranks schedules by classification top-1; with task=segment set "
                                   "locations and keep_rate (or budget) yourself (schedule=fixed)")
