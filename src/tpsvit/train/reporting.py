"""What a training run reports and writes: evaluation, the resumable state and exported checkpoints, the summary
and the per-epoch line, the out-of-memory advice."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tpsvit.dense import save_segmenter
from tpsvit.families import logits_of
from tpsvit.io.loading import save_checkpoint
from tpsvit.measure.bench import input_size
from tpsvit.measure.flops import counted_gmacs, gmacs
from tpsvit.train import distributed
from tpsvit.train.checkpoint import STATE_FILE, rng_state, save_state
from tpsvit.train.losses import accuracy
from tpsvit.train.precision import _amp_name, _machine
from tpsvit.train.segment import evaluate_segmenter


class ReportingMixin:
    """The reporting half of :class:`tpsvit.train.engine.Run`."""

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

    # ------------------------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 / loss on the evaluation split (sharded over ranks), and GMACs per image; task segment:
        mIoU / pixel accuracy / per-pixel loss (:func:`tpsvit.train.segment.evaluate_segmenter`)."""
        model, info = self.model, self.info
        if self.segmenter is not None:
            return evaluate_segmenter(self.segmenter, self.data.eval.batches(), info, self._autocast,
                                      int(self.cfg.img_size or input_size(model)[1]))
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
            **({"head": self.segmenter.head.state_dict()} if self.segmenter is not None else {}),
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

    def _export(self, name: str, score: float | None, epoch: int) -> Path | None:
        if not self.info.is_main:
            return None
        provenance = dict(
            command=self.command, seed=self.cfg.seed, epochs=epoch, total_epochs=self.cfg.epochs,
            global_step=self.global_step, wall_time_s=round(self.wall_time, 1), machine=_machine(self.info.device),
            world_size=self.info.world_size, recipe=self.cfg.recipe, data=self.cfg.data, trained_by="tpsvit train",
        )
        if self.segmenter is not None:
            return save_segmenter(self.segmenter, self.out / name, self.models.name, self.models.kwargs,
                                  test_miou=score, **provenance)
        return save_checkpoint(self.model, self.out / name, self.models.name, self.models.kwargs, test_top1=score,
                               **provenance)

    def summary(self) -> dict:
        """Headline numbers of the run so far (task segment: best_miou / final_miou for best_top1 / final_top1)."""
        name = "miou" if self.segmenter is not None else "top1"
        best = self.best_top1 if self.best_top1 >= 0 else None
        return {"out": str(self.out), "epochs": self.cfg.epochs, "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch, f"best_{name}": best,
                f"final_{name}": self.history[-1].get(self.metric) if self.history else None,
                "wall_time_s": self.wall_time, "world_size": self.info.world_size, "command": self.command}

    def _epoch_line(self, row: dict) -> str:
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}: loss {row['train_loss']:.4f} (ce {row['loss_ce']:.4f}"]
        for key, label in (("loss_distill", "kd"), ("loss_token", "tok"), ("loss_keep_ratio", "ratio"),
                           ("loss_attention_distill", "attn")):
            if row.get(key):
                parts.append(f" {label} {row[key]:.4f}")
        parts.append(")")
        if row.get("test_miou") is not None:
            parts.append(f", test mIoU {row['test_miou']:.2f}% pixel accuracy {row['test_pixel_acc']:.2f}%, "
                         f"{row['gmacs']:.4g} GMACs")
        elif row.get("test_top1") is not None:
            parts.append(f", test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}%, "
                         f"{row['gmacs']:.4g} GMACs")
        ips = row.get("train_images_per_s")
        parts.append(f", {row['epoch_time_s']:.0f} s" + (f" ({ips:.0f} img/s)" if ips else ""))
        return "tpsvit train: " + "".join(parts)
