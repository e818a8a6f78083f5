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


@pytest.mark.parametrize("name, local_rank, local_world, world, gpus, expected", [
    ("auto", 0, None, 1, 0, "cpu"),
    ("auto", 0, None, 1, 2, "cuda:0"),
    ("cuda", 0, None, 1, 2, "cuda:0"),
    ("cuda:1", 0, None, 1, 2, "cuda:1"),  # one process: cuda:N as asked
    ("auto", 3, 4, 8, 4, "cuda:3"),  # torchrun: one rank per local GPU
    ("cuda", 1, 2, 2, 2, "cuda:1"),
    ("cuda:1", 0, 1, 2, 2, "cuda:1"),  # one process per node: cuda:N is still one rank per GPU
    ("cpu", 5, 8, 8, 2, "cpu"),  # gloo ranks on CPU share nothing
    ("auto", 1, 2, 2, 0, "cpu"),
])
def test_device_assignment(name, local_rank, local_world, world, gpus, expected):
    from tpsvit.train.distributed import assign_device

    got = assign_device(name, local_rank, local_world, world, cuda_available=gpus > 0, gpus=gpus)
    assert got == torch.device(expected)


@pytest.mark.parametrize("name, local_rank, local_world, world, gpus, match", [
    ("cuda:0", 1, 2, 2, 2, "every torchrun process of this node on GPU 0"),  # both ranks on GPU 0
    ("cuda:1", 1, None, 2, 2, "every torchrun process"),
    ("cuda", 2, 4, 4, 2, "4 processes on this node but it has 2 visible GPU"),  # more ranks than GPUs
    ("auto", 0, 4, 4, 2, "--nproc_per_node 2"),  # rank 0 fails too, not only the ranks past the last GPU
    ("auto", 2, None, 3, 2, "3 processes"),
    ("cuda:2", 0, None, 1, 2, "2 visible GPU"),
    ("cuda", 0, None, 1, 0, "CUDA is not available"),
    ("tpu", 0, None, 1, 0, "expected auto, cpu, cuda or cuda:N"),
])
def test_device_assignment_errors(name, local_rank, local_world, world, gpus, match):
    from tpsvit.train.distributed import assign_device

    with pytest.raises(InvalidArgumentError, match=match):
        assign_device(name, local_rank, local_world, world, cuda_available=gpus > 0, gpus=gpus)


def test_setup_reads_torchrun_environment(monkeypatch):
    from tpsvit.train import distributed

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "resolve_device", lambda *a: seen.append(a) or torch.device("cpu"))
    info = distributed.setup("cpu")
    assert info.world_size == 1 and seen == [("cpu", 0, None, 1)]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    distributed.setup("auto")
    assert seen[-1] == ("auto", 0, 4, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _data_worker(rank: int, world: int, port: int, cfg: dict, folder: str) -> None:
    """A real two-rank training run whose data opening is logged (rank 0 slow, as a download would be)."""
    import time
    from pathlib import Path

    from tpsvit.train import engine, train

    _join(rank, world, port)
    log = Path(folder) / "log.txt"
    real = engine.find_data

    def logged(config):
        with log.open("a") as f:
            f.write(f"{rank} start {time.time()}\n")
        if rank == 0:
            time.sleep(1.0)
        raw = real(config)
        with log.open("a") as f:
            f.write(f"{rank} end {time.time()}\n")
        return raw

    engine.find_data = logged
    train(cfg)


def test_rank_zero_opens_the_data_first(tmp_path):
    import torch.multiprocessing as mp
    from fmnist_files import write_fashion_mnist

    data = write_fashion_mnist(tmp_path / "fmnist")
    cfg = {"recipe": "fmnist-scratch", "data": str(data), "out": str(tmp_path / "run"), "threads": 1,
           "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "batch_size": 16, "epochs": 1,
           "steps_per_epoch": 1, "val_limit": 40}
    mp.spawn(_data_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    events = {}
    for line in (tmp_path / "log.txt").read_text().splitlines():
        rank, what, when = line.split()
        events[(int(rank), what)] = float(when)
    assert set(events) == {(0, "start"), (0, "end"), (1, "start"), (1, "end")}
    assert events[(1, "start")] >= events[(0, "end")]  # rank 1 waited for rank 0 to finish


def _failing_worker(rank: int, world: int, port: int, folder: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from tpsvit.train import distributed

    _join(rank, world, port)
    info = distributed.setup("cpu")

    def prepare():
        if rank == 0:
            raise OSError("download failed")
        return "opened"

    try:
        distributed.main_first(info, prepare)
        outcome = "no error"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(folder, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_other_ranks_stop_when_rank_zero_cannot_prepare(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_failing_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "OSError: download failed"
    assert (tmp_path / "rank1.txt").read_text().startswith("DatasetError: rank 0 could not prepare the data")
