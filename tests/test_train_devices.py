"""Device logic of training that the CPU can check with the GPU mocked: the amp choice per compute capability,
RNG states of more GPUs than visible on resume, one rank per local GPU under torchrun."""

from __future__ import annotations

import pytest
import torch

from tpsvit.errors import InvalidArgumentError
from tpsvit.train import engine


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), torch.float16),  # V100: bf16 only emulated
    ((7, 5), torch.float16),  # T4
    ((6, 1), torch.float16),
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),
    ((9, 0), torch.bfloat16),  # H100
])
def test_auto_amp_by_compute_capability(capability, expected):
    assert engine.choose_amp("auto", "cuda", capability) is expected


def test_amp_choices_off_the_gpu_and_explicit():
    assert engine.choose_amp("auto", "cpu") is None
    assert engine.choose_amp("none", "cuda", (9, 0)) is None
    assert engine.choose_amp("bf16", "cuda", (7, 0)) is torch.bfloat16  # explicit: honoured
    assert engine.choose_amp("fp16", "cuda", (9, 0)) is torch.float16
    assert engine.choose_amp("bf16", "cpu") is torch.bfloat16
    with pytest.raises(InvalidArgumentError, match="fp16 needs a GPU"):
        engine.choose_amp("fp16", "cpu")


def test_auto_amp_asks_the_training_device(monkeypatch):
    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (9, 0), 1: (7, 5)}[torch.device(device).index]  # GPU 0 is current, training runs on GPU 1

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert engine._resolve_amp("auto", torch.device("cuda", 1)) is torch.float16
    assert asked == [torch.device("cuda", 1)]
    assert engine._resolve_amp("auto", torch.device("cpu")) is None
