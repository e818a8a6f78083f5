"""Real training runs on a tiny synthetic Fashion-MNIST: fine-tune lowers the loss, exact resume after SIGKILL,
two gloo ranks end with identical weights, gradient checkpointing changes nothing, bad input fails before compute."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ctrl_c_at_step
from fmnist_files import write_fashion_mnist
from safetensors.torch import load_file

import tpsvit
from tpsvit.cli import main as cli_main
from tpsvit.errors import CheckpointError, DatasetError, InvalidArgumentError
from tpsvit.io.loading import load_model
from tpsvit.train import train
from tpsvit.train.modeling import enable_grad_checkpointing

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def config(data: Path, out: Path, **over) -> dict:
    cfg = {"recipe": "fmnist-scratch", "data": str(data), "out": str(out), "model_kwargs": dict(TINY),
           "batch_size": 32, "epochs": 2, "lr": 2e-3, "warmup_epochs": 0.5, "drop_path": 0.0,
           "threads": 1}  # one thread: on a busy 2-core machine two threads thrash (10-100x slower)
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def scratch(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scratch") / "run"
    return train(config(data, out, epochs=4))


def test_scratch_run_learns_and_writes_everything(scratch):
    out = Path(scratch["out"])
    losses = [row["train_loss"] for row in scratch["history"]]
    assert losses[-1] < losses[0]
    assert scratch["best_top1"] > 30.0  # 10 classes: chance is 10%
    assert scratch["global_step"] == 4 * (320 // 32)
    for name in ("last.pt", "best.safetensors", "final.safetensors", "metrics.csv", "metrics.json", "progress.json"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,global_step,train_loss") and len(rows) == 5
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "epoch", "global_step"} <= set(state)
    model = load_model(checkpoint=out / "final.safetensors")
    meta = json.loads(json.dumps(tpsvit.io.loading.checkpoint_metadata(out / "best.safetensors")))
    assert meta["seed"] == 0 and meta["test_top1"] == pytest.approx(scratch["best_top1"]) and meta["command"]
    assert model.embed_dim == 32 and len(model.blocks) == 4


def test_dtps_finetune_lowers_loss_and_logs_each_term(scratch, data, tmp_path):
    results = train(config(
        data, tmp_path / "ft", recipe="fmnist-finetune", checkpoint=str(Path(scratch["out"]) / "best.safetensors"),
        method="dtps", locations=[1, 2], keep_rate=0.7, epochs=3, lr=5e-3, warmup_epochs=0,
        predictor_init="release", predictor_loss="gumbel",  # the paper's path (the CPU recipe's default is beyond it)
    ))
    history = results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["loss_keep_ratio"] < history[0]["loss_keep_ratio"]
    for key in ("loss_ce", "loss_distill", "loss_token", "loss_keep_ratio"):
        assert history[0][key] > 0, key
    assert history[-1]["gmacs"] < scratch["history"][-1]["gmacs"]
    model = load_model(checkpoint=Path(results["final"]))  # rebuilds the patched model with its predictors
    assert model.tps.method == "dtps" and model.tps.locations == (1, 2)
    trained = results["model"].state_dict()
    assert any(k.startswith("tps_predictors.") for k in trained)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key].cpu()), key


def _run_args(data: Path, out: Path) -> list[str]:
    return ["train", "--recipe", "fmnist-scratch", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--batch-size", "8", "--limit", "240", "--val-limit", "40", "--save-every-steps", "2", "--seed", "5",
            "--set", "model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "--method", "dtps",
            "--locations", "1", "--teacher", "none", "--threads", "1"]


def test_sigkill_mid_epoch_then_resume_is_exact(data, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tpsvit.cli", *_run_args(data, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline, seen = out / "progress.json", time.time() + 120, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if progress.exists():
                seen = json.loads(progress.read_text())
                if seen["global_step"] >= 6 and seen["step_in_epoch"] > 0:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    assert seen is not None and seen["step_in_epoch"] > 0
    assert not (out / "final.safetensors").exists()

    assert cli_main([*_run_args(data, out), "--resume"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["global_step"] == 3 * (240 // 8)
    resumed = load_file(out / "final.safetensors")
    assert load_model(checkpoint=out / "final.safetensors").tps.method == "dtps"

    reference = tmp_path / "straight"
    assert cli_main(_run_args(data, reference)) == 0
    straight = load_file(reference / "final.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_sigint_mid_epoch_saves_the_step_and_resume_is_exact(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C finishes the current optimiser step, writes last.pt there (not at a --save-every-steps multiple),
    prints the resume command and exits 130; the resumed run ends with the weights of an uninterrupted one."""
    from tpsvit.train import engine

    out = tmp_path / "interrupted"
    handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN in a background job
    original = ctrl_c_at_step(monkeypatch, 37)  # epoch 2, step 7 of 30: between two --save-every-steps 2 saves
    assert cli_main(_run_args(data, out)) == 130
    err = capsys.readouterr().err
    assert "SIGINT: saving last.pt after this step" in err
    assert f"stopped at epoch 2 step 7/30 (global step 37); saved {out / 'last.pt'}; continue with: " in err
    assert err.rstrip().splitlines()[-2].endswith(" --resume")
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 7, 37)
    assert not (out / "final.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    monkeypatch.setattr(engine.Run, "_step", original)

    assert cli_main([*_run_args(data, out), "--resume"]) == 0
    reference = tmp_path / "straight"
    assert cli_main(_run_args(data, reference)) == 0
    resumed, straight = load_file(out / "final.safetensors"), load_file(reference / "final.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_resume_with_nothing_to_resume(data, tmp_path, capsys):
    fresh = tmp_path / "new"
    results = train(config(data, fresh, epochs=1, steps_per_epoch=1, val_limit=8, resume=True))
    assert results["global_step"] == 1
    assert f"--resume: nothing to resume in {fresh} (no last.pt); starting a fresh run" in capsys.readouterr().err
    other = tmp_path / "typo"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    with pytest.raises(InvalidArgumentError, match=r"--resume: .*typo has no last.pt to resume but holds other files "
                                                   r"\(notes.txt\)"):
        train(config(data, other, epochs=1, resume=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = train(cfg)
    torch.save({k: v.detach().clone() for k, v in results["model"].state_dict().items()},
               Path(folder) / f"rank{rank}.pt")


def test_two_gloo_ranks_hold_identical_weights(data, tmp_path):
    cfg = config(data, tmp_path / "ddp", method="dtps", locations=[1, 2], teacher="auto", distill_weight=0.5,
                 token_distill_weight=0.5, keep_ratio_weight=2.0, batch_size=16, accum_steps=2, epochs=1,
                 steps_per_epoch=3, val_limit=40, drop_path=0.1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = load_file(tmp_path / "ddp" / "final.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("tps_predictors.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in a:  # rank 0 exported the weights it holds
        assert torch.equal(a[key], start[key]), key
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["world_size"] == 2 and metrics["summary"]["global_step"] == 3


@pytest.mark.parametrize("method, kwargs", [
    ("none", {}),
    ("dtps", {"keep_rate": 0.5, "locations": (1, 2)}),  # masked path: Gumbel decisions, policy, keep-ratio loss
    ("dynamicvit", {"keep_rate": 0.5, "locations": (1, 2)}),
    ("etps", {"keep_rate": 0.5, "locations": (1, 2)}),  # gather path: shorter sequences, positions
    ("tome", {"keep_rate": 1.0, "r": 8, "locations": (1, 2)}),  # sizes and proportional attention
])
def test_grad_checkpointing_covers_patched_blocks_and_changes_nothing(method, kwargs):
    import timm

    from tpsvit.train.losses import keep_ratio_loss

    def run(checkpointed: bool):
        torch.manual_seed(0)
        model = timm.create_model("deit_mini_patch4_28", drop_path_rate=0.1, **TINY)
        if method != "none":
            tpsvit.patch(model, method, **kwargs)
        if checkpointed:
            assert enable_grad_checkpointing(model) == len(model.blocks)  # every block, patched ones too
        model.train()
        torch.manual_seed(1)
        loss = model(torch.randn(4, 1, 28, 28)).logsumexp(-1).sum()
        state = tpsvit.forward_state(model) if method != "none" else None
        if state is not None and state.decisions:
            loss = loss + keep_ratio_loss(state.decisions, model.tps.keep_rate)  # gradients through the decisions
        positions = None if state is None or state.positions is None else state.positions.clone()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, positions

    (loss_a, plain, pos_a), (loss_b, checkpointed, pos_b) = run(False), run(True)
    assert torch.equal(loss_a, loss_b)
    assert (pos_a is None) == (pos_b is None) and (pos_a is None or torch.equal(pos_a, pos_b))
    assert plain.keys() == checkpointed.keys()
    if method in ("dtps", "dynamicvit"):
        assert any(name.startswith("tps_predictors.") for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_checkpointed_run_trains_like_the_plain_one(data, tmp_path):
    common = dict(method="dtps", locations=[1, 2], keep_rate=0.5, teacher="auto", epochs=1, steps_per_epoch=3,
                  val_limit=40, drop_path=0.1)
    plain = train(config(data, tmp_path / "plain", **common))
    checkpointed = train(config(data, tmp_path / "ckpt", grad_checkpointing=True, **common))
    a, b = plain["model"].state_dict(), checkpointed["model"].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world, accum, cap, expected", [
    (1, 1, None, (1024, 1)),
    (1, 1, 128, (128, 8)),  # one GPU: the recipe's 1024 as 8 x 128
    (2, 1, 128, (128, 4)),
    (8, 1, 128, (128, 1)),
    (1, 1, 100, (64, 16)),  # the largest micro-batch that divides the batch and fits
    (1, 4, 512, (256, 4)),  # accum_steps is a floor
    (3, 1, 10, (8, 4)),  # 96 / 3 ranks = 32 per rank = 4 x 8
])
def test_device_batch_keeps_the_global_batch(world, accum, cap, expected):
    from tpsvit.train.distributed import split_batch

    global_batch = 96 if world == 3 else 1024
    per_rank, steps = split_batch(global_batch, world, accum, cap)
    assert (per_rank, steps) == expected
    assert per_rank * steps * world == global_batch and (cap is None or per_rank <= cap)


def test_device_batch_that_cannot_split(data, tmp_path):
    from tpsvit.train.distributed import split_batch

    with pytest.raises(InvalidArgumentError, match="not divisible by world size 3"):
        split_batch(1024, 3, 1, 64)
    with pytest.raises(InvalidArgumentError, match="at least 64 accumulation steps"):
        split_batch(32, 1, 64, 8)


def test_device_batch_run_prints_the_split_and_matches_accumulation(data, tmp_path, capsys):
    common = dict(epochs=1, steps_per_epoch=2, val_limit=40, batch_size=32)
    accumulated = train(config(data, tmp_path / "accum", accum_steps=4, **common))
    capped = train(config(data, tmp_path / "cap", device_batch=10, **common))  # 32 = 8 x 4
    err = capsys.readouterr().err
    assert "global batch 32 = 1 ranks x 8 per device x 4 accum (device_batch 10)" in err
    a, b = accumulated["model"].state_dict(), capped["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_out_of_memory_says_what_to_set(data, tmp_path, monkeypatch):
    from tpsvit.train import engine

    def oom(self, x):
        raise engine.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine._WithFeatures, "forward", oom)
    with pytest.raises(InvalidArgumentError) as info:
        train(config(data, tmp_path / "oom", batch_size=32, epochs=1))
    message = str(info.value)
    assert "out of memory on cpu at 32 images per device" in message
    assert "--device-batch 16" in message and "global batch 32" in message and "--grad-checkpointing" in message
    assert isinstance(info.value.__cause__, engine.OUT_OF_MEMORY)


# ------------------------------------------------------------------------------------------------ bad input


def test_batch_not_divisible_by_world_and_accumulation(data, tmp_path):
    with pytest.raises(InvalidArgumentError, match="not divisible by world size 1 x accum_steps 3"):
        train(config(data, tmp_path / "x", batch_size=32, accum_steps=3))
    assert not (tmp_path / "x").exists()


def test_dataset_with_no_images(tmp_path):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    with pytest.raises(DatasetError, match="image"):
        train({"recipe": "imagenet-dtps", "data": str(root), "out": str(tmp_path / "x"), "pretrained": False,
               "model": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}})
    assert not (tmp_path / "x").exists()


def test_checkpoint_for_another_architecture(scratch, data, tmp_path):
    best = str(Path(scratch["out"]) / "best.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch|missing keys"):
        train(config(data, tmp_path / "x", checkpoint=best, model_kwargs={"depth": 4, "embed_dim": 48}))
    with pytest.raises(CheckpointError, match="is a 'deit_mini_patch4_28' but model is"):
        train(config(data, tmp_path / "x", checkpoint=best, model="vit_tiny_patch16_224"))
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_a_run_without_resume(scratch, data):
    with pytest.raises(InvalidArgumentError, match="--resume"):
        train(config(data, Path(scratch["out"])))


def test_cli_prints_one_line_and_exits_2(data, tmp_path, capsys):
    code = cli_main(["train", "--recipe", "fmnist-scratch", "--data", str(data), "--out", str(tmp_path / "x"),
                     "--set", "learning_rate=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown key 'learning_rate'" in err and "valid keys:" in err and "lr," in err


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_warm_start_and_attention_distill_finetune(scratch, data, tmp_path, method, capsys):
    results = train(config(
        data, tmp_path / "ft", recipe="fmnist-finetune", checkpoint=str(Path(scratch["out"]) / "best.safetensors"),
        method=method, locations=[1, 2], keep_rate=0.5, epochs=2, warmup_epochs=0,
        predictor_init="class-attention", predictor_init_steps=20, predictor_loss="attention-distill",
    ))
    assert "predictor warm start (class-attention distillation), 20 steps" in capsys.readouterr().err
    history = results["history"]
    assert history[0]["loss_attention_distill"] > 0 and history[0]["loss_keep_ratio"] == 0
    assert all(0 < row["loss_attention_distill"] < 2.0 for row in history)  # warm-started: far from flat
    assert history[-1]["test_top1"] > 30.0


def test_auto_schedule_is_planned_on_training_images_and_recorded(scratch, data, tmp_path, capsys):
    results = train(config(
        data, tmp_path / "auto", recipe="fmnist-finetune", checkpoint=str(Path(scratch["out"]) / "best.safetensors"),
        method="etps", budget=0.5, locations=[1, 2], schedule="auto", calib_images=64, epochs=1, warmup_epochs=0,
    ))
    assert "tpsvit train: auto schedule etps:" in capsys.readouterr().err
    model = load_model(checkpoint=Path(results["final"]))
    saved = json.loads((Path(results["out"]) / "metrics.json").read_text())["config"]
    assert saved["schedule"] == "auto" and saved["budget"] is None
    assert list(model.tps.locations) == saved["locations"] and list(model.tps.keep_rate)[0] == saved["keep_rate"]
    assert results["history"][-1]["gmacs"] <= 0.5 * scratch["history"][-1]["gmacs"] * 1.001
    with pytest.raises(InvalidArgumentError, match="schedule=auto .* set budget"):
        train(config(data, tmp_path / "bad", method="etps", schedule="auto"))


# ------------------------------------------------------------------------------------------------ fp16 scaler


def _fp16_with_bad_steps(monkeypatch, bad):
    """CPU fp16 autocast with a real GradScaler; the loss is made infinite at the global steps in ``bad``."""
    from tpsvit.train import engine

    monkeypatch.setattr(engine, "_resolve_amp", lambda amp, device: torch.float16)
    losses, step = engine.Run._losses, engine.Run._step
    seen = []

    def inf_losses(self, *args):
        terms = losses(self, *args)
        if self.global_step in bad:
            terms["total"] = terms["total"] * float("inf")
        return terms

    def recording_step(self, *args):
        out = step(self, *args)
        seen.append((self.global_step, self.scheduler.last_epoch, self.scaler.get_scale(), self.skipped_steps))
        return out

    monkeypatch.setattr(engine.Run, "_losses", inf_losses)
    monkeypatch.setattr(engine.Run, "_step", recording_step)
    return seen


def test_fp16_skipped_step_holds_the_lr_schedule(data, tmp_path, monkeypatch):
    import warnings

    from tpsvit.train import engine

    seen = _fp16_with_bad_steps(monkeypatch, {1, 2})
    to_host, reads = engine._to_host, []
    monkeypatch.setattr(engine, "_to_host", lambda values: reads.append(values.shape) or to_host(values))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config(data, tmp_path / "fp16", epochs=1, log_every=4))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert result["global_step"] == 10
    assert seen[1][2] == seen[0][2] / 2 and seen[2][2] == seen[0][2] / 4  # the scaler skipped steps 1 and 2
    assert [s[1] for s in seen] == [1, 1, 1, 2, 3, 4, 5, 6, 7, 8]  # the schedule waited on the two skipped steps
    assert seen[-1][3] == 2
    # one read per step (the scaler's skip, for the schedule) plus the losses at steps 4, 8 and 10
    assert len(reads) == 10 + 3 and sum(shape[0] for shape in reads if len(shape) == 3) == 10


def test_fp16_aborts_only_after_several_non_finite_steps_in_a_row(data, tmp_path, monkeypatch):
    from tpsvit.train import engine

    seen = _fp16_with_bad_steps(monkeypatch, set(range(100)))
    with pytest.raises(FloatingPointError, match=f"{engine.MAX_NONFINITE_STEPS}th optimizer step in a row"):
        train(config(data, tmp_path / "fp16", epochs=1))
    assert len(seen) == engine.MAX_NONFINITE_STEPS - 1
    assert all(s[1] == 0 for s in seen)


def test_non_finite_loss_without_a_scaler_aborts_at_once(data, tmp_path, monkeypatch):
    from tpsvit.train import engine

    losses = engine.Run._losses

    def inf_losses(self, *args):
        terms = losses(self, *args)
        terms["total"] = terms["total"] * float("inf")
        return terms

    monkeypatch.setattr(engine.Run, "_losses", inf_losses)
    with pytest.raises(FloatingPointError, match=r"loss is (inf|nan) at epoch 1 step 0; lower lr or use amp=none"):
        train(config(data, tmp_path / "bf", epochs=1))


def test_auto_amp_is_recorded_and_kept_on_resume(data, tmp_path, monkeypatch, capsys):
    from tpsvit.train import engine

    out = tmp_path / "auto"
    train(config(data, out, epochs=1, amp="auto"))
    assert torch.load(out / "last.pt", weights_only=False)["amp"] == "none"
    # resumed on "a GPU": the resolver would now pick bf16, the run keeps its fp32 arithmetic
    monkeypatch.setattr(engine, "_resolve_amp", lambda amp, device: torch.bfloat16)
    capsys.readouterr()
    train(config(data, out, epochs=2, amp="auto", resume=True))
    assert "amp off" in capsys.readouterr().err
    assert torch.load(out / "last.pt", weights_only=False)["amp"] == "none"


# ------------------------------------------------------------------------------------------------ host syncs


@pytest.mark.parametrize("log_every, save_every, reads", [
    (4, None, 6),  # epoch 1 at global steps 4, 8, 10 (its end); epoch 2 at 12, 16, 20
    (1, None, 20),
    (4, 3, 11),  # and before every checkpoint: 3, 4, 6, 8, 9, 10 | 12, 15, 16, 18, 20
])
def test_losses_are_read_once_per_log_interval_and_the_means_stay_exact(data, tmp_path, monkeypatch, log_every,
                                                                        save_every, reads):
    """fp32: no device->host read per step; one per log_every steps (and before a checkpoint and at the epoch's end),
    where the ranks also agree on a Ctrl-C. The epoch means equal the float64 means of every micro-step's terms."""
    from tpsvit.train import distributed, engine

    to_host, all_reduce, losses = engine._to_host, distributed.all_reduce_sum, engine.Run._losses
    host_reads, reduced, seen = [], [], []

    def counting_to_host(values):
        host_reads.append(values.shape)
        return to_host(values)

    def counting_all_reduce(values, info):
        reduced.append(len(values))
        return all_reduce(values, info)

    def recording_losses(self, *args):
        terms = losses(self, *args)
        seen.append((self.global_step, {k: float(v.detach()) for k, v in terms.items()}))
        return terms

    monkeypatch.setattr(engine, "_to_host", counting_to_host)
    monkeypatch.setattr(distributed, "all_reduce_sum", counting_all_reduce)
    monkeypatch.setattr(engine.Run, "_losses", recording_losses)
    result = train(config(data, tmp_path / "run", method="dtps", locations=[1, 2], teacher="auto",
                          token_distill_weight=0.5, accum_steps=2, log_every=log_every, save_every_steps=save_every))
    steps = 320 // 32
    assert result["global_step"] == 2 * steps
    assert len(host_reads) == reads
    assert sum(shape[0] for shape in host_reads) == 2 * steps  # every step read exactly once, accum rows each
    # all_reduce: a (stop, non-finite) pair at every read; per epoch the means and the evaluation; one stop check
    # between the epochs
    assert reduced.count(2) == reads and reduced.count(1) == 1 and len(reduced) == reads + 1 + 2 * 2

    names = {"total": "train_loss", "ce": "loss_ce", "distill": "loss_distill", "token": "loss_token"}
    for epoch, row in enumerate(result["history"]):
        sums = dict.fromkeys(names, 0.0)
        for step in range(epoch * steps, (epoch + 1) * steps):
            micro = [terms for at, terms in seen if at == step]
            assert len(micro) == 2
            for key in names:
                step_sum = 0.0
                for terms in micro:
                    step_sum += terms.get(key, 0.0) / 2
                sums[key] += step_sum
        for key, name in names.items():
            assert row[name] == sums[key] / steps, name
        assert row["loss_token"] > 0 and row["loss_distill"] == 0  # this recipe distils tokens, not logits


def _inf_loss_at(monkeypatch, bad, fail_at=None):
    from tpsvit.train import engine

    losses = engine.Run._losses

    def inf_losses(self, *args):
        if self.global_step == fail_at:
            raise RuntimeError("a later failure")
        terms = losses(self, *args)
        if self.global_step in bad:
            terms["total"] = terms["total"] * float("inf")
        return terms

    monkeypatch.setattr(engine.Run, "_losses", inf_losses)


def test_non_finite_loss_is_found_at_the_next_read_before_anything_is_saved(data, tmp_path, monkeypatch):
    """fp32: the loss is checked when it is read (every log_every steps), naming the step where it went non-finite;
    the checkpoint due at that read is not written."""
    _inf_loss_at(monkeypatch, {5})
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss is (inf|nan) at epoch 1 step 5; lower lr or use amp=none "
                       r"\(found at the loss check after step 8: the losses are read from the device every "
                       r"log_every=4 steps; nothing was saved after step 5\)"):
        train(config(data, out, epochs=1, log_every=4, save_every_steps=4))
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_failure_after_an_unread_non_finite_loss_names_the_loss(data, tmp_path, monkeypatch):
    _inf_loss_at(monkeypatch, {1}, fail_at=3)
    with pytest.raises(FloatingPointError, match=r"loss is (inf|nan) at epoch 1 step 1; lower lr or use amp=none "
                       r"\(found when a later step failed") as caught:
        train(config(data, tmp_path / "run", epochs=1, log_every=10))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_ddp_ranks_agree_on_ctrl_c_only_at_a_read(data, tmp_path, monkeypatch, capsys):
    """Two ranks simulated in one process (every collective sums two equal ranks): a SIGINT stops at the next read
    (log_every), not at the next step, and last.pt is saved there."""
    import dataclasses

    from tpsvit.train import distributed, engine

    out = tmp_path / "ddp"
    run = engine.Run(engine._as_config(config(data, out, epochs=2, log_every=4)), distributed.setup("cpu"), "cmd")
    run.info = dataclasses.replace(run.info, world_size=2)
    reduced = []

    def two_ranks(values, info):
        reduced.append(list(values))
        return [2 * v for v in values]

    monkeypatch.setattr(distributed, "all_reduce_sum", two_ranks)
    monkeypatch.setattr(distributed, "barrier", lambda info: None)
    step = engine.Run._step

    def step_then_ctrl_c(self, *args):
        result = step(self, *args)
        if self.global_step == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(engine.Run, "_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    err = capsys.readouterr().err
    assert "SIGINT: saving last.pt within 4 steps (log_every)" in err
    assert f"stopped at epoch 2 step 6/10 (global step 16); saved {out / 'last.pt'}" in err
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 6, 16)
    assert [v for v in reduced if len(v) == 2] == [[0.0, 0.0]] * 4 + [[1.0, 0.0]]  # reads at 4 8 10 | 12 16
