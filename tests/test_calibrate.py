"""Calibrating the squeeze options on training images: the grid, the choice, the command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from fmnist_files import write_fashion_mnist

import tpsvit
import tpsvit.data.datasets
from tpsvit.cli import main
from tpsvit.errors import InvalidArgumentError
from tpsvit.measure.calibrate import calibrate, option_grid, parse_option
from tpsvit.measure.plan import _top1


def test_grid_skips_the_paper_duplicates_and_actions_without_a_floor():
    grid = option_grid({"squeeze_floor": [None, 0.2], "squeeze_floor_action": ["drop", "fuse"],
                        "temperature": [1.0, 0.5]})
    assert grid[0] == {} and len(grid) == len({json.dumps(g, sort_keys=True) for g in grid})
    assert {"squeeze_floor_action": "fuse"} not in grid and {"squeeze_floor_action": "fuse", "temperature": 0.5} \
        not in grid
    assert {"squeeze_floor": 0.2, "squeeze_floor_action": "fuse", "temperature": 0.5} in grid
    assert len(grid) == 6  # {} , T, floor, floor+T, floor fuse, floor fuse+T
    with pytest.raises(InvalidArgumentError, match="unknown squeeze option 'tau'"):
        option_grid({"tau": [0.1]})


def test_parse_option_types_values_and_refuses_bad_ones():
    assert parse_option("squeeze_floor=none,0,0.25") == ("squeeze_floor", [None, 0.0, 0.25])
    assert parse_option("squeeze-weighting=importance") == ("squeeze_weighting", ["importance"])
    assert parse_option("temperature=0.5,2") == ("temperature", [0.5, 2.0])
    for text, pattern in (("squeeze_floor", "not KEY=V1"), ("squeeze_floor=high", "'high' is not a number"),
                          ("squeeze_floor_action=merge", "allowed: drop, fuse"), ("tau=1", "unknown squeeze option")):
        with pytest.raises(InvalidArgumentError, match=pattern):
            parse_option(text)


def test_calibrate_scores_each_combination_at_the_budget_and_restores_the_model():
    model = tiny_vit()
    torch.manual_seed(2)
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 7, (40,))
    result = calibrate(model, "etps", 0.6, (images, labels), {"squeeze_floor": [None, 0.1],
                                                             "squeeze_floor_action": ["drop", "fuse"]},
                       locations=(1, 3), batch_size=16)
    assert not tpsvit.is_patched(model)
    assert [t.options for t in result.trials] == [{}, {"squeeze_floor": 0.1},
                                                  {"squeeze_floor": 0.1, "squeeze_floor_action": "fuse"}]
    full = tpsvit.gmacs(model)
    for trial in result.trials:  # each meets the budget with its own keep rate, and its top-1 is the patched model's
        assert trial.gmacs <= 0.6 * full + 1e-12
        tpsvit.patch(model, "etps", keep_rate=trial.keep_rate, locations=(1, 3), **trial.options)
        assert tpsvit.gmacs(model) == pytest.approx(trial.gmacs)
        assert _top1(model, [(images, labels)], "cpu") == trial.top1
    assert result.trials[2].keep_rate <= result.trials[1].keep_rate  # the fused token is paid for
    assert result.best.top1 == max(t.top1 for t in result.trials)
    assert result.paper is result.trials[0] and result.calibration_images == 40


def test_ties_keep_the_paper():
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        labels = tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3))(images).argmax(-1)
    tpsvit.unpatch(model)
    result = calibrate(model, "etps", 1.0, (images, labels), {"temperature": [1.0, 2.0]}, locations=(1, 3))
    assert result.best is result.paper  # budget 1: nothing is pruned, every candidate ties at the same top-1
    with pytest.raises(InvalidArgumentError, match="etps and dtps"):
        calibrate(model, "evit", 0.5, (images, labels), {"temperature": [1.0]})
    with pytest.raises(InvalidArgumentError, match="patched with dtps"):
        calibrate(model, "dtps", 0.5, (images, labels), {"temperature": [1.0]})


def test_command_calibrates_on_training_images_and_writes_json(tmp_path, monkeypatch, capsys):
    folder = write_fashion_mnist(tmp_path / "fmnist", n_train=48, n_test=20)
    monkeypatch.setattr(tpsvit.data.datasets, "SYSTEM_DIR", folder)
    seen = []
    real = tpsvit.data.datasets.build_dataset

    def spy(name, train, *args, **kwargs):
        seen.append(train)
        return real(name, train, *args, **kwargs)

    monkeypatch.setattr(tpsvit.data.datasets, "build_dataset", spy)
    out = tmp_path / "cal.json"
    from tpsvit.io.assets import demo_checkpoint

    base = str(demo_checkpoint(None, "fashion-mnist-cluttered"))  # any 56x56 model; the textures one may not exist yet
    assert main(["calibrate", "--data", "fashion-mnist-textures", "--checkpoint", base, "--budget", "0.5", "--option",
                 "squeeze_floor=none,0.3", "--option", "squeeze_weighting=similarity,importance", "--images", "24",
                 "--threads", "1", "--json", str(out)]) == 0
    assert seen == [True]  # the training split only
    report = json.loads(out.read_text())
    assert report["calibration_images"] == 24 and report["data"] == "fashion-mnist-textures"
    assert len(report["trials"]) == 4 and report["trials"][0]["options"] == {}
    assert set(report["best_single"]) == {"squeeze_floor", "squeeze_weighting", "temperature"}
    assert "chosen:" in capsys.readouterr().out
    assert main(["calibrate", "--budget", "0.5"]) == 2
    assert "give at least one --option" in capsys.readouterr().err
