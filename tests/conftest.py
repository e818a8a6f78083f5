"""Tiny random timm ViTs shared by the tests (seconds, not minutes)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)  # 2 threads thrash on a shared 2-core machine


# Hypothesis profiles of the property tests (tests/properties). ``ci`` (the default): derandomized (the same examples
# on every run and machine), a bounded number of examples, no deadline (a shared CPU is slow at times). ``dev``: many
# more examples with fresh randomness: ``HYPOTHESIS_PROFILE=dev python -m pytest tests/properties``. They live here,
# not in a tests/properties/conftest.py, because a second module named ``conftest`` would shadow this one's helpers.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=600, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def ctrl_c_at_step(monkeypatch, global_step: int):
    """Make training send itself SIGINT (Ctrl-C) right after optimizer step ``global_step``; returns the original
    ``Run._step`` (put it back with ``monkeypatch.setattr(engine.Run, "_step", original)`` before resuming)."""
    import signal

    from tpsvit.train import engine

    original = engine.Run._step

    def step_then_ctrl_c(self, batches, epoch, step):
        result = original(self, batches, epoch, step)
        if self.global_step == global_step:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(engine.Run, "_step", step_then_ctrl_c)
    return original


def tiny_vit(**overrides):
    """A 6-block, 48-wide ViT on 32x32 inputs with 4x4 patches: 64 patch tokens (+ prefix)."""
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    kwargs.update(overrides)
    name = kwargs.pop("name", "vit_tiny_patch16_224")
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


# (label, kwargs): the model families the patch must support.
VARIANTS = {
    "plain": {},
    "distilled": {"name": "deit_tiny_distilled_patch16_224"},
    "layerscale": {"init_values": 1e-1},  # DeiT-III style LayerScale
    "registers": {"reg_tokens": 4},
    "qknorm": {"qk_norm": True},
}


# Device parametrisation: the CUDA cases run on a GPU machine (benchmarks/gpu.sh) and are skipped elsewhere.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")),
]


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)
