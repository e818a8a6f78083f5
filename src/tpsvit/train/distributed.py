"""PyTorch DDP set-up for runs launched by ``torchrun`` (NCCL on GPU, gloo on CPU); one process without it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpsvit.errors import DatasetError, InvalidArgumentError


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, its device, and whether this module started the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files, bars and metrics)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise InvalidArgumentError(f"environment variable {name}={raw!r} is not an integer") from None


def assign_device(name: str, local_rank: int = 0, local_world: int | None = None, world: int = 1,
                  cuda_available: bool = False, gpus: int = 0) -> torch.device:
    """The device of this process (pure: the CUDA facts come in as arguments).

    ``name``: ``auto`` (a GPU when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. One process: ``cuda`` is
    GPU 0 and ``cuda:N`` GPU N. Under torchrun (``world > 1``): one rank per local GPU, rank ``LOCAL_RANK`` on
    ``cuda:LOCAL_RANK``; more processes on a node than it has GPUs, or ``cuda:N`` with several processes on a node
    (every rank would share GPU N: NCCL's "duplicate GPU"), is an error that says what to do instead.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"device={name!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if cuda_available else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise InvalidArgumentError(f"device={name!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    if not cuda_available or gpus < 1:
        raise InvalidArgumentError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device={name!r} is not allowed; expected auto, cpu, cuda or cuda:N") from None
    if world > 1:
        if device.index is not None and (local_world is None or local_world > 1):
            raise InvalidArgumentError(
                f"device={name!r} would put every torchrun process of this node on GPU {device.index}; use "
                "device=cuda or auto (rank i takes cuda:<LOCAL_RANK>) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if device.index is None:
            procs = local_world if local_world is not None else local_rank + 1
            if local_rank >= gpus or procs > gpus:
                raise InvalidArgumentError(
                    f"torchrun started {procs} processes on this node but it has {gpus} visible GPU(s); one rank "
                    f"per GPU: use --nproc_per_node {gpus} (or fewer), or device=cpu"
                )
            device = torch.device("cuda", local_rank)
    elif device.index is None:
        device = torch.device("cuda", 0)
    if device.index >= gpus:
        raise InvalidArgumentError(f"device={name!r}: this machine has {gpus} visible GPU(s), cuda:0 .. "
                                   f"cuda:{gpus - 1}")
    return device


def resolve_device(name: str, local_rank: int, local_world: int | None = None, world: int = 1) -> torch.device:
    """:func:`assign_device` with this machine's CUDA facts."""
    available = torch.cuda.is_available()
    return assign_device(name, local_rank, local_world, world, available,
                         torch.cuda.device_count() if available else 0)


def world_size_from_env() -> int:
    """The world size torchrun announced (1 without torchrun), without starting anything."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group announced by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)."""
    world = world_size_from_env()
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 0) or None
    dev = resolve_device(device, local_rank, local_world, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # the current device too: no stray context on GPU 0
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op on one process)."""
    if info.distributed:
        dist.barrier()


def main_first(info: DistInfo, prepare, what: str = "the data"):
    """``prepare()`` on rank 0 first (downloads, unpacking into a shared cache), then on the other ranks after a
    barrier, so that no two ranks write the same files at once. If rank 0 fails, it raises its own error and the
    other ranks raise a short one instead of waiting forever."""
    if not info.distributed:
        return prepare()
    if info.is_main:
        try:
            result = prepare()
        except BaseException:
            dist.broadcast_object_list([False], src=0)
            raise
        dist.broadcast_object_list([True], src=0)
        return result
    flag = [None]
    dist.broadcast_object_list(flag, src=0)
    if not flag[0]:
        raise DatasetError(f"rank 0 could not prepare {what} (its error says why); rank {info.rank} stops too")
    return prepare()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of numbers over ranks (float64 for exact counts)."""
    if not info.distributed:
        return list(values)
    device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def per_rank_batch(global_batch: int, world_size: int, accum_steps: int) -> int:
    """``global_batch / (world_size * accum_steps)``, or an error when it does not divide."""
    parts = world_size * accum_steps
    if global_batch % parts:
        raise InvalidArgumentError(
            f"batch_size {global_batch} is not divisible by world size {world_size} x accum_steps {accum_steps} "
            f"= {parts}; use a multiple of {parts}"
        )
    return global_batch // parts


def split_batch(global_batch: int, world_size: int, accum_steps: int = 1,
                device_batch: int | None = None) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) that make up ``global_batch`` on ``world_size`` ranks.

    Without ``device_batch``: ``accum_steps`` as given. With it: the fewest accumulation steps (at least
    ``accum_steps``) whose micro-batch divides the global batch exactly and is at most ``device_batch`` images, so the
    global batch (and hence the recipe's lr) stays the same however little memory a device has.
    """
    if device_batch is None:
        return per_rank_batch(global_batch, world_size, accum_steps), accum_steps
    if device_batch < 1:
        raise InvalidArgumentError(f"device_batch={device_batch} is not allowed; expected an integer >= 1")
    per_rank_total, rest = divmod(global_batch, world_size)
    if rest:
        raise InvalidArgumentError(f"batch_size {global_batch} is not divisible by world size {world_size}; use a "
                                   f"multiple of {world_size}")
    for accum in range(max(1, accum_steps), per_rank_total + 1):
        if per_rank_total % accum == 0 and per_rank_total // accum <= device_batch:
            return per_rank_total // accum, accum
    raise InvalidArgumentError(
        f"batch_size {global_batch} on {world_size} rank(s) cannot be split into micro-batches of at most "
        f"{device_batch} with at least {accum_steps} accumulation steps; change device_batch or accum_steps"
    )
