"""Throughput: images/s of the model alone on random input, several models timed in interleaved rounds.

Protocol (DESIGN.md "Measurement protocols"): ``torch.inference_mode``, eval mode, warm-up passes discarded, a fixed
number of timed passes, CUDA synchronised around every timed pass, fp32 unless autocast (bf16 / fp16) is asked for.
Comparisons time every model in the same process, round after round (A B C A B C ...), so drifts in clock speed or
background load hit all of them alike; the reported time per batch is the median of all timed passes.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from tpsvit.errors import InvalidArgumentError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_dtype(amp) -> torch.dtype | None:
    if amp is None or amp in ("fp32", "none"):
        return None
    if isinstance(amp, torch.dtype) and amp in AMP_DTYPES.values():
        return amp
    if amp not in AMP_DTYPES:
        raise InvalidArgumentError(f"amp {amp!r} is not supported; allowed: None (fp32), 'bf16', 'fp16'")
    return AMP_DTYPES[amp]


def _device(device, model: nn.Module | None = None) -> torch.device:
    if device is None:
        param = next(model.parameters(), None) if model is not None else None
        return param.device if param is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' was asked for but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise InvalidArgumentError(f"device {str(device)!r} does not exist; this machine has {count} GPU(s): "
                                   f"cuda:0 .. cuda:{count - 1}")
    return _with_index(device)


def device_sync(device: torch.device):
    """A no-argument function that waits for ``device``'s queued work: ``torch.cuda.synchronize(device)`` on a GPU
    (plain ``synchronize()`` waits on the *current* GPU only, so timing ``cuda:1`` would time kernel launches), a
    no-op on CPU."""
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


def device_scope(device: torch.device):
    """Make ``device`` the current GPU for the block (restored afterwards); nothing on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so synchronising and naming it mean the GPU the work runs on."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device=None, amp=None) -> dict:
    """The header of a measurement: device (and its name), CPU threads, dtype, torch / timm / Python versions."""
    import timm

    device = _device(device)
    dtype = _amp_dtype(amp)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": "float32" if dtype is None else f"autocast {str(dtype).removeprefix('torch.')}",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def format_environment(env: dict) -> str:
    """One line for the top of a table."""
    return (f"device {env['device']} ({env['device_name']}), {env['threads']} threads, {env['dtype']}, "
            f"torch {env['torch']}, timm {env['timm']}")


def input_size(model: nn.Module, img_size=None, in_chans: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input; ``img_size`` / ``in_chans`` override what the model says."""
    from tpsvit.families import family_of

    if img_size is None or in_chans is None:
        built_for = family_of(model).input_size(model)
        if built_for is None:
            raise InvalidArgumentError("cannot tell this model's input size; pass img_size and in_chans")
        img_size = built_for[1:] if img_size is None else img_size
        in_chans = built_for[0] if in_chans is None else in_chans
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return int(in_chans), int(h), int(w)


def _check_counts(batch_size: int, runs: int, warmup: int, repeats: int) -> None:
    for name, value, least in (("batch_size", batch_size, 1), ("runs", runs, 1), ("warmup", warmup, 0),
                               ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")


def benchmark_interleaved(models: Mapping[str, nn.Module], batch_size: int = 64, img_size=None, device=None,
                          runs: int = 10, warmup: int = 3, repeats: int = 3, amp=None,
                          in_chans: int | None = None, progress: bool = False,
                          desc: str = "bench") -> dict[str, dict]:
    """Time several models on the same random input, interleaved: ``repeats`` rounds of ``runs`` passes each.

    ``progress=True`` shows a progress bar on stderr (one tick per pass, the model being timed as its postfix).

    Every model first runs ``warmup`` untimed passes. Models are moved to ``device`` (default: where the first one
    is) and put in eval mode for the measurement (their train/eval mode is restored). Returns, per name, the dict
    of :func:`benchmark`.
    """
    _check_counts(batch_size, runs, warmup, repeats)
    if not models:
        raise InvalidArgumentError("no models to benchmark")
    first = next(iter(models.values()))
    device = _device(device, first)
    dtype = _amp_dtype(amp)
    env = environment(device, amp)
    chans, h, w = input_size(first, img_size, in_chans)
    generator = torch.Generator().manual_seed(0)
    param = next(first.parameters(), None)
    in_dtype = param.dtype if dtype is None and param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(batch_size, chans, h, w, generator=generator).to(device, in_dtype)
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    sync = device_sync(device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext

    def timed(model: nn.Module) -> float:
        sync()
        start = time.perf_counter()
        with autocast():
            model(x)
        sync()
        return time.perf_counter() - start

    for model in models.values():
        model.to(device).eval()  # outside inference mode: moved parameters stay usable for training
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(models) * (warmup + repeats * runs), desc=desc, unit="pass", file=sys.stderr,
                   dynamic_ncols=True, leave=False)

    def tick(name: str, count: int) -> None:
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(count)

    try:
        with device_scope(device), torch.inference_mode():
            for name, model in models.items():
                for _ in range(warmup):
                    timed(model)
                tick(f"{name} (warm-up)", warmup)
            for _ in range(repeats):
                for name, model in models.items():
                    times[name] += [timed(model) for _ in range(runs)]
                    tick(name, runs)
    finally:
        if bar is not None:
            bar.close()
        for name, model in models.items():
            model.train(modes[name])
    results = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        results[name] = {
            "images_per_s": batch_size / median,
            "ms_per_batch": 1e3 * median,
            "ms_per_batch_mean": 1e3 * statistics.fmean(samples),
            "ms_per_batch_min": 1e3 * min(samples),
            "ms_per_image": 1e3 * median / batch_size,
            "batch_size": batch_size,
            "img_size": [h, w],
            "in_chans": chans,
            "runs": len(samples),
            "warmup": warmup,
            "repeats": repeats,
            **env,
        }
    return results


def benchmark(model: nn.Module, batch_size: int = 64, img_size=None, device=None, runs: int = 10, warmup: int = 3,
              amp=None, in_chans: int | None = None) -> dict:
    """Throughput of one model on random input of its size.

    Args:
        model: any image model (a timm ViT tells its own input size).
        batch_size: images per forward pass.
        img_size: input side (int or (H, W)); default the model's.
        device: where to run (the model is moved there); default where the model is.
        runs: timed forward passes; warmup: untimed passes before them.
        amp: None (fp32), ``"bf16"`` or ``"fp16"`` autocast.
        in_chans: input channels; default the model's.

    Returns a dict: ``images_per_s`` (batch / median pass time), ``ms_per_batch`` (median), ``ms_per_batch_mean``,
    ``ms_per_batch_min``, ``ms_per_image``, the sizes and counts, and the environment header (``device``,
    ``device_name``, ``threads``, ``dtype``, ``torch``, ``timm``, ``python``).
    """
    return benchmark_interleaved({"model": model}, batch_size, img_size, device, runs, warmup, 1, amp,
                                 in_chans)["model"]
