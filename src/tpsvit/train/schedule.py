"""The learning-rate curve of a training run."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: linear warm-up, then cosine to ``min_lr``."""
    if warmup > 0 and step < warmup:
        start = warmup_lr / lr
        return start + (1.0 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
