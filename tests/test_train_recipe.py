"""Recipes and configuration: shipped YAML files, overrides, validation errors, the CLI's config output."""

from __future__ import annotations

import json

import pytest

from tpsvit.cli import main as cli_main
from tpsvit.errors import InvalidArgumentError
from tpsvit.train.distributed import per_rank_batch
from tpsvit.train.recipe import TrainConfig, load_recipe, parse_set, recipe_names, resolve, valid_keys


def test_every_shipped_recipe_resolves():
    assert {"imagenet-dtps", "imagenet-etps", "fmnist-scratch", "fmnist-finetune"} <= set(recipe_names())
    for name in recipe_names():
        segment = load_recipe(name).get("task") == "segment"  # pixel labels: only the cluttered testbeds have them
        cfg = resolve(name, {"data": "fashion-mnist-cluttered" if segment else "fashion-mnist"})
        assert cfg.recipe == name and set(load_recipe(name)) <= set(valid_keys())


def test_imagenet_dtps_is_the_papers_release_recipe():
    cfg = resolve("imagenet-dtps", {"data": "/data/imagenet"})
    assert (cfg.model, cfg.pretrained, cfg.method, cfg.keep_rate, cfg.locations) == (
        "deit_small_patch16_224", True, "dtps", 0.7, [3, 6, 9])
    # one AdamW group at 2.5e-4 with decay on everything (the script's --backbone_freeze_epochs -1 never splits it)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay) == (30, 1024, 2.5e-4, 1.0,
                                                                                             0.05)
    assert cfg.weight_decay_skip_1d is False and cfg.token_distill_loss == "kl"
    assert (cfg.predictor_init, cfg.predictor_loss) == ("release", "gumbel")
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.auto_augment) == (5, 1e-6, "rand-m9-mstd0.5-inc1")
    assert (cfg.mixup, cfg.cutmix, cfg.reprob, cfg.smoothing, cfg.color_jitter, cfg.aug_repeats) == (
        0.8, 1.0, 0.25, 0.1, 0.3, 3)
    assert (cfg.keep_ratio_weight, cfg.distill_weight, cfg.token_distill_weight, cfg.teacher) == (2.0, 0.5, 0.5, "auto")
    etps = resolve("imagenet-etps", {"data": "/data/imagenet", "keep_rate_anneal_epochs": 5})
    assert etps.method == "etps" and etps.keep_rate_anneal_epochs == 5 and etps.keep_ratio_weight == 0


def test_set_values_are_yaml_and_override_the_recipe():
    values = parse_set(["lr=1e-3", "locations=[2, 5]", "model_kwargs={depth: 4}", "clip-grad=null", "method=etps"])
    assert values == {"lr": 0.001, "locations": [2, 5], "model_kwargs": {"depth": 4}, "clip_grad": None,
                      "method": "etps"}
    cfg = resolve("fmnist-scratch", values)
    assert cfg.lr == 0.001 and cfg.locations == [2, 5] and cfg.method == "etps" and cfg.epochs == 12


@pytest.mark.parametrize(("overrides", "match"), [
    ({"learning_rate": 1}, "unknown key 'learning_rate'.*valid keys: model, model_kwargs"),
    ({"method": "prune"}, "method='prune'.*none, etps, dtps, evit, dynamicvit, tome"),
    ({"epochs": 0}, "epochs=0.*an integer"),
    ({"log_every": 0}, "log_every=0.*an integer"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"amp": "fp8"}, "amp='fp8'.*auto, none, bf16, fp16"),
    ({"budget": 1.5}, "budget=1.5"),
    ({"data": None}, "data is not set"),
    ({"model_kwargs": {"depth:4": None}}, "space after each colon"),
    ({"betas": [0.9]}, "betas"),
])
def test_bad_values_name_the_key_and_what_is_allowed(overrides, match):
    with pytest.raises(InvalidArgumentError, match=match):
        resolve("fmnist-scratch", overrides)


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 3\nwarmup: 1\n")
    with pytest.raises(InvalidArgumentError, match="unknown key 'warmup' in recipe .*mine.yaml"):
        resolve(str(path), {"data": "fashion-mnist"})
    path.write_text("epochs: 3\nbatch_size: 64\ndata: fashion-mnist\n")
    cfg = resolve(str(path))
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (3, 64, TrainConfig().lr)
    with pytest.raises(InvalidArgumentError, match="unknown recipe 'nope'"):
        resolve("nope")


def test_batch_must_divide_over_ranks_and_accumulation():
    assert per_rank_batch(1024, 8, 1) == 128 and per_rank_batch(1024, 8, 2) == 64
    with pytest.raises(InvalidArgumentError, match="batch_size 1000 is not divisible by world size 16 x accum_steps 1"):
        per_rank_batch(1000, 16, 1)


def test_cli_show_config_applies_flags_and_set(capsys):
    code = cli_main(["train", "--recipe", "fmnist-finetune", "--method", "etps", "--keep-rate", "0.5",
                     "--locations", "2", "4", "--steps", "7", "--set", "distill_weight=0", "--show-config"])
    cfg = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (cfg["method"], cfg["keep_rate"], cfg["locations"], cfg["steps_per_epoch"], cfg["distill_weight"]) == (
        "etps", 0.5, [2, 4], 7, 0.0)


def test_cli_help_states_the_learning_rate_rule(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "global batch" in text and "never rescaled" in text


def test_budget_solves_the_keep_rate_before_training():
    import timm

    from tpsvit.measure.flops import gmacs
    from tpsvit.train.modeling import apply_method

    model = timm.create_model("deit_mini_patch4_28", depth=4, embed_dim=32, num_heads=2)
    full = gmacs(model)
    apply_method(model, resolve("fmnist-finetune", {"method": "dtps", "locations": [1, 2], "budget": 0.6}))
    assert model.tps.method == "dtps" and model.tps.keep_rate[0] < 1.0
    assert gmacs(model) <= 0.6 * full
    with pytest.raises(InvalidArgumentError, match="budget needs a token-reduction method"):
        resolve("fmnist-scratch", {"budget": 0.5})


def test_param_groups_default_to_the_releases_single_group():
    import timm

    import tpsvit
    from tpsvit.train.modeling import param_groups

    model = timm.create_model("deit_mini_patch4_28", depth=2)
    tpsvit.patch(model, method="dtps", keep_rate=0.5, locations=[1])
    (group,) = param_groups(model, 2.5e-4, 1.0, 0.05)
    assert group["lr"] == 2.5e-4 and group["weight_decay"] == 0.05
    assert len(group["params"]) == len(list(model.parameters()))
    split = {g["name"]: g for g in param_groups(model, 1e-3, 0.01, 0.05, skip_1d=True)}
    assert set(split) == {"predictor", "predictor_no_decay", "backbone", "backbone_no_decay"}
    assert split["backbone"]["lr"] == pytest.approx(1e-5) and split["predictor"]["lr"] == 1e-3
    assert split["backbone_no_decay"]["weight_decay"] == 0.0


def test_predictor_starts_as_the_release_init():
    import torch

    from tpsvit.core.scoring import TokenPredictor

    torch.manual_seed(0)
    predictor = TokenPredictor(192)
    linears = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in linears)
    assert 0.015 < float(linears[0].weight.detach().std()) < 0.025
    keep = predictor(torch.randn(4, 49, 192))[..., 0].exp()
    assert float((keep.detach() - 0.5).abs().max()) < 0.02  # keep probability ~0.5 for every token


def test_finetune_recipes_start_from_the_shipped_model(tmp_path):
    from fmnist_files import write_fashion_mnist

    from tpsvit.errors import CheckpointError
    from tpsvit.io.assets import ASSETS, demo_checkpoint
    from tpsvit.train import train
    from tpsvit.train.modeling import start_checkpoint

    fmnist = resolve("fmnist-finetune", {})
    assert fmnist.checkpoint == "shipped"
    assert start_checkpoint(fmnist) == str(demo_checkpoint(None, "fashion-mnist"))
    cluttered = resolve("cluttered-finetune", {})
    if (ASSETS / "mini_deit_cluttered.safetensors").is_file():
        assert start_checkpoint(cluttered) == str(ASSETS / "mini_deit_cluttered.safetensors")
    else:
        with pytest.raises(CheckpointError, match="mini_deit_cluttered.safetensors is missing"):
            start_checkpoint(cluttered)
    assert start_checkpoint(resolve("fmnist-finetune", {"checkpoint": "mine.safetensors"})) == "mine.safetensors"
    with pytest.raises(InvalidArgumentError, match="'shipped' is the shipped deit_mini_patch4_28"):
        start_checkpoint(resolve("fmnist-finetune", {"model": "vit_tiny_patch16_224"}))

    data = write_fashion_mnist(tmp_path / "fmnist", n_train=32, n_test=8)
    results = train({"recipe": "fmnist-finetune", "data": str(data), "out": str(tmp_path / "run"), "epochs": 1,
                     "batch_size": 16, "steps_per_epoch": 1, "threads": 1})
    assert results["global_step"] == 1 and results["model"].tps.method == "dtps"
