"""Setting a training run up: resume checks, the auto schedule, the predictor warm start, model / DDP / optimiser /
lr schedule / scaler, and restoring a saved state."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tpsvit
from tpsvit.data.datasets import normalize_uint8, resize_and_expand
from tpsvit.errors import CheckpointError, InvalidArgumentError
from tpsvit.families import Family
from tpsvit.measure.bench import input_size
from tpsvit.train.checkpoint import STATE_FILE, load_state, set_rng_state
from tpsvit.train.losses import classification_loss
from tpsvit.train.modeling import enable_grad_checkpointing, param_groups, print_notes, squeeze_options
from tpsvit.train.recipe import RESUME_FREE_KEYS, TrainConfig, valid_keys, validate
from tpsvit.train.schedule import lr_factor
from tpsvit.train.segment import SegmentNet, head_groups, pixel_loss
from tpsvit.train.warm_start import warm_start_predictors

WARM_START_EPOCH = 1_000_003  # the warm start's data order: unlike any training epoch's


class _EpochBatches:
    """Re-iterable view of one epoch of a batch source."""

    def __init__(self, source, epoch: int):
        self.source, self.epoch = source, epoch

    def __iter__(self):
        return iter(self.source.batches(self.epoch))


class _WithFeatures(nn.Module):
    """The student as DDP sees it: returns (logits, final token features) in one forward."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x):
        return self.family.logits_and_features(self.model, x)


class SetupMixin:
    """The set-up half of :class:`tpsvit.train.engine.Run` (called from its ``__init__``)."""

    def _auto_schedule(self, raw) -> TrainConfig:
        """Re-patch the student with the schedule :func:`tpsvit.plan` picks on the first training images; the config
        then records the chosen locations and keep rate (or r), so checkpoints and resumes carry them."""
        cfg = self.cfg
        if raw.kind != "tensors":
            raise InvalidArgumentError("schedule=auto in train calibrates on in-memory (Fashion-MNIST) data; for an "
                                       "ImageFolder run `tpsvit eval --schedule auto --calib-data DIR` and set the "
                                       "locations and keep rate it prints")
        chans, height, _ = input_size(self.model)
        size = int(cfg.img_size or height)
        images = normalize_uint8(raw.train.images[: cfg.calib_images])  # only the calibration images, not the split
        calib = (resize_and_expand(images, size, chans),
                 raw.train.labels[: cfg.calib_images])
        options = squeeze_options(cfg)
        schedule = tpsvit.plan(self.model, cfg.method, cfg.budget, data=calib, img_size=cfg.img_size,
                               fixed_locations=tuple(cfg.locations), options=options)
        tpsvit.patch(self.model, **schedule.patch_kwargs(), **options)
        if self.info.is_main:
            print(f"tpsvit train: auto schedule {schedule}", file=sys.stderr)
        amount = {"r": schedule.r, "keep_rate": 1.0} if schedule.r is not None else \
            {"keep_rate": schedule.keep_rate, "r": None}
        return replace(cfg, locations=list(schedule.locations), budget=None, **amount)

    def _warm_start(self) -> None:
        cfg, info = self.cfg, self.info
        self.model.to(info.device)
        batches = _EpochBatches(self.data.train, epoch=WARM_START_EPOCH)
        losses = warm_start_predictors(self.model, batches, cfg.predictor_init_steps, cfg.predictor_init_lr,
                                       info.device, progress=info.is_main)
        if info.is_main:
            print(f"tpsvit train: predictor warm start (class-attention distillation), {len(losses)} steps, "
                  f"ranking loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f}", file=sys.stderr)

    def _resume_state(self, cfg: TrainConfig) -> dict | None:
        if self.out.exists() and not self.out.is_dir():
            raise InvalidArgumentError(f"--out {str(self.out)!r} is a file; give a folder for the run's checkpoints")
        if cfg.resume:
            state = load_state(cfg.out)
            if state is None:
                others = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
                if others:
                    shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                    raise InvalidArgumentError(f"--resume: {self.out} has no {STATE_FILE} to resume but holds other "
                                               f"files ({shown}); check --out, or start a new run in an empty folder")
                if self.info.is_main:
                    print(f"tpsvit train: warning: --resume: nothing to resume in {self.out} (no {STATE_FILE}); "
                          "starting a fresh run", file=sys.stderr)
            return state
        if (self.out / STATE_FILE).exists():
            raise InvalidArgumentError(f"{self.out / STATE_FILE} exists; pass --resume to continue that run or "
                                       "choose another --out")
        return None

    @staticmethod
    def _reconcile(cfg: TrainConfig, saved: TrainConfig) -> TrainConfig:
        saved = validate(saved)
        for key in valid_keys():
            if key not in RESUME_FREE_KEYS and getattr(cfg, key) != getattr(saved, key):
                raise InvalidArgumentError(
                    f"--resume: {key}={getattr(cfg, key)!r} differs from the run being resumed "
                    f"({getattr(saved, key)!r}); drop that option or start a new --out"
                )
        return replace(saved, **{k: getattr(cfg, k) for k in RESUME_FREE_KEYS})

    def _setup_engine(self) -> None:
        cfg, info = self.cfg, self.info
        model = self.model.to(info.device)
        if self.teacher is not None:
            self.teacher.to(info.device)
        self.checkpointed_blocks = enable_grad_checkpointing(model) if cfg.grad_checkpointing else 0
        self.target_rates = model.tps.keep_rate if tpsvit.is_patched(model) else None
        if self.segmenter is not None:
            self.segmenter.to(info.device)
            self.net = SegmentNet(self.segmenter)
        else:
            self.net = _WithFeatures(model, self.family)
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # a 1-channel patch embedding's weight has a size-1 dim whose stride autograd lays out differently from
            # DDP's bucket; harmless, but DDP warns on every step
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.net = DistributedDataParallel(self.net, device_ids=ids,
                                               find_unused_parameters=cfg.find_unused_parameters)
        fused = {"fused": True} if info.device.type == "cuda" else {}
        groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay, cfg.weight_decay_skip_1d)
        if self.segmenter is not None:
            groups += head_groups(self.segmenter.head, cfg.lr, cfg.weight_decay, cfg.weight_decay_skip_1d)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.opt_eps, **fused)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, warmup, cfg.lr, cfg.warmup_lr, cfg.min_lr),
        )
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp == torch.float16)
        self.zero_loss = torch.zeros((), device=info.device)  # a loss term this run does not compute
        self.nonfinite_streak = 0  # optimizer steps in a row with a non-finite loss (fp16: skipped by the scaler)
        self.skipped_steps = 0  # optimizer steps the fp16 scaler skipped (the lr schedule waited for each)
        self.mixup = None
        if self.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=self.family.num_classes(model))
        self.criterion = pixel_loss(cfg.smoothing) if self.segmenter is not None else \
            classification_loss(self.mixup_active, cfg.smoothing)

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            if self.segmenter is not None:
                self.segmenter.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot resume from {self.out / STATE_FILE}: {str(err).splitlines()[0]}") from None
        print_notes(set_rng_state(state["rng"]), self.info.is_main)
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_top1 = float(state["best_top1"])
        self.partial = dict(state["partial"])
        self.wall_time = float(state["wall_time_s"])
        if self.info.is_main:
            print(f"tpsvit train: resuming {self.out} at epoch {self.start_epoch + 1}, step {self.start_step} "
                  f"(global step {self.global_step})", file=sys.stderr)
