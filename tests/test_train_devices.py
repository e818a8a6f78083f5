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


def _fake_cuda(monkeypatch, count: int) -> list:
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    return restored


@pytest.mark.parametrize("visible", [0, 1, 2, 4])
def test_rng_states_of_more_gpus_than_visible(monkeypatch, visible):
    from tpsvit.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]  # saved on 3 GPUs
    restored = _fake_cuda(monkeypatch, visible)
    notes = set_rng_state(state)
    assert [device for device, _ in restored] == list(range(min(3, visible)))
    for device, value in restored:
        assert torch.equal(value, state["cuda"][device])
    if visible < 3:
        assert len(notes) == 1 and "3 GPU(s)" in notes[0] and f"{visible} visible" in notes[0]
    else:
        assert notes == []


def test_resume_with_fewer_gpus_than_the_run_had(tmp_path, monkeypatch, capsys):
    from fmnist_files import write_fashion_mnist

    from tpsvit.train import train

    data = write_fashion_mnist(tmp_path / "fmnist")
    cfg = {"recipe": "fmnist-scratch", "data": str(data), "out": str(tmp_path / "run"), "threads": 1,
           "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "batch_size": 32, "epochs": 1,
           "steps_per_epoch": 2, "val_limit": 40}
    train(cfg)
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # as if saved on two GPUs
    torch.save(state, path)
    restored = _fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = train({**cfg, "epochs": 2, "resume": True})
    assert results["global_step"] == 4 and restored == []
    assert "CUDA RNG states of 2 GPU(s), 0 visible now" in capsys.readouterr().err
