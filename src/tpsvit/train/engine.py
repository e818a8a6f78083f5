"""The training loop: one process or PyTorch DDP (launched by torchrun), resumable mid-epoch.

Per optimiser step, every RNG (python, numpy, torch) is re-seeded from (seed, epoch, step, rank), and the data order
is a function of (seed, epoch); so a run resumed from ``last.pt`` replays exactly the steps it would have run
(Fashion-MNIST bit-exact; ImageFolder: same images, worker-side augmentation may differ). The RNG states are saved
in the checkpoint as well.

Learning rate: linear warm-up per step from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then cosine to
``min_lr`` (torch's LambdaLR). With ``backbone_lr_scale != 1`` the backbone group follows the same curve scaled.
``lr`` is for the global ``batch_size`` and is never rescaled automatically.

Host syncs: the loss terms stay on the device and are read back once every ``log_every`` steps (and before a
checkpoint and at the end of an epoch); the progress bar, the non-finite-loss check (fp32/bf16: so up to ``log_every``
steps late, but before anything is saved) and, under DDP, the ranks' agreement on a Ctrl-C happen there. fp16 adds
one read per step: whether the gradient scaler skipped it (the lr schedule then waits).
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import tpsvit
from tpsvit.data.datasets import normalize_uint8, resize_and_expand
from tpsvit.errors import CheckpointError, DatasetError, InvalidArgumentError
from tpsvit.families import Family, family_of, logits_of
from tpsvit.io.loading import save_checkpoint
from tpsvit.measure.bench import input_size
from tpsvit.measure.flops import counted_gmacs, gmacs
from tpsvit.patch import set_predictor_training
from tpsvit.train import distributed
from tpsvit.train.checkpoint import STATE_FILE, load_state, rng_state, save_state, set_rng_state
from tpsvit.train.data_loading import build_data, find_data, mix_seed
from tpsvit.train.losses import (
    accuracy,
    attention_ranking_loss,
    classification_loss,
    keep_ratio_loss,
    logit_distillation,
    token_distillation,
)
from tpsvit.train.metrics import MetricsWriter
from tpsvit.train.modeling import build_models, enable_grad_checkpointing, param_groups, print_notes
from tpsvit.train.recipe import RESUME_FREE_KEYS, TrainConfig, resolve, valid_keys, validate
from tpsvit.train.warm_start import warm_start_predictors

LOSS_KEYS = ("total", "ce", "distill", "token", "keep_ratio", "attention_distill")
# fp16 with a gradient scaler: a non-finite loss is left to the scaler, which skips that optimizer step and lowers its
# scale; only this many non-finite steps in a row abort the run (without a scaler the first one does)
MAX_NONFINITE_STEPS = 5


# torch >= 2.5 has torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there and exists before
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

WARM_START_EPOCH = 1_000_003  # the warm start's data order: unlike any training epoch's


def _to_host(values: torch.Tensor) -> list:
    """``values.tolist()``: every read of training-step results from the device goes through here (one per logging
    interval, see :meth:`Run._read_losses`; fp16 adds one per step), so that tests can count them."""
    return values.tolist()


class _StopRequest:
    """SIGINT / SIGTERM during :meth:`Run.fit`: finish the current optimiser step (DDP: run on to the next logging
    point, where the ranks agree to stop at the same step), save ``last.pt`` there, then stop
    (:meth:`Run._interrupted`). A second signal stops at once, without saving. Handlers are installed only in the
    main thread and restored on exit."""

    def __init__(self, when: str = "after this step"):
        self.signum, self.previous, self.when = None, {}, when

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\ntpsvit train: {signal.Signals(signum).name}: saving last.pt {self.when} (send it again to stop "
              "without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        return False


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


def lr_factor(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: linear warm-up, then cosine to ``min_lr``."""
    if warmup > 0 and step < warmup:
        start = warmup_lr / lr
        return start + (1.0 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def choose_amp(amp: str, device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on a device of this type and CUDA compute ``capability`` (major, minor).

    ``auto``: bf16 on GPUs with native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx+), fp16 with a gradient
    scaler below (V100, T4: their bf16 is emulated and slow), none on CPU. Explicit ``bf16`` is honoured everywhere.
    """
    if amp == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if capability is not None and tuple(capability) >= (8, 0) else torch.float16
    if amp == "none":
        return None
    if amp == "fp16" and device_type != "cuda":
        raise InvalidArgumentError("amp=fp16 needs a GPU; use amp=bf16 or none on CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """:func:`choose_amp` for the training device (its own capability, not the current device's)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return choose_amp(amp, device.type, capability)


_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_name(dtype: torch.dtype | None) -> str:
    return next(name for name, value in _AMP_DTYPES.items() if value == dtype)


def _machine(device: torch.device) -> str:
    what = f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads"
    if device.type == "cuda":
        what += f", {torch.cuda.get_device_name(device)}"
    return f"{what}, torch {torch.__version__}"


class Run:
    """One training run: set up everything (all input checks first), then :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, command: str):
        self.info, self.command = info, command
        self.out = Path(cfg.out)
        self.state = self._resume_state(cfg)
        if self.state is not None:
            cfg = self._reconcile(cfg, TrainConfig(**self.state["config"]))
        self.cfg = cfg
        self.per_rank, self.accum = distributed.split_batch(cfg.batch_size, info.world_size, cfg.accum_steps,
                                                            cfg.device_batch)
        self.mixup_active = cfg.mixup > 0 or cfg.cutmix > 0
        if self.mixup_active and self.per_rank % 2:
            raise InvalidArgumentError(f"mixup/cutmix need an even per-rank batch, got {self.per_rank}; change "
                                       "batch_size or set mixup=0 cutmix=0")
        self.amp = _resolve_amp(cfg.amp, info.device)
        if self.state is not None and cfg.amp == "auto" and "amp" in self.state:
            # keep the arithmetic the run started with (a run begun on CPU and resumed on a GPU stays fp32)
            self.amp = _AMP_DTYPES[self.state["amp"]]
        raw = distributed.main_first(info, lambda: find_data(cfg))  # rank 0 downloads / unpacks first
        models = build_models(cfg, len(raw.classes))
        print_notes(models.notes, info.is_main)
        self.models, self.model, self.teacher = models, models.student, models.teacher
        self.family = family_of(self.model)  # looked up once: the training step uses it on every forward
        self.teacher_family = family_of(self.teacher) if self.teacher is not None else None
        self.data = build_data(cfg, raw, self.model, info.rank, info.world_size, self.per_rank, self.per_rank * 2,
                               pin_memory=info.device.type == "cuda")
        model_classes = self.family.num_classes(self.model)
        if len(self.data.classes) != model_classes:
            raise DatasetError(f"the data has {len(self.data.classes)} classes, the model {model_classes}")
        self.steps_per_epoch = len(self.data.train) // self.accum
        if cfg.steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise DatasetError(f"{self.data.description} gives no full batch of {cfg.batch_size}; lower batch_size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.schedule == "auto" and self.state is None:
            cfg = self.cfg = self._auto_schedule(raw)
        learned = tpsvit.is_patched(self.model) and self.model.tps.spec.learned
        if learned and cfg.predictor_init == "class-attention" and self.state is None:
            self._warm_start()
        if learned and cfg.predictor_loss == "attention-distill":
            set_predictor_training(self.model, "topk", record_class_attention=True)
        self._setup_engine()
        self.history: list[dict] = []
        self.best_top1 = -1.0
        self.start_epoch, self.start_step, self.global_step, self.partial = 0, 0, 0, {}
        self.wall_time = 0.0
        if self.state is not None:
            self._restore(self.state)
        self.metrics = MetricsWriter(self.out, cfg.to_dict(), enabled=info.is_main)

    # ------------------------------------------------------------------------------------------------ set-up

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
        schedule = tpsvit.plan(self.model, cfg.method, cfg.budget, data=calib, img_size=cfg.img_size,
                               fixed_locations=tuple(cfg.locations))
        tpsvit.patch(self.model, **schedule.patch_kwargs())
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
        self.net = _WithFeatures(model, self.family)
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # a 1-channel patch embedding's weight has a size-1 dim whose stride autograd lays out differently from
            # DDP's bucket; harmless, but DDP warns on every step
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.net = DistributedDataParallel(self.net, device_ids=ids,
                                               find_unused_parameters=cfg.find_unused_parameters)
        fused = {"fused": True} if info.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay, cfg.weight_decay_skip_1d),
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.opt_eps, **fused,
        )
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
        self.criterion = classification_loss(self.mixup_active, cfg.smoothing)

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
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

    # ------------------------------------------------------------------------------------------------ steps

    def _seed_step(self, epoch: int, step: int) -> None:
        seed = mix_seed(self.cfg.seed, epoch, step, self.info.rank, 11)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _anneal(self) -> None:
        epochs = self.cfg.keep_rate_anneal_epochs
        if not epochs or self.target_rates is None:
            return
        t = min(1.0, self.global_step / max(1.0, epochs * self.steps_per_epoch))
        tpsvit.set_keep_rate(self.model, [1.0 - t * (1.0 - k) for k in self.target_rates])

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp)

    def _losses(self, x, logits, features, target) -> dict:
        cfg, model = self.cfg, self.model
        terms = {"ce": self.criterion(logits.float(), target)}
        total = terms["ce"]
        prefix = self.family.num_prefix_tokens(model)
        state = tpsvit.forward_state(model) if tpsvit.is_patched(model) else None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits, t_features = self.teacher_family.logits_and_features(self.teacher, x)
            if self.models.distill_logits:
                terms["distill"] = logit_distillation(logits, t_logits)
                total = total + cfg.distill_weight * terms["distill"]
            if cfg.token_distill_weight > 0:
                where = {}
                if state is not None and state.masked and state.policy is not None:
                    where["policy"] = state.policy[:, prefix:]
                elif state is not None and not state.masked and state.positions is not None:
                    where["positions"] = state.positions
                terms["token"] = token_distillation(features[:, prefix:], t_features[:, prefix:], **where,
                                                    kind=cfg.token_distill_loss)
                total = total + cfg.token_distill_weight * terms["token"]
        if state is not None and state.ranking:
            terms["attention_distill"] = attention_ranking_loss(state.ranking)
            total = total + cfg.attention_distill_weight * terms["attention_distill"]
            state.ranking.clear()
        elif cfg.keep_ratio_weight > 0 and state is not None and state.masked and state.decisions:
            terms["keep_ratio"] = keep_ratio_loss(state.decisions, model.tps.keep_rate)
            total = total + cfg.keep_ratio_weight * terms["keep_ratio"]
        terms["total"] = total
        return terms

    def _step(self, batches, epoch: int, step: int) -> torch.Tensor:
        """One optimiser step of ``accum`` micro-steps. Nothing is read back from the device (fp16: one read, whether
        the scaler skipped the step, see below): the loss terms of every micro-step come back as a device tensor
        (``accum`` x ``len(LOSS_KEYS)``, float32; 0 for a term this run does not compute), which
        :meth:`_read_losses` brings to the host and checks at the next logging point."""
        cfg, info = self.cfg, self.info
        self._seed_step(epoch, step)
        self._anneal()
        accum = self.accum
        scaling = self.scaler.is_enabled()
        rows = []
        for micro in range(accum):
            x, y = next(batches)
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            last = micro == accum - 1
            sync = self.net.no_sync() if info.distributed and not last else contextlib.nullcontext()
            try:
                with sync:
                    with self._autocast():
                        logits, features = self.net(x)
                        terms = self._losses(x, logits, features, target)
                    rows.append(torch.stack([terms[k].detach().float() if k in terms else self.zero_loss
                                             for k in LOSS_KEYS]))
                    # a non-finite loss is backpropagated too: fp16's scaler then skips the step; without a scaler
                    # _read_losses aborts the run at the next logging point, before anything is saved
                    self.scaler.scale(terms["total"] / accum).backward()
            except OUT_OF_MEMORY as err:
                raise InvalidArgumentError(self.out_of_memory_message()) from err
        losses = torch.stack(rows)
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        scale = self.scaler._get_scale_async().clone() if scaling else None  # on the device: no sync
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = False
        if scaling:
            # fp16: the scaler lowers its scale exactly when it skipped optimizer.step() for inf/nan gradients; the lr
            # schedule then waits too (no "scheduler before optimizer" warning, no drift of the schedule). Knowing
            # that needs the host, so fp16 reads back once per step: the skip and the loss's finiteness together
            lowered = self.scaler._get_scale_async() < scale
            nonfinite = ~torch.isfinite(losses[:, 0]).all()
            skipped, nonfinite = (flag > 0 for flag in _to_host(torch.stack([lowered, nonfinite]).float()))
            self.nonfinite_streak = self.nonfinite_streak + 1 if nonfinite else 0
            if self.nonfinite_streak >= MAX_NONFINITE_STEPS:
                total = next(v for v in losses[:, 0].tolist() if not math.isfinite(v))
                raise FloatingPointError(f"loss is {total} at epoch {epoch + 1} step {step}, the "
                                         f"{MAX_NONFINITE_STEPS}th optimizer step in a row with a non-finite loss "
                                         "(the fp16 gradient scaler skipped the previous ones); lower lr or use "
                                         "amp=bf16/none")
        if not skipped:
            self.scheduler.step()
        self.skipped_steps += int(skipped)
        self.global_step += 1
        return losses

    def _read_losses(self, pending: list, sums: dict, epoch: int, done: int) -> bool:
        """Bring the loss terms of the steps in ``pending`` ((step, :meth:`_step`'s tensor) pairs) to the host in one
        read, add them to the epoch's ``sums`` and check them; empties ``pending``. Returns whether to stop (a
        SIGINT/SIGTERM arrived; DDP: on any rank, so that every rank stops at the same step).

        A non-finite loss is left out of the sums (fp16: the scaler skipped that step). Without a gradient scaler it
        aborts the run here, naming its step: up to ``log_every`` steps after it happened, as the losses are read
        only at these points; nothing is saved in between (checkpoints come after a read). DDP: every rank aborts."""
        rows = _to_host(torch.stack([losses for _, losses in pending])) if pending else []
        bad = self._add_losses(pending, rows, sums)
        pending.clear()
        stop, failed = distributed.all_reduce_sum([float(self._stop_signalled()), float(bad is not None)], self.info)
        if bad is not None:
            raise FloatingPointError(self._nonfinite_message(*bad, epoch, done))
        if failed:
            raise FloatingPointError(f"another rank had a non-finite loss by epoch {epoch + 1} step {done} (its "
                                     "error says where); lower lr or use amp=none")
        return stop > 0

    def _add_losses(self, pending: list, rows: list, sums: dict) -> tuple[float, int] | None:
        """Add the host ``rows`` of the ``pending`` steps to ``sums`` (per step: the sum of its micro-steps' terms /
        accum, as float64, in order); returns (loss, step) of the first non-finite loss when there is no scaler."""
        bad = None
        scaling = self.scaler.is_enabled()
        for (step, _), micro_rows in zip(pending, rows, strict=True):
            step_sums = dict.fromkeys(LOSS_KEYS, 0.0)
            for row in micro_rows:
                if math.isfinite(row[0]):  # a non-finite micro-step (fp16: skipped by the scaler) stays out
                    for key, value in zip(LOSS_KEYS, row, strict=True):
                        step_sums[key] += value / self.accum
                elif bad is None and not scaling:
                    bad = (row[0], step)
            for key in LOSS_KEYS:
                sums[key] += step_sums[key]
        return bad

    def _pending_nonfinite(self, pending: list, epoch: int, err: BaseException) -> None:
        """A step failed: if an unread earlier step had a non-finite loss (no scaler), raise that instead, as the
        failure may well follow from it (non-finite weights)."""
        if not pending or self.scaler.is_enabled():
            return
        try:
            bad = self._add_losses(pending, _to_host(torch.stack([losses for _, losses in pending])),
                                   dict.fromkeys(LOSS_KEYS, 0.0))
        except Exception:
            return
        if bad is not None:
            raise FloatingPointError(self._nonfinite_message(*bad, epoch, None)) from err

    def _nonfinite_message(self, total: float, step: int, epoch: int, found: int | None) -> str:
        where = f"loss is {total} at epoch {epoch + 1} step {step}; lower lr or use amp=none"
        when = "when a later step failed" if found is None else f"at the loss check after step {found}"
        return (f"{where} (found {when}: the losses are read from the device every log_every="
                f"{self.cfg.log_every} steps; nothing was saved after step {step})")

    def _device_batch_note(self) -> str:
        cap = self.cfg.device_batch
        return f" (device_batch {cap})" if cap is not None else ""

    def out_of_memory_message(self) -> str:
        """What to set when a micro-step runs out of device memory."""
        cfg, info = self.cfg, self.info
        smaller = max(1, self.per_rank // 2)
        hints = [f"--device-batch {smaller} (config key device_batch; gradient accumulation is raised automatically "
                 f"to keep the global batch {cfg.batch_size})"]
        if not cfg.grad_checkpointing:
            hints.append("--grad-checkpointing")
        again = " and rerun with --resume" if (self.out / STATE_FILE).exists() else " and rerun"
        return (f"out of memory on {info.device} at {self.per_rank} images per device and micro-step (global batch "
                f"{cfg.batch_size} = {info.world_size} rank(s) x {self.per_rank} x {self.accum} accumulation steps); "
                f"set {' and/or '.join(hints)}{again}")

    def current_lr(self) -> float:
        """The predictor (main) learning rate now."""
        cfg = self.cfg
        # the scheduler's own count: it does not advance on steps the fp16 scaler skipped
        return cfg.lr * lr_factor(self.scheduler.last_epoch, self.total_steps, self.warmup_steps, cfg.lr, cfg.warmup_lr,
                                  cfg.min_lr)

    # ------------------------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 / loss on the evaluation split (sharded over ranks), and GMACs per image."""
        model, info = self.model, self.info
        model.eval()
        counts = [0.0, 0.0, 0.0, 0.0]  # top1, top5, loss sum, images
        for x, y in self.data.eval.batches():
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            with self._autocast():
                logits = logits_of(model(x))
            top1, top5 = accuracy(logits, y)
            counts = [counts[0] + top1, counts[1] + top5,
                      counts[2] + float(F.cross_entropy(logits.float(), y, reduction="sum")), counts[3] + len(y)]
        counts = distributed.all_reduce_sum(counts, info)
        gmacs = self._gmacs()
        model.train()
        n = max(1.0, counts[3])
        return {"test_top1": 100.0 * counts[0] / n, "test_top5": 100.0 * counts[1] / n,
                "test_loss": counts[2] / n, "gmacs": gmacs}

    def _gmacs(self) -> float:
        img_size = int(self.cfg.img_size or input_size(self.model)[1])
        try:
            return float(gmacs(self.model, img_size=img_size))
        except Exception:  # no analytic count for this model: count the real forward
            return counted_gmacs(self.model, img_size=img_size)

    # ------------------------------------------------------------------------------------------------ saving

    def _state(self, epoch: int, step: int) -> dict:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "amp": _amp_name(self.amp),  # the resolved choice: `amp: auto` keeps it on resume
            "epoch": epoch,
            "step_in_epoch": step,
            "global_step": self.global_step,
            "epochs": self.cfg.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "rng": rng_state(),
            "history": self.history,
            "best_top1": self.best_top1,
            "partial": self.partial,
            "wall_time_s": self.wall_time,
        }

    def _save_state(self, epoch: int, step: int) -> None:
        if self.info.is_main:
            save_state(self.out, self._state(epoch, step))
        distributed.barrier(self.info)

    def _export(self, name: str, top1: float | None, epoch: int) -> Path | None:
        if not self.info.is_main:
            return None
        return save_checkpoint(
            self.model, self.out / name, self.models.name, self.models.kwargs,
            command=self.command, seed=self.cfg.seed, epochs=epoch, total_epochs=self.cfg.epochs,
            global_step=self.global_step, test_top1=top1, wall_time_s=round(self.wall_time, 1),
            machine=_machine(self.info.device), world_size=self.info.world_size, recipe=self.cfg.recipe,
            data=self.cfg.data, trained_by="tpsvit train",
        )

    # ------------------------------------------------------------------------------------------------ loop

    def _train_epoch(self, epoch: int, start: int) -> dict:
        cfg, info = self.cfg, self.info
        self.net.train()
        prior = float(self.partial.get("elapsed", 0.0)) if start else 0.0
        sums = {k: float(self.partial.get(k, 0.0)) if start else 0.0 for k in LOSS_KEYS}
        batches = self.data.train.batches(epoch, start * self.accum)
        bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not info.is_main, file=sys.stderr, dynamic_ncols=True, leave=True)
        began = segment = time.time()
        pending = []  # (step, loss terms on the device) of the steps since the last read
        for step in range(start, self.steps_per_epoch):
            try:
                pending.append((step, self._step(batches, epoch, step)))
            except Exception as err:
                self._pending_nonfinite(pending, epoch, err)
                raise
            done = step + 1
            bar.update(1)
            last = done == self.steps_per_epoch
            save = bool(cfg.save_every_steps) and self.global_step % cfg.save_every_steps == 0 and not last
            # one process: a signal stops after this step (reading a flag is free); DDP: the ranks agree at a read
            signalled = not info.distributed and not last and self._stop_signalled()
            stop = False
            if last or save or signalled or self.global_step % cfg.log_every == 0:
                stop = self._read_losses(pending, sums, epoch, done) and not last
                bar.set_postfix(loss=f"{sums['total'] / done:.4f}", lr=f"{self.current_lr():.3g}", refresh=False)
            if stop or save:
                now = time.time()
                self.wall_time += now - segment
                segment = now
                self.partial = {**sums, "elapsed": prior + now - began}
                self._save_state(epoch, done)
            if stop:
                bar.close()
                self._interrupted(epoch, done)
        bar.close()
        end = time.time()
        self.wall_time += end - segment
        here = end - began
        self.partial = {}
        means = distributed.all_reduce_sum([sums[k] / self.steps_per_epoch for k in LOSS_KEYS], info)
        names = {"total": "train_loss", "ce": "loss_ce", "distill": "loss_distill", "token": "loss_token",
                 "keep_ratio": "loss_keep_ratio", "attention_distill": "loss_attention_distill"}
        row = {names[k]: v / info.world_size for k, v in zip(LOSS_KEYS, means, strict=True)}
        trained = (self.steps_per_epoch - start) * cfg.batch_size
        return {**row, "epoch_time_s": prior + here, "train_images": self.steps_per_epoch * cfg.batch_size,
                "train_images_per_s": trained / here if here > 0 else None}

    def fit(self) -> dict:
        """Train from the current position to the last epoch; returns the results dict."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            extra = f", {self.checkpointed_blocks} blocks checkpointed" if self.checkpointed_blocks else ""
            what = str(self.model.tps) if tpsvit.is_patched(self.model) else "unpatched"
            print(f"tpsvit train: {cfg.model} ({what}) on {self.data.description}; {cfg.epochs} epochs x "
                  f"{self.steps_per_epoch} steps, global batch {cfg.batch_size} = {info.world_size} ranks x "
                  f"{self.per_rank} per device x {self.accum} accum{self._device_batch_note()}, device {info.device}, "
                  f"amp {self.amp or 'off'}{extra} -> {self.out}", file=sys.stderr)
        when = f"within {cfg.log_every} steps (log_every)" if info.distributed else "after this step"
        with _StopRequest(when) as self._stop:
            return self._fit()

    def _stop_signalled(self) -> bool:
        """Whether a SIGINT/SIGTERM arrived in this process."""
        return getattr(self, "_stop", None) is not None and self._stop.signum is not None

    def _stop_requested(self) -> bool:
        """Whether a SIGINT/SIGTERM arrived (on any rank: every rank stops at the same step)."""
        return distributed.all_reduce_sum([float(self._stop_signalled())], self.info)[0] > 0

    def _interrupted(self, epoch: int, step: int) -> None:
        """After the state was saved at (epoch, step): say how to resume, then stop with KeyboardInterrupt."""
        if self.info.is_main:
            try:
                words = shlex.split(self.command)
            except ValueError:
                words = [self.command]
            again = self.command if "--resume" in words else f"{self.command} --resume"
            print(f"tpsvit train: stopped at epoch {epoch + 1} step {step}/{self.steps_per_epoch} (global step "
                  f"{self.global_step}); saved {self.out / STATE_FILE}; continue with: {again}", file=sys.stderr,
                  flush=True)
        raise KeyboardInterrupt

    def _fit(self) -> dict:
        cfg, info = self.cfg, self.info
        last_eval = None
        for epoch in range(self.start_epoch, cfg.epochs):
            start = self.start_step if epoch == self.start_epoch else 0
            row = {"epoch": epoch + 1, **self._train_epoch(epoch, start)}
            row["global_step"] = self.global_step
            row["lr"] = self.current_lr()
            row["lr_backbone"] = row["lr"] * cfg.backbone_lr_scale
            row["keep_rate"] = list(self.model.tps.keep_rate) if tpsvit.is_patched(self.model) and \
                self.model.tps.keep_rate is not None else None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                last_eval = self.evaluate()
                row.update(last_eval)
            self.history.append(row)
            top1 = row.get("test_top1")
            if top1 is not None and top1 > self.best_top1:
                self.best_top1 = top1
                self._export("best.safetensors", top1, epoch + 1)
            self._save_state(epoch + 1, 0)
            self.metrics.write(self.history, self.summary())
            if info.is_main:
                print(self._epoch_line(row), file=sys.stderr)
            if epoch + 1 < cfg.epochs and self._stop_requested():
                self._interrupted(epoch + 1, 0)
        final_top1 = self.history[-1].get("test_top1") if self.history else None
        final = self._export("final.safetensors", final_top1, cfg.epochs)
        self.metrics.write(self.history, self.summary())
        self.metrics.close()
        distributed.barrier(info)
        return {**self.summary(), "final": str(final) if final else None, "history": self.history,
                "model": self.model}

    def summary(self) -> dict:
        """Headline numbers of the run so far."""
        return {"out": str(self.out), "epochs": self.cfg.epochs, "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch, "best_top1": self.best_top1 if self.best_top1 >= 0 else None,
                "final_top1": self.history[-1].get("test_top1") if self.history else None,
                "wall_time_s": self.wall_time, "world_size": self.info.world_size, "command": self.command}

    def _epoch_line(self, row: dict) -> str:
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}: loss {row['train_loss']:.4f} (ce {row['loss_ce']:.4f}"]
        for key, label in (("loss_distill", "kd"), ("loss_token", "tok"), ("loss_keep_ratio", "ratio"),
                           ("loss_attention_distill", "attn")):
            if row.get(key):
                parts.append(f" {label} {row[key]:.4f}")
        parts.append(")")
        if row.get("test_top1") is not None:
            parts.append(f", test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}%, "
                         f"{row['gmacs']:.4g} GMACs")
        ips = row.get("train_images_per_s")
        parts.append(f", {row['epoch_time_s']:.0f} s" + (f" ({ips:.0f} img/s)" if ips else ""))
        return "tpsvit train: " + "".join(parts)


def _as_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return validate(config)
    if isinstance(config, dict):
        return resolve(config.get("recipe"), {k: v for k, v in config.items()})
    raise InvalidArgumentError(f"train() takes a TrainConfig or a dict of keys, got {type(config).__name__}")


def train(config, command: str | None = None) -> dict:
    """Fine-tune (or train) a model as ``config`` says; returns the results (metrics, paths, the trained model).

    ``config``: a :class:`TrainConfig` or a dict of its keys (``{"recipe": "fmnist-scratch", "epochs": 1}``).
    Launched by torchrun, every rank calls this; rank 0 writes files. ``lr`` is for the global batch and is not
    rescaled (see :mod:`tpsvit.train.recipe`).
    """
    cfg = _as_config(config)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    command = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    info = distributed.setup(cfg.device)
    try:
        return Run(cfg, info, command).fit()
    finally:
        distributed.teardown(info)
        torch.set_num_threads(threads)
