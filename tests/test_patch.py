import copy
import math

import pytest
import torch
from conftest import VARIANTS, tiny_vit

import tpsvit
from tpsvit.core.methods import METHODS
from tpsvit.errors import InvalidArgumentError

ALL = list(METHODS)
CLS_FREE = ["dtps", "dynamicvit", "tome"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ALL)
def test_keep_rate_one_is_the_unpatched_model(variant, method, images):
    model = tiny_vit(**VARIANTS[variant])
    with torch.no_grad():
        reference = model(images)
        tpsvit.patch(model, method, keep_rate=1.0, locations=(1, 3, 4))
        assert torch.equal(model(images), reference)
        model.train()
        torch.manual_seed(0)
        out = model(images)
    out = out[0] if isinstance(out, tuple) else out
    model.eval()
    torch.testing.assert_close(model(images), reference)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", CLS_FREE)
def test_models_without_class_token(method, images):
    model = tiny_vit(class_token=False, global_pool="avg")
    with torch.no_grad():
        reference = model(images)
        tpsvit.patch(model, method, keep_rate=1.0, locations=(1, 3))
        torch.testing.assert_close(model(images), reference)
        tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
        assert model(images).shape == reference.shape


@pytest.mark.parametrize("method", ["etps", "evit"])
def test_class_attention_methods_fall_back_to_the_class_free_scorer(method):
    with pytest.warns(UserWarning, match="no class token"):
        model = tpsvit.patch(tiny_vit(class_token=False, global_pool="avg"), method, locations=(1,))
    assert model.tps.scorer == "attention_received"  # tests/test_class_free.py covers it


def _block_lengths(model, images):
    lengths = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1])) for b in model.blocks]
    hooks += [b.attn.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    attn, mlp = lengths[0::2], lengths[1::2]  # within a block attention runs before the MLP
    return list(zip(attn, mlp))


@pytest.mark.parametrize("variant", ["plain", "registers"])
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, (0.9, 0.6, 0.3)])
def test_token_counts_follow_the_schedule(variant, method, keep_rate, images):
    model = tiny_vit(**VARIANTS[variant])
    tpsvit.patch(model, method, keep_rate=keep_rate, locations=(1, 3, 4))
    prefix = model.num_prefix_tokens
    expected = [(a + prefix, m + prefix) for a, m in model.tps.patch_tokens_per_block(64)]
    assert _block_lengths(model, images) == expected
    rates = keep_rate if isinstance(keep_rate, tuple) else (keep_rate,) * 3
    n = 64
    for (loc, rate) in zip((1, 3, 4), rates):
        kept = math.ceil(rate * n - 1e-9)
        if method == "tome":
            kept = n - min(n - kept, n // 2)
        n = kept + (1 if method == "evit" else 0)
        row = model.tps.patch_tokens_per_block(64)[loc]
        assert row[0 if model.tps.spec.placement == "before" else 1] == n


def test_tome_r_merges_r_tokens_in_every_block(images):
    model = tiny_vit()
    tpsvit.patch(model, "tome", r=5)
    assert model.tps.locations == tuple(range(6))
    assert [m for _, m in model.tps.patch_tokens_per_block(64)] == [59, 54, 49, 44, 39, 34]
    assert [m for _, m in _block_lengths(model, images)] == [60, 55, 50, 45, 40, 35]


@pytest.mark.parametrize("method", ["etps", "evit", "tome"])
def test_prefix_tokens_are_never_reduced(method, images):
    """At an 'inside' location the prefix rows of the block output equal the stock block's: never pruned or merged."""
    model = tiny_vit(reg_tokens=2)
    stock = copy.deepcopy(model)
    tpsvit.patch(model, method, keep_rate=0.4, locations=(2,))
    captured = {}
    stock.blocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("stock", o))
    model.blocks[2].register_forward_hook(lambda m, i, o: captured.setdefault("patched", o))
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        stock(images)
        model(images)
    torch.testing.assert_close(captured["patched"][:, :3], captured["stock"][:, :3])
    step = trace.locations[0]
    covered = torch.cat([step.kept, step.pruned], dim=1).sort(dim=1).values
    assert torch.equal(covered, torch.arange(64).expand(3, -1))  # patch indices only, each exactly once


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_masked_path_keeps_prefix(method, images):
    model = tiny_vit(reg_tokens=2).train()
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    model(images)
    state = tpsvit.forward_state(model)
    assert state.masked and torch.equal(state.policy[:, :3], torch.ones(3, 3))
    assert len(state.decisions) == 2 and state.decisions[0].shape == (3, 64)


@pytest.mark.parametrize("method", ALL)
def test_patch_unpatch_round_trip(method, images):
    model = tiny_vit(init_values=0.1)
    classes = (type(model), type(model.blocks[0]))
    keys = list(model.state_dict())
    with torch.no_grad():
        reference = model(images)
        tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3, 4))
        patched_keys = list(model.state_dict())
        assert tpsvit.is_patched(model) and model.tps.method == method
        if METHODS[method].learned:
            extra = [k for k in patched_keys if k not in keys]
            assert extra and all(k.startswith("tps_predictors.") for k in extra)
        else:
            assert patched_keys == keys
        assert not torch.equal(model(images), reference)
        tpsvit.unpatch(model)
        assert (type(model), type(model.blocks[0])) == classes
        assert list(model.state_dict()) == keys
        assert not any(b.attn.qkv._forward_hooks for b in model.blocks)
        assert torch.equal(model(images), reference)


def test_repatching_unpatches_first_and_keeps_trained_predictors(images):
    model = tiny_vit()
    tpsvit.patch(model, "dtps", keep_rate=0.7, locations=(1, 3))
    trained = model.tps_predictors["3"]
    tpsvit.patch(model, "dtps", keep_rate=0.5, locations=(3, 4))
    assert model.tps_predictors["3"] is trained
    assert set(model.tps_predictors) == {"3", "4"}
    tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3))
    assert not hasattr(model, "tps_predictors") and model.tps.method == "etps"
    assert len(model(images)) == 3
    tpsvit.unpatch(model)
    assert not tpsvit.is_patched(model)


def test_a_bad_repatch_leaves_the_patched_model_as_it_was():
    model = tiny_vit()
    tpsvit.patch(model, "dtps", keep_rate=0.7, locations=(1, 3))
    trained = model.tps_predictors["3"]
    with pytest.raises(ValueError, match="outside"):
        tpsvit.patch(model, "dtps", keep_rate=2.0, locations=(1, 3))
    assert model.tps.keep_rate == (0.7, 0.7) and model.tps_predictors["3"] is trained


def test_set_keep_rate_changes_the_schedule_not_the_weights(images):
    model = tiny_vit()
    tpsvit.patch(model, "dtps", keep_rate=0.9, locations=(1, 3, 4))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tpsvit.set_keep_rate(model, 0.5)
    assert model.tps.keep_rate == (0.5, 0.5, 0.5)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        tpsvit.set_keep_rate(model, 0)


def test_deepcopy_of_a_patched_model_is_independent(images):
    model = tiny_vit()
    tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3, 4))
    twin = copy.deepcopy(model)
    tpsvit.unpatch(twin)
    assert tpsvit.is_patched(model) and not tpsvit.is_patched(twin)
    with tpsvit.tracing(model) as trace:
        model(images)
    assert len(trace.locations) == 3


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_masked_path_equals_gather_path_with_the_same_decisions(method):
    """Train-mode Gumbel decisions on the full-length masked path reproduce, on the gather path, the same logits."""
    model = tiny_vit(reg_tokens=1)
    tpsvit.patch(model, method, keep_rate=0.6, locations=(1, 3, 4))
    torch.manual_seed(3)
    image = torch.randn(1, 3, 32, 32)
    model.train()  # drop-path and dropout are 0 in tiny_vit: the only randomness is the Gumbel sampling
    with torch.no_grad():
        masked_logits = model(image)
    decisions = [d[0].clone() for d in tpsvit.forward_state(model).decisions]
    counts = [int(d.sum()) for d in decisions]
    assert all(c > 0 for c in counts)

    class Replay(torch.nn.Module):
        """Scores that make top-k keep exactly the recorded tokens (read through the current grid positions)."""

        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, tokens, keep=None):
            positions = tpsvit.forward_state(model).positions
            if positions is None:
                positions = torch.arange(tokens.shape[1])[None]
            keep_logit = self.keep[positions]
            return torch.stack([keep_logit, 1 - keep_logit], dim=-1)

    previous = 64
    rates = []
    for count in counts:
        rates.append(count / previous)
        previous = count
    tpsvit.set_keep_rate(model, rates)
    for block, keep in zip((1, 3, 4), decisions):
        object.__setattr__(model.blocks[block], "_tps_predictor", Replay(keep))
    model.eval()
    with torch.no_grad():
        gather_logits = model(image)
    assert not tpsvit.forward_state(model).masked
    torch.testing.assert_close(gather_logits, masked_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_masked_top_k_equals_gather_batched(method, images):
    model = tiny_vit()
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    with torch.no_grad():
        # the release's init scores every token ~0.5 (near-ties that the two paths may break differently):
        # spread the scores so that the test compares the paths, not round-off at a tie
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.5)
        gather = model(images)
        model._tps_runtime.force_masked = True
        masked = model(images)
    assert tpsvit.forward_state(model).masked
    torch.testing.assert_close(masked, gather, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_batch_independence(method, images):
    model = tiny_vit(reg_tokens=1)
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3, 4))
    with torch.no_grad():
        batch = model(images)
        for i in range(len(images)):
            torch.testing.assert_close(batch[i : i + 1], model(images[i : i + 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL)
def test_low_precision_outputs_are_finite(method, dtype, images):
    model = tiny_vit().to(dtype)
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3, 4))
    with torch.no_grad():
        out = model(images.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ALL)
def test_gradients_flow_in_train_mode(method, images):
    model = tiny_vit().train()
    tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3, 4))
    torch.manual_seed(0)
    model(images).logsumexp(-1).sum().backward()
    backbone = [p for n, p in model.named_parameters() if not n.startswith("tps_predictors")]
    assert all(p.grad is not None for p in backbone)
    if METHODS[method].learned:
        grads = [p.grad for p in model.tps_predictors.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_random_scorer_changes_the_choice(images):
    model = tiny_vit()
    tpsvit.patch(model, "etps", keep_rate=0.5, locations=(1, 3), scorer="random")
    with tpsvit.tracing(model) as trace:
        torch.manual_seed(0)
        model(images)
    first = trace.locations[0].kept.clone()
    with tpsvit.tracing(model) as trace:
        torch.manual_seed(1)
        model(images)
    assert not torch.equal(first, trace.locations[0].kept)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"keep_rate": 0.0}, ValueError, r"outside \(0, 1\]"),
        ({"keep_rate": 1.5}, ValueError, r"outside \(0, 1\]"),
        ({"keep_rate": float("nan")}, ValueError, r"outside \(0, 1\]"),
        ({"keep_rate": [0.5, 0.5]}, ValueError, "2 values but there are 3 locations"),
        ({"locations": (1, 6)}, ValueError, r"location 6 is not a block of this model; allowed: integers 0..5"),
        ({"locations": (3, 1)}, ValueError, "ascending"),
        ({"method": "prune"}, ValueError, "unknown method 'prune'; allowed: etps, dtps, evit, dynamicvit, tome"),
        ({"method": "etps", "r": 4}, ValueError, "ToMe's option"),
        ({"temperature": 0}, ValueError, "temperature"),
        ({"scorer": "oracle"}, ValueError, "unknown scorer"),
    ],
)
def test_bad_arguments_are_explained(kwargs, error, pattern):
    kwargs = {"method": "etps", "locations": (1, 3, 4), **kwargs}
    model = tiny_vit()
    with pytest.raises(error, match=pattern):
        tpsvit.patch(model, **kwargs)
    assert not tpsvit.is_patched(model)


def test_models_that_are_not_vits_are_refused():
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        tpsvit.patch(torch.nn.Linear(3, 3), "etps")
    with pytest.raises(ValueError, match="not patched"):
        tpsvit.forward_state(tiny_vit())


def test_release_keep_rates_reproduce_the_release_counts():
    from tpsvit.core.config import make_config
    from tpsvit.core.methods import release_keep_rates

    for ratio, counts in ((0.7, [137, 96, 67]), (0.5, [98, 49, 24]), (0.3, [58, 17, 5])):
        assert [int(196 * ratio ** (i + 1)) for i in range(3)] == counts  # the release: int(N * ratio^i)
        config = make_config("dynamicvit", 12, 1, release_keep_rates(ratio, 196), (3, 6, 9))
        seen = [attn for attn, _ in config.patch_tokens_per_block(196)]
        assert [seen[3], seen[6], seen[9]] == counts


def test_keep_rate_string_is_named_whole():
    with pytest.raises(ValueError, match=r"keep_rate must be a number in \(0, 1\] or a list of them, got 'abc'"):
        tpsvit.patch(tiny_vit(), "etps", keep_rate="abc", locations=(1,))


def test_tome_r_beyond_half_the_tokens_is_an_error():
    model = tiny_vit()  # 64 patch tokens: at most 32 merged in one block
    tpsvit.patch(model, "tome", r=32)
    with pytest.raises(InvalidArgumentError, match="r=1000 is more than ToMe can merge in one block: at most half "
                                                   "of the 64 patch tokens \\(32\\)"):
        tpsvit.patch(model, "tome", r=1000)
