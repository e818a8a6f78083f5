"""The resumable training state (``last.pt``): written atomically, read back with ``torch.load(weights_only=True)``.

It holds plain tensors, numbers, strings, lists and dicts only: model, optimiser, scheduler and scaler state dicts,
epoch / step position, RNG states (python, numpy, torch, cuda), the resolved config, the metrics so far.
A small ``progress.json`` next to it says where the run is, for people and scripts.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from tpsvit.errors import CheckpointError
from tpsvit.io.atomic import atomic_write

STATE_FILE = "last.pt"
PROGRESS_FILE = "progress.json"


def rng_state() -> dict:
    """RNG states of python, numpy, torch (CPU) and every CUDA device, as weights-only-loadable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> list[str]:
    """Restore what :func:`rng_state` captured; returns notes on what could not be restored.

    CUDA states are per device: a run resumed with fewer visible GPUs (or none) restores the states of the devices it
    has and skips the rest (harmless: every optimiser step reseeds all RNGs from (seed, epoch, step, rank)).
    """
    notes = []
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    if saved:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index, cuda_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(cuda_state, index)
        if len(saved) > visible:
            notes.append(f"the run saved CUDA RNG states of {len(saved)} GPU(s), {visible} visible now: restored "
                         f"{min(len(saved), visible)}, skipped the rest (every step is reseeded anyway)")
    return notes


def save_state(out: str | os.PathLike, state: dict) -> Path:
    """Write ``out/last.pt`` atomically (temp file + os.replace) and update ``out/progress.json``."""
    out = Path(out)
    path = out / STATE_FILE
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    progress = {k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "epochs", "steps_per_epoch")}
    progress["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write(out / PROGRESS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(progress) + "\n"))
    return path


def load_state(out: str | os.PathLike) -> dict | None:
    """Read ``out/last.pt`` (weights-only), or None when the run has no state yet."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot resume from {str(path)!r}: {type(err).__name__}: {err}") from None
