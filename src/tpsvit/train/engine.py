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
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import tpsvit
from tpsvit.errors import DatasetError, InvalidArgumentError
from tpsvit.families import family_of
from tpsvit.patch import set_predictor_training
from tpsvit.train import distributed
from tpsvit.train.data_loading import build_data, find_data, mix_seed
from tpsvit.train.interrupt import InterruptMixin, _StopRequest
from tpsvit.train.losses import (
    attention_ranking_loss,
    keep_ratio_loss,
    logit_distillation,
    token_distillation,
)
from tpsvit.train.metrics import COLUMNS, SEGMENT_COLUMNS, MetricsWriter
from tpsvit.train.modeling import build_models, print_notes
from tpsvit.train.precision import _AMP_DTYPES, _resolve_amp
from tpsvit.train.precision import choose_amp as choose_amp  # re-exported: tpsvit.train.engine.choose_amp
from tpsvit.train.recipe import TrainConfig, resolve, validate
from tpsvit.train.reporting import ReportingMixin
from tpsvit.train.schedule import lr_factor
from tpsvit.train.segment import build_segmenter, segment_data
from tpsvit.train.setup import SetupMixin
from tpsvit.train.setup import _WithFeatures as _WithFeatures  # re-exported: the student wrapper DDP sees

LOSS_KEYS = ("total", "ce", "distill", "token", "keep_ratio", "attention_distill")
# fp16 with a gradient scaler: a non-finite loss is left to the scaler, which skips that optimizer step and lowers its
# scale; only this many non-finite steps in a row abort the run (without a scaler the first one does)
MAX_NONFINITE_STEPS = 5


# torch >= 2.5 has torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there and exists before
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _to_host(values: torch.Tensor) -> list:
    """``values.tolist()``: every read of training-step results from the device goes through here (one per logging
    interval, see :meth:`Run._read_losses`; fp16 adds one per step), so that tests can count them."""
    return values.tolist()


class Run(SetupMixin, ReportingMixin, InterruptMixin):
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
        # task segment: the backbone (self.model) + restore + a dense head; the headline metric is mIoU, not top-1
        self.segmenter = build_segmenter(cfg, self.model) if cfg.task == "segment" else None
        self.metric = "test_miou" if self.segmenter is not None else "test_top1"
        if self.segmenter is not None:
            self.data = segment_data(cfg, raw, self.model, info.rank, info.world_size, self.per_rank,
                                     self.per_rank * 2)
        else:
            self.data = build_data(cfg, raw, self.model, info.rank, info.world_size, self.per_rank,
                                   self.per_rank * 2, pin_memory=info.device.type == "cuda")
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
        if learned and cfg.predictor_loss == "attention-distill" and self.segmenter is None:
            set_predictor_training(self.model, "topk", record_class_attention=True)
        self._setup_engine()
        self.history: list[dict] = []
        self.best_top1 = -1.0
        self.start_epoch, self.start_step, self.global_step, self.partial = 0, 0, 0, {}
        self.wall_time = 0.0
        if self.state is not None:
            self._restore(self.state)
        self.metrics = MetricsWriter(self.out, cfg.to_dict(), enabled=info.is_main,
                                     columns=SEGMENT_COLUMNS if self.segmenter is not None else COLUMNS)

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
        if self.segmenter is not None:  # per-pixel cross-entropy only
            return {**terms, "total": total}
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
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad)
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

    def current_lr(self) -> float:
        """The predictor (main) learning rate now."""
        cfg = self.cfg
        # the scheduler's own count: it does not advance on steps the fp16 scaler skipped
        return cfg.lr * lr_factor(self.scheduler.last_epoch, self.total_steps, self.warmup_steps, cfg.lr, cfg.warmup_lr,
                                  cfg.min_lr)

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
            score = row.get(self.metric)  # top-1, or mIoU for task segment (kept in best_top1 either way)
            if score is not None and score > self.best_top1:
                self.best_top1 = score
                self._export("best.safetensors", score, epoch + 1)
            self._save_state(epoch + 1, 0)
            self.metrics.write(self.history, self.summary())
            if info.is_main:
                print(self._epoch_line(row), file=sys.stderr)
            if epoch + 1 < cfg.epochs and self._stop_requested():
                self._interrupted(epoch + 1, 0)
        final_score = self.history[-1].get(self.metric) if self.history else None
        final = self._export("final.safetensors", final_score, cfg.epochs)
        self.metrics.write(self.history, self.summary())
        self.metrics.close()
        distributed.barrier(info)
        extra = {"segmenter": self.segmenter} if self.segmenter is not None else {}
        return {**self.summary(), "final": str(final) if final else None, "history": self.history,
                "model": self.model, **extra}


def _as_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return validate(config)
    if isinstance(config, dict):
        return resolve(config.get("recipe"), {k: v for k, v in config.items()})
    raise InvalidArgumentError(f"train() takes a TrainConfig or a dict of keys, got {type(config).__name__}")


def train(config, command: str | None = None) -> dict:
    """Fine-tune (or train) a model as ``config`` says; returns the results (metrics, paths, the trained model;
    task segment: also the trained ``segmenter``, backbone + head).

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
