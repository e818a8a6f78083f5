"""Squeeze options beyond the paper: the similarity floor (drop / fuse), importance weighting, the temperature."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.core.config import make_config
from tpsvit.core.reducers import squeeze_reduce
from tpsvit.core.squeeze import importance, squeeze_masked, squeeze_with_hosts
from tpsvit.errors import InvalidArgumentError
from tpsvit.io.loading import apply_patch_spec, patch_spec
from tpsvit.measure.flops import counted_gmacs

E = math.e
OPTIONS = [
    dict(squeeze_floor=0.3),
    dict(squeeze_floor=0.3, squeeze_floor_action="fuse"),
    dict(squeeze_weighting="importance"),
    dict(squeeze_floor=0.2, squeeze_floor_action="fuse", squeeze_weighting="importance", temperature=0.5),
]


def _config(**options):
    return make_config("etps", 12, 1, 0.5, (3,), **options)


def _basis(*rows):
    return torch.tensor([rows], dtype=torch.float32)


def test_floor_drops_a_token_unlike_every_host():
    """Reserved e1, e2; pruned e1 (cos 1 with e1) and e3 (cos 0 with both): a floor of 0.5 squeezes only the first."""
    reserved = _basis([1.0, 0, 0], [0, 1.0, 0])
    pruned = _basis([1.0, 0, 0], [0, 0, 1.0])
    fused, host = squeeze_with_hosts(reserved, pruned, floor=0.5)
    assert host.tolist() == [[0, -1]]
    torch.testing.assert_close(fused, reserved)  # (e * e1 + e * e1) / 2e = e1; e2 chosen by nobody
    paper, paper_host = squeeze_with_hosts(reserved, pruned)  # the paper: e3 ties, goes to the first host
    assert paper_host.tolist() == [[0, 0]]
    torch.testing.assert_close(paper[0, 0], torch.tensor([2 * E, 0, 1]) / (2 * E + 1))


def test_floor_fuse_appends_the_importance_weighted_sum_of_the_tokens_below():
    x = _basis([1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 2.0])  # kept 0, 1; pruned 2 (like 0), 3 (like none)
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    kept, pruned = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    out = squeeze_reduce(x, kept, pruned, 1.0, scores, _config(squeeze_floor=0.5, squeeze_floor_action="fuse"))
    assert out.extra == 1 and out.tokens.shape == (1, 3, 3) and out.host.tolist() == [[0, 2]]
    torch.testing.assert_close(out.tokens[0, 2], torch.tensor([0, 0, 0.1 * 2.0]))  # share 0.1 of token 3
    torch.testing.assert_close(out.tokens[0, :2], x[0, :2])
    none_below = squeeze_reduce(x[:, :3], kept, pruned[:, :1], 1.0, scores[:, :3],
                                _config(squeeze_floor=0.5, squeeze_floor_action="fuse"))
    assert none_below.tokens.shape == (1, 3, 3) and not none_below.tokens[0, 2].any()  # the zero token


def test_importance_weighting_by_hand():
    """One host e1 and one donor e2 (cos 0, weight 1 in the paper) of importance share 0.25 among n = 2 tokens:
    its weight becomes 1 * 2 * 0.25 = 0.5, so the host is (e * e1 + 0.5 * e2) / (e + 0.5)."""
    x = _basis([1.0, 0], [0, 1.0])
    scores = torch.tensor([[0.75, 0.25]])
    out = squeeze_reduce(x, torch.tensor([[0]]), torch.tensor([[1]]), 1.0, scores,
                         _config(squeeze_weighting="importance"))
    torch.testing.assert_close(out.tokens[0, 0], torch.tensor([E, 0.5]) / (E + 0.5))
    paper = squeeze_reduce(x, torch.tensor([[0]]), torch.tensor([[1]]), 1.0, scores, _config())
    torch.testing.assert_close(paper.tokens[0, 0], torch.tensor([E, 1.0]) / (E + 1.0))
    share = importance(torch.tensor([[0.0, -1.0]]).log_softmax(-1), log_probs=True)
    torch.testing.assert_close(share.sum(1), torch.ones(1))
    uniform = squeeze_reduce(x, torch.tensor([[0]]), torch.tensor([[1]]), 1.0, torch.tensor([[0.5, 0.5]]),
                             _config(squeeze_weighting="importance"))
    torch.testing.assert_close(uniform.tokens, paper.tokens)  # every token equally important: the paper's weights


def test_temperature_by_hand():
    reserved, pruned = _basis([1.0, 0]), _basis([0.6, 0.8])  # cos 0.6
    for temperature in (1.0, 0.5):
        fused, _ = squeeze_with_hosts(reserved, pruned, temperature)
        w = math.exp(0.6 / temperature - 1)  # relative to the host's e
        torch.testing.assert_close(fused[0, 0], (torch.tensor([1.0, 0]) + w * torch.tensor([0.6, 0.8])) / (1 + w))


@pytest.mark.parametrize("action", ["drop", "fuse"])
def test_floor_minus_one_and_off_are_the_paper_exactly(action, images):
    torch.manual_seed(0)
    reserved, pruned = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    paper = squeeze_with_hosts(reserved, pruned, 0.7)
    for got in (squeeze_with_hosts(reserved, pruned, 0.7, floor=-1.0), squeeze_with_hosts(reserved, pruned, 0.7)):
        assert torch.equal(got[0], paper[0]) and torch.equal(got[1], paper[1])
    tokens, keep, prev = torch.randn(2, 9, 8), (torch.rand(2, 9) > 0.5).float(), torch.ones(2, 9)
    assert torch.equal(squeeze_masked(tokens, keep, prev, floor=-1.0), squeeze_masked(tokens, keep, prev))
    model = tiny_vit()
    with torch.no_grad():
        reference = tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3))(images)
        tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3), squeeze_floor=-1, squeeze_floor_action=action)
        assert torch.equal(model(images), reference)
        assert model.tps.patch_tokens_per_block(64) == make_config("etps", 6, 1, 0.5, (1, 3)).patch_tokens_per_block(64)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("method", ["etps", "dtps"])
def test_options_run_count_and_round_trip(method, options, images):
    model = tpsvit.patch(tiny_vit(), method, keep_rate=0.5, locations=(1, 3), **options)
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        logits = model(images)
    assert torch.isfinite(logits).all()
    fuses = options.get("squeeze_floor_action") == "fuse"
    assert [step.num_out for step in trace.locations] == ([33, 18] if fuses else [32, 16])  # + the fused token
    if "squeeze_floor" in options:
        removed = torch.cat([s.host.flatten() for s in trace.locations])
        target = 32 if fuses else -1
        assert ((removed == target) | (removed == 17) | (removed == -1)).any()  # the floor acted
    counts = model.tps.patch_tokens_per_block(64)
    side = 1 if method == "etps" else 0  # etps reduces inside the block (the MLP sees it), dtps before it
    assert [counts[b][side] for b in (1, 3)] == [step.num_out for step in trace.locations]  # analytic = runtime
    if method == "etps":
        assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
    spec = patch_spec(model)
    assert spec.get("squeeze_floor") == options.get("squeeze_floor")
    assert spec.get("squeeze_weighting", "similarity") == options.get("squeeze_weighting", "similarity")
    again = apply_patch_spec(tiny_vit(), spec)
    assert again.tps == model.tps


@pytest.mark.parametrize("options", OPTIONS)
def test_masked_path_equals_gather_path_with_options(options, images):
    model = tpsvit.patch(tiny_vit(), "dtps", keep_rate=0.5, locations=(1, 3), **options)
    with torch.no_grad():
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.5)
        gather = model(images)
        model._tps_runtime.force_masked = True
        masked = model(images)
    state = tpsvit.forward_state(model)
    assert state.masked and [d.shape[1] for d in state.decisions] == [64, 64]  # grid tokens only
    assert state.extra == (2 if options.get("squeeze_floor_action") == "fuse" else 0)
    torch.testing.assert_close(masked, gather, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("method", ["etps", "dtps"])
def test_train_mode_gradients_are_finite(method, options, images):
    from tpsvit.train.losses import keep_ratio_loss, token_distillation

    model = tpsvit.patch(tiny_vit(), method, keep_rate=0.5, locations=(1, 3), **options).train()
    torch.manual_seed(0)
    features = model.forward_features(images)
    loss = model.forward_head(features).logsumexp(-1).mean()
    state = tpsvit.forward_state(model)
    if method == "dtps":
        assert state.masked
        loss = loss + keep_ratio_loss(state.decisions, model.tps.keep_rate)
        teacher = torch.randn(3, 64, 48)
        loss = loss + token_distillation(features[:, 1:], teacher, policy=state.policy[:, 1:])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if method == "dtps":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tps_predictors.parameters())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(squeeze_floor=1.5), "squeeze_floor must be a cosine similarity in \\[-1, 1\\]"),
        (dict(squeeze_floor="high"), "squeeze_floor must be a cosine"),
        (dict(squeeze_floor=float("nan")), "squeeze_floor must be a cosine"),
        (dict(squeeze_floor=0.2, squeeze_floor_action="merge"), "unknown squeeze_floor_action 'merge'; allowed: drop"),
        (dict(squeeze_floor_action="fuse"), "set squeeze_floor too"),
        (dict(squeeze_weighting="score"), "unknown squeeze_weighting 'score'; allowed: similarity, importance"),
        (dict(method="evit", squeeze_floor=0.2), "squeeze_floor is an option of the TPS squeeze .* 'evit'"),
        (dict(method="tome", squeeze_weighting="importance"), "squeeze_weighting is an option of the TPS squeeze"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs, pattern):
    method = kwargs.pop("method", "etps")
    with pytest.raises(InvalidArgumentError, match=pattern):
        tpsvit.patch(tiny_vit(), method, keep_rate=0.5, locations=(1, 3), **kwargs)


def test_config_string_names_the_options():
    text = str(tpsvit.patch(tiny_vit(), "etps", locations=(1, 3), squeeze_floor=0.25, squeeze_floor_action="fuse",
                            squeeze_weighting="importance").tps)
    assert "squeeze_floor=0.25 (fuse)" in text and "squeeze_weighting=importance" in text


def test_training_recipe_keys_reach_the_patch_and_the_checkpoint(tmp_path):
    from fmnist_files import write_fashion_mnist

    from tpsvit.io.loading import checkpoint_metadata
    from tpsvit.train import train
    from tpsvit.train.recipe import resolve

    data = write_fashion_mnist(tmp_path / "fmnist", n_train=32, n_test=8)
    options = {"squeeze_floor": 0.1, "squeeze_floor_action": "fuse", "squeeze_weighting": "importance",
               "temperature": 0.5}
    results = train({"recipe": "fmnist-finetune", "data": str(data), "out": str(tmp_path / "run"), "epochs": 1,
                     "batch_size": 16, "steps_per_epoch": 1, "threads": 1, "predictor_init": "release",
                     "budget": 0.5, **options})
    tps = results["model"].tps
    assert (tps.squeeze_floor, tps.squeeze_floor_action, tps.squeeze_weighting, tps.temperature) == (0.1, "fuse",
                                                                                                     "importance", 0.5)
    assert tpsvit.gmacs(results["model"]) <= 0.5 * tpsvit.gmacs(tpsvit.unpatch(results["model"])) + 1e-12
    recorded = checkpoint_metadata(tmp_path / "run" / "final.safetensors")["patch"]
    assert {k: recorded[k] for k in options} == options
    with pytest.raises(InvalidArgumentError, match="squeeze_floor"):
        resolve("fmnist-finetune", {"squeeze_floor": 2})
    with pytest.raises(InvalidArgumentError, match="squeeze_weighting"):
        resolve("fmnist-finetune", {"squeeze_weighting": "score"})


def test_options_compile_fullgraph(images):
    model = tpsvit.patch(tiny_vit(), "etps", keep_rate=0.5, locations=(1, 3), squeeze_floor=0.3,
                         squeeze_floor_action="fuse", squeeze_weighting="importance")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), atol=1e-5, rtol=1e-5)


def test_cli_flags_reach_the_squeezing_rows(tmp_path, capsys):
    from tpsvit.cli import main

    assert main(["flops", "--model", "deit_small_patch16_224", "--methods", "etps", "evit", "--budget", "0.35",
                 "--squeeze-floor", "0.2", "--squeeze-floor-action", "fuse", "--temperature", "0.5",
                 "--json", str(tmp_path / "f.json")]) == 0
    import json

    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    etps, evit = rows[1], rows[2]
    assert etps["options"] == {"temperature": 0.5, "squeeze_floor": 0.2, "squeeze_floor_action": "fuse"}
    assert evit["options"] == {} and etps["gmacs"] <= 0.35 * rows[0]["gmacs"]
    assert etps["tokens_out"] == evit["tokens_out"]  # both carry one extra token per location
    assert main(["flops", "--model", "deit_small_patch16_224", "--methods", "evit", "--squeeze-floor", "0.2"]) == 2
    assert "for etps / dtps" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["dinov3", "rope_mixed"])
def test_rotary_models_take_the_fused_token_on_both_paths(variant, images):
    from test_eva import tiny_eva

    model = tpsvit.patch(tiny_eva(variant), "dtps", keep_rate=0.5, locations=(1, 3), squeeze_floor=0.3,
                         squeeze_floor_action="fuse")
    with torch.no_grad():
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.5)
        gather = model(images)
        model._tps_runtime.force_masked = True
        masked = model(images)
    assert tpsvit.forward_state(model).extra == 2  # one fused token per location, identity rotation
    torch.testing.assert_close(masked, gather, atol=1e-5, rtol=1e-5)
