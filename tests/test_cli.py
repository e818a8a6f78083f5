"""The `tpsvit` command's start-up: --version, and --help without importing torch or timm."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

HEAVY = "[m for m in ('torch', 'timm') if m in sys.modules]"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version():
    done = subprocess.run([sys.executable, "-m", "tpsvit.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    try:
        expected = metadata.version("tpsvit")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        import tpsvit

        expected = tpsvit.__version__
    assert done.returncode == 0 and done.stdout.strip() == f"tpsvit {expected}"


def test_importing_the_cli_does_not_import_torch():
    done = python(f"import sys, tpsvit.cli; print({HEAVY})")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["--version"], 0),
    *[([command, "--help"], 0) for command in ("train", "flops", "bench", "eval", "viz", "export")],
    (["demo", "--help"], 0),
    (["bench", "--no-such-option"], 2),
    (["eval", "--methods", "no-such-method"], 2),
])
def test_help_does_not_import_torch(argv, code):
    script = (f"import sys\nfrom tpsvit.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
              f"    assert e.code == {code}, e.code\nelse:\n    raise AssertionError('no exit')\n"
              f"print('HEAVY', {HEAVY})")
    done = python(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"
    if argv == ["--help"]:
        assert "Top-1/top-5 accuracy" in done.stdout  # commands listed from their docstrings
    if code == 2:
        assert "error:" in done.stderr and argv[-1] in done.stderr, done.stderr


def test_public_api_loads_on_first_use():
    done = python("import tpsvit, timm\nprint(callable(tpsvit.patch), callable(tpsvit.plan), callable(tpsvit.squeeze),"
                  " timm.is_model('deit_mini_patch4_28'))")
    assert done.returncode == 0 and done.stdout.split() == ["True"] * 4, done.stderr


def test_train_help_states_the_recipe_defaults(capsys):
    from tpsvit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--epochs N default: from the recipe; imagenet-dtps: 30" in out


@pytest.mark.parametrize("command", ["eval", "viz", "flops", "export", "bench", "demo", "train"])
def test_every_command_that_runs_a_model_takes_threads(command, capsys):
    from tpsvit.cli import main
    from tpsvit.commands.options import THREADS_HELP

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--threads N" in out and " ".join(THREADS_HELP.split()) in out


def test_threads_sets_torchs_cpu_threads_and_refuses_zero():
    import argparse

    import torch

    from tpsvit.commands.options import apply_threads
    from tpsvit.errors import InvalidArgumentError

    before = torch.get_num_threads()
    try:
        apply_threads(argparse.Namespace(threads=2))
        assert torch.get_num_threads() == 2
        apply_threads(argparse.Namespace(threads=None))  # not given: left alone
        assert torch.get_num_threads() == 2
        with pytest.raises(InvalidArgumentError, match="--threads 0"):
            apply_threads(argparse.Namespace(threads=0))
    finally:
        torch.set_num_threads(before)
