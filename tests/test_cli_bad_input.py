"""Bad input on the command line: every command's bad paths, bad numbers and bad model names end with one clear line
on stderr that names the bad value, a non-zero exit and no traceback. One table, run through the CLI entry point."""

from __future__ import annotations

import pytest
from fmnist_files import write_fashion_mnist

from tpsvit.cli import main

# Prepended to each case of a command (a case's own options come later and win): small, fast runs, so that a bad
# value that slipped through would fail the test in seconds instead of running a long job.
SAFE = {
    "eval": ["--limit", "8", "--no-progress"],
    "viz": ["--out", "{tmp}/viz"],
    "flops": ["--model", "deit_mini_patch4_28"],
    "bench": ["--model", "deit_mini_patch4_28", "--runs", "1", "--warmup", "0", "--repeats", "1", "--batch-size", "2",
              "--no-progress"],
    "export": ["--onnx", "{tmp}/m.onnx"],
    "demo": ["--limit", "8", "--methods", "etps", "--budgets", "0.5", "--no-progress", "--out", "{tmp}/demo"],
    "train": ["--recipe", "fmnist-scratch", "--out", "{tmp}/run", "--epochs", "1", "--steps", "1", "--limit", "8",
              "--val-limit", "8", "--batch-size", "4"],
}

# (command, its bad options, a phrase of the error line that names the bad value)
CASES = [
    ("eval", ["--data", "{tmp}/missing"], "{tmp}/missing"),
    ("eval", ["--data", "{fmnist}", "--split", "nope"], "'nope'"),
    ("eval", ["--keep-rates", "1.5"], "keep_rate 1.5"),
    ("eval", ["--keep-rates", "abc"], "'abc'"),
    ("eval", ["--methods", "nosuch"], "'nosuch'"),
    ("eval", ["--model", "no_such_model"], "'no_such_model'"),
    ("eval", ["--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("eval", ["--checkpoint", "{tmp}/file.txt"], "file.txt"),
    ("eval", ["--limit", "0"], "limit 0"),
    ("eval", ["--batch-size", "0"], "got 0"),
    ("eval", ["--threads", "0"], "--threads 0"),
    ("eval", ["--locations", "99"], "location 99"),
    ("eval", ["--budget", "2"], "budget 2.0"),
    ("eval", ["--gmacs", "-1"], "gmacs -1.0"),
    ("eval", ["--methods", "tome", "--r", "-1"], "got -1"),
    ("eval", ["--out", "{tmp}/file.txt"], "file.txt"),
    ("eval", ["--img-size", "0"], "--img-size 0"),
    ("eval", ["--model", "deit_mini_patch4_28", "--data", "{fmnist}", "--img-size", "3"], "--img-size 3"),
    ("eval", ["--workers", "-1"], "--workers -1"),
    ("eval", ["--schedule", "auto", "--budget", "0.5", "--calib-images", "0"], "--calib-images"),
    ("viz", ["{tmp}/missing.png"], "missing.png"),
    ("viz", ["{tmp}/fake.png"], "fake.png"),
    ("viz", ["--index", "99999"], "--index 99999"),
    ("viz", ["--samples", "0"], "--samples 0"),
    ("viz", ["--dpi", "1"], "--dpi"),
    ("viz", ["--keep-rate", "0"], "keep_rate 0.0"),
    ("viz", ["--locations", "50"], "location 50"),
    ("viz", ["--method", "tome", "--r", "-2"], "got -2"),
    ("viz", ["--model", "no_such_model"], "'no_such_model'"),
    ("viz", ["--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("viz", ["--threads", "0"], "--threads 0"),
    ("viz", ["--out", "{tmp}/file.txt"], "file.txt"),
    ("viz", ["--data", "{tmp}/missing"], "{tmp}/missing"),
    ("flops", ["--model", "no_such_model"], "'no_such_model'"),
    ("flops", ["--keep-rates", "0"], "keep_rate 0.0"),
    ("flops", ["--locations", "50"], "location 50"),
    ("flops", ["--budget", "1.5"], "budget 1.5"),
    ("flops", ["--json", "{tmp}/folder"], "{tmp}/folder"),
    ("flops", ["--img-size", "3"], "--img-size 3"),
    ("flops", ["--threads", "0"], "--threads 0"),
    ("flops", ["--methods", "tome", "--r", "999"], "r=999"),
    ("flops", ["--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("bench", ["--batch-size", "0"], "got 0"),
    ("bench", ["--runs", "0"], "runs must"),
    ("bench", ["--warmup", "-1"], "got -1"),
    ("bench", ["--device", "nosuchdevice"], "'nosuchdevice'"),
    ("bench", ["--threads", "0"], "--threads 0"),
    ("bench", ["--json", "{tmp}/folder"], "{tmp}/folder"),
    ("bench", ["--model", "no_such_model"], "'no_such_model'"),
    ("export", ["--onnx", "{tmp}/folder"], "{tmp}/folder"),
    ("export", ["--keep-rate", "2"], "keep_rate 2.0"),
    ("export", ["--batch-size", "0"], "got 0"),
    ("export", ["--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("export", ["--model", "no_such_model"], "'no_such_model'"),
    ("export", ["--threads", "0"], "--threads 0"),
    ("export", ["--atol", "-1"], "got -1.0"),
    ("export", ["--locations", "77"], "location 77"),
    ("demo", ["--limit", "0"], "--limit 0"),
    ("demo", ["--budgets", "0"], "budget 0.0"),
    ("demo", ["--batch-size", "0"], "got 0"),
    ("demo", ["--data-dir", "{tmp}/missing"], "{tmp}/missing"),
    ("demo", ["--threads", "0"], "--threads 0"),
    ("demo", ["--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("demo", ["--out", "{tmp}/file.txt"], "file.txt"),
    ("demo", ["--schedule", "auto", "--calib-images", "0"], "--calib-images"),
    ("train", ["--recipe", "nosuch"], "'nosuch'"),
    ("train", ["--epochs", "-1"], "epochs=-1"),
    ("train", ["--lr", "abc"], "'abc'"),
    ("train", ["--lr", "-1"], "lr=-1.0"),
    ("train", ["--keep-rate", "2"], "keep_rate 2.0"),
    ("train", ["--threads", "0"], "threads=0"),
    ("train", ["--data", "{tmp}/missing"], "{tmp}/missing"),
    ("train", ["--set", "foo=1"], "'foo'"),
    ("train", ["--model", "no_such_model"], "'no_such_model'"),
    ("train", ["--recipe", "fmnist-finetune", "--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ("train", ["--batch-size", "0"], "batch_size=0"),
    ("train", ["--out", "{tmp}/file.txt"], "file.txt"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "file.txt").write_text("not a checkpoint, not a folder")
    (tmp / "fake.png").write_text("not an image")
    (tmp / "folder").mkdir()
    fmnist = write_fashion_mnist(tmp / "fmnist", n_train=8, n_test=8)
    return {"{tmp}": str(tmp), "{fmnist}": str(fmnist)}


def _fill(values: list[str], files: dict) -> list[str]:
    out = []
    for value in values:
        for key, path in files.items():
            value = value.replace(key, path)
        out.append(value)
    return out


@pytest.mark.parametrize(("command", "bad", "phrase"), CASES, ids=[f"{c}-{' '.join(b)}" for c, b, _ in CASES])
def test_bad_input_ends_in_one_clear_line(command, bad, phrase, files, capsys):
    argv = [command, *_fill(SAFE[command], files), *_fill(bad, files)]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse: bad choice or number
        code = exit_info.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tpsvit {command}: error: ") and _fill([phrase], files)[0] in lines[0], lines[0]
