"""Per-epoch metrics of a run: ``metrics.csv``, ``metrics.json`` and TensorBoard scalars when it is installed."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

COLUMNS = (
    "epoch", "global_step", "train_loss", "loss_ce", "loss_distill", "loss_token", "loss_keep_ratio",
    "loss_attention_distill",
    "lr", "lr_backbone", "keep_rate", "test_top1", "test_top5", "test_loss", "gmacs", "train_images",
    "train_images_per_s", "epoch_time_s",
)
# task segment: mIoU and pixel accuracy where classification has top-1 / top-5
SEGMENT_COLUMNS = tuple(c for name in COLUMNS
                        for c in {"test_top1": ("test_miou",), "test_top5": ("test_pixel_acc",)}.get(name, (name,)))


class MetricsWriter:
    """Rewrites the CSV and JSON files from the whole history after every epoch (so a resumed run stays whole)."""

    def __init__(self, out: str | os.PathLike, config: dict, enabled: bool = True, columns: tuple = COLUMNS):
        self.out, self.config, self.enabled, self.columns = Path(out), config, enabled, columns
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tensorboard = None

    def write(self, history: list[dict], summary: dict) -> None:
        """Write every row of ``history`` and a summary; log the newest row to TensorBoard."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        os.replace(tmp, self.out / "metrics.csv")
        tmp = self.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps({"config": self.config, "summary": summary, "epochs": history}, indent=1) + "\n")
        os.replace(tmp, self.out / "metrics.json")
        if self.tensorboard is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return "" if value is None else value
