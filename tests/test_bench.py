"""Throughput measurement: positive numbers, the environment header, interleaving, modes restored, the CLI."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.cli import main
from tpsvit.errors import InvalidArgumentError
from tpsvit.measure.bench import benchmark_interleaved, environment

HEADER = ("device", "device_name", "threads", "dtype", "torch", "timm")


def test_benchmark_numbers_and_header():
    model = tiny_vit().train()
    result = tpsvit.benchmark(model, batch_size=4, runs=3, warmup=1)
    assert result["images_per_s"] > 0 and result["ms_per_batch"] > 0
    assert result["images_per_s"] == pytest.approx(4 / (result["ms_per_batch"] / 1e3))
    assert result["ms_per_batch_min"] <= result["ms_per_batch"]
    assert result["runs"] == 3 and result["batch_size"] == 4 and result["img_size"] == [32, 32]
    for key in HEADER:
        assert result[key] not in (None, "")
    assert result["dtype"] == "float32" and result["torch"] == torch.__version__ and result["timm"] == timm.__version__
    assert result["threads"] == torch.get_num_threads()
    assert model.training  # mode restored


def test_autocast_and_explicit_size():
    result = tpsvit.benchmark(tiny_vit(), batch_size=2, img_size=32, in_chans=3, runs=1, warmup=0, amp="bf16")
    assert result["dtype"] == "autocast bfloat16" and result["images_per_s"] > 0


def test_interleaved_times_every_model():
    models = {"unpatched": tiny_vit(), "etps": tpsvit.patch(tiny_vit(), "etps", 0.5, locations=(1, 3))}
    results = benchmark_interleaved(models, batch_size=2, runs=2, warmup=1, repeats=2)
    assert set(results) == {"unpatched", "etps"}
    assert all(r["runs"] == 4 and r["repeats"] == 2 and r["images_per_s"] > 0 for r in results.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(amp="int8"), "amp"), (dict(runs=0), "runs"), (dict(batch_size=0), "batch_size"),
     (dict(device="nonsense"), "device")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tpsvit.benchmark(tiny_vit(), **kwargs)


def test_environment_without_model():
    env = environment("cpu", "fp16")
    assert env["device"] == "cpu" and env["dtype"] == "autocast float16"


def test_bench_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "deit_mini_patch4_28", "--methods", "etps", "evit", "--keep-rates", "0.5",
                 "--batch-size", "2", "4", "--runs", "1", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "batch size 2" in captured.err and "pass" in captured.err  # a progress bar while it measures
    assert "threads" in printed and "torch" in printed and "timm" in printed and "batch size 4" in printed
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    assert [t["batch_size"] for t in report["results"]] == [2, 4]
    rows = report["results"][1]["rows"]
    assert [r["label"] for r in rows] == ["unpatched", "etps 0.5", "evit 0.5"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["gmacs"] < rows[0]["gmacs"] and rows[1]["gmacs_ratio"] > 1


def test_bench_cli_budget_error(capsys):
    code = main(["bench", "--model", "deit_mini_patch4_28", "--methods", "tome", "--budget", "0.01", "--runs", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpsvit bench: error:") and "smallest reachable" in err and "\n" not in err


def test_timing_waits_on_the_gpu_being_timed(monkeypatch):
    from tpsvit.measure import bench

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench.device_sync(torch.device("cuda", 1))()
    assert waited == [torch.device("cuda", 1)]  # not a bare synchronize(), which waits on the current GPU only
    bench.device_sync(torch.device("cpu"))()
    assert len(waited) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert bench._device("cuda") == torch.device("cuda", 1)
    assert bench._device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InvalidArgumentError, match="cuda:2.*2 GPU"):
        bench._device("cuda:2")


@pytest.mark.parametrize("module", ["bench", "evaluation"])
def test_bench_and_eval_synchronise_and_set_their_device(module, monkeypatch):
    import importlib

    target = importlib.import_module(f"tpsvit.measure.{module}")
    calls = []

    def sync(device):
        calls.append(("sync", device))
        return lambda: None

    def scope(device):
        calls.append(("scope", device))
        return torch.inference_mode(False)  # any context manager

    monkeypatch.setattr(target, "device_sync", sync)
    monkeypatch.setattr(target, "device_scope", scope)
    if module == "bench":
        tpsvit.benchmark(tiny_vit(), batch_size=2, runs=1, warmup=0, device="cpu")
    else:
        target.evaluate_many({"m": tiny_vit()}, (torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), batch_size=2,
                             device="cpu", progress=False)
    assert calls == [("sync", torch.device("cpu")), ("scope", torch.device("cpu"))]


def test_bench_cli_rejects_zero_threads(capsys):
    assert main(["bench", "--model", "deit_mini_patch4_28", "--threads", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tpsvit bench: error: --threads 0 must be >= 1 (or leave it out for torch's default)"
