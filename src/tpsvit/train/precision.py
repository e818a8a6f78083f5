"""Mixed precision (which autocast dtype a run trains in) and the machine a checkpoint records."""

from __future__ import annotations

import platform

import torch

from tpsvit.errors import InvalidArgumentError


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
