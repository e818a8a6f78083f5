"""benchmarks/gpu.sh without a GPU: it reaches its CUDA gate and stops there with one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.sh"
BASH = "/bin/bash"


def _run(path_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path_dir), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    return subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_stops_without_nvidia_smi(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()  # a PATH with no nvidia-smi (and nothing else: the gate uses only bash builtins)
    result = _run(bin_dir, tmp_path)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        "gpu.sh: no NVIDIA GPU here (nvidia-smi not found); run this script on a machine with a CUDA GPU"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is here: the script would run its steps")
def test_stops_when_torch_has_no_cuda(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho fake\n")
    fake.chmod(0o755)
    result = _run(bin_dir, tmp_path)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch.cuda.is_available() is False" in lines[0] and "torch 2" in lines[0]
    assert not (tmp_path / "out").exists()
