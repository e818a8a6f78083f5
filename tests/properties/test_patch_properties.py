"""Properties of tpsvit.patch over generated calls: every family of the zoo, every method, keep rates from 0.01 to 1,
ToMe's r, location lists (empty, repeats, out of range, unsorted), batch 1..4, image sizes the model accepts and ones
it refuses, float32 / bfloat16, train / eval, and patching twice.

- a call either raises tpsvit's own error naming the bad value (and leaves the model as it was), or the patched model
  returns finite outputs of the unpatched shape (token sequences: the prefix plus the tokens the schedule leaves);
  an image size the model refuses raises tpsvit's error naming the size (unpatched: the library's own);
- keep 1 / r 0 gives the unpatched outputs; ``unpatch`` restores the outputs and the ``state_dict`` exactly;
- patching twice equals patching once with the second patch.
"""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from draws import valid_patches
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tpsvit
from tpsvit.errors import TPSError

DTYPES = (torch.float32, torch.bfloat16)
BAD_RATES = (0.0, -0.25, 1.5, math.nan, math.inf, True)


@st.composite
def calls(draw):
    """(zoo name, method, patch kwargs, batch, image side, dtype, train mode, a patch before this one or None)."""
    name = draw(st.sampled_from(sorted(zoo.ZOO)))
    entry = zoo.ZOO[name]
    method = draw(st.sampled_from(zoo.ALL_METHODS))
    locations = draw(st.one_of(
        st.lists(st.integers(0, entry.depth - 1), unique=True).map(sorted),  # valid, empty included
        st.lists(st.integers(-2, entry.depth + 2), max_size=5),  # repeats, out of range, unsorted
    ))
    kwargs = {"locations": locations}
    if method == "tome" and draw(st.booleans()):
        kwargs["r"] = draw(st.one_of(st.integers(0, zoo.num_patches(name)), st.sampled_from([-1, 2.5])))
    else:
        kwargs["keep_rate"] = draw(st.one_of(
            st.floats(0.01, 1.0),
            st.sampled_from(BAD_RATES),
            st.lists(st.floats(0.01, 1.0), min_size=len(locations), max_size=len(locations)),
        ))
    if method != "tome" and draw(st.integers(0, 4)) == 0:
        kwargs["scorer"] = "random"
    batch = draw(st.integers(1, 4))
    size = draw(st.sampled_from(entry.sizes + entry.bad_sizes))
    dtype = draw(st.sampled_from(DTYPES))
    train = draw(st.booleans())
    before = draw(st.one_of(st.none(), st.sampled_from(zoo.ALL_METHODS)))
    return name, method, kwargs, batch, size, dtype, train, before


def expected_error(name: str, method: str, kwargs: dict) -> list[str] | None:
    """None for a valid call, else the phrases of which the error must contain one (each names a bad value)."""
    depth, locations = zoo.ZOO[name].depth, kwargs["locations"]
    phrases = [f"location {loc} " for loc in locations if not 0 <= loc < depth]
    if not phrases and (len(set(locations)) != len(locations) or locations != sorted(locations)):
        phrases.append(str(list(locations)))
    if "r" in kwargs:
        r = kwargs["r"]
        if not isinstance(r, int) or r < 0:
            phrases.append(f"got {r!r}")
        elif locations and not phrases and r > zoo.num_patches(name) // 2:
            phrases.append(f"r={r} ")
    else:
        rates = kwargs["keep_rate"] if isinstance(kwargs["keep_rate"], list) else [kwargs["keep_rate"]]
        phrases += [f"keep_rate {rate!r} " for rate in rates if isinstance(rate, bool) or not 0 < rate <= 1]
    return phrases or None


def _final_tokens(model, prefix: int, n: int) -> int:
    return prefix + model.tps.patch_tokens_per_block(n)[-1][1]


def _check_like_unpatched(name, model, got, reference, size) -> None:
    """Finite outputs of the unpatched shape; a token sequence (B, N, C) holds the prefix plus what is left."""
    assert len(got) == len(reference)
    for out, ref in zip(got, reference, strict=True):
        assert torch.isfinite(out.float()).all()
        if out.dim() == 3 and out.shape != ref.shape:
            prefix = model.tps.num_prefix_tokens
            assert out.shape[0::2] == ref.shape[0::2]
            assert out.shape[1] == _final_tokens(model, prefix, ref.shape[1] - prefix), (out.shape, ref.shape)
        else:
            assert out.shape == ref.shape


@settings(max_examples=4 * settings().max_examples)  # the broadest property, and cheap: more examples
@given(calls())
@example(("vit", "etps", {"locations": [], "keep_rate": 5.0}, 1, 32, torch.float32, False, None))  # found: no error
@example(("vit", "tome", {"locations": [], "r": 3}, 1, 32, torch.float32, False, None))  # found: max() of nothing
@example(("vit", "tome", {"locations": [1], "r": 2.5}, 1, 32, torch.float32, False, None))  # found: raw TypeError
@example(("hf_dinov2", "dtps", {"locations": [1], "keep_rate": 0.5}, 2, 32, torch.float32, True, None))
@example(("hf_siglip", "dtps", {"locations": [0], "keep_rate": 0.5}, 1, 16, torch.float32, True, None))  # refusal first
@example(("vit", "etps", {"locations": [], "keep_rate": True}, 1, 32, torch.float32, False, None))  # found: odd message
def test_a_call_raises_a_clear_error_or_runs_like_the_unpatched_model(call):
    name, method, kwargs, batch, size, dtype, train, before = call
    reference_model = zoo.fresh(name, dtype).train(train)
    model = zoo.fresh(name, dtype).train(train)
    if before is not None:
        zoo.patch(model, before, keep_rate=0.5, locations=[1])
    config_before = getattr(model, "tps", None)
    phrases = expected_error(name, method, kwargs)
    if phrases is not None:
        with pytest.raises(TPSError) as info:
            zoo.patch(model, method, **kwargs)
        assert any(p in str(info.value) for p in phrases), (str(info.value), phrases)
        assert getattr(model, "tps", None) == config_before  # a bad call leaves the model as it was
        return
    zoo.patch(model, method, **kwargs)
    x = zoo.images(name, batch, size, dtype)
    if zoo.refuses_masked_path(name, model):  # checked first, whatever the input
        with pytest.raises(TPSError, match=method):  # the masked path cannot restrict a pool over every token
            zoo.outputs(name, model, x)
        return
    try:
        torch.manual_seed(0)
        reference = zoo.outputs(name, reference_model, x)
    except Exception:  # a size the model refuses: patched, tpsvit's own error naming the size
        with pytest.raises(TPSError, match=f"images of {size}x{size} pixels"):
            zoo.outputs(name, model, x)
        return
    _check_like_unpatched(name, model, zoo.outputs(name, model, x), reference, size)


@settings(max_examples=2 * settings().max_examples)
@given(valid_patches(), st.integers(1, 4), st.sampled_from(DTYPES), st.booleans())
@example(("hf_dinov2", "dtps", {"locations": [], "keep_rate": 1.0}), 1, torch.float32, True)  # found: refused
@example(("vit", "dtps", {"locations": [1, 2], "keep_rate": 0.5}), 2, torch.float32, True)  # found: Gumbel at keep 1
def test_keep_one_is_the_unpatched_model_and_unpatch_restores_it(patch, batch, dtype, train):
    name, method, kwargs = patch
    model = zoo.fresh(name, dtype).train(train)
    x = zoo.images(name, batch, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = zoo.outputs(name, model, x)
    cls = type(model)

    zoo.patch(model, method, locations=kwargs["locations"], **zoo.identity_amount(method))
    for got, want in zip(zoo.outputs(name, model, x), reference, strict=True):
        assert torch.equal(got, want)

    zoo.patch(model, method, **kwargs)
    if not zoo.refuses_masked_path(name, model):
        zoo.outputs(name, model, x)
    tpsvit.unpatch(model)
    assert type(model) is cls and not tpsvit.is_patched(model)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for got, want in zip(zoo.outputs(name, model, x), reference, strict=True):
        assert torch.equal(got, want)


@given(valid_patches(), st.data(), st.integers(1, 3))
def test_patching_twice_is_patching_once_with_the_second_patch(second, data, batch):
    name, method, kwargs = second
    _, first_method, first_kwargs = data.draw(valid_patches(names=[name]), label="first patch")
    twice = zoo.patch(zoo.fresh(name), first_method, **first_kwargs)
    zoo.patch(twice, method, **kwargs)
    once = zoo.patch(zoo.fresh(name), method, **kwargs)
    assert twice.tps == once.tps
    assert list(twice.state_dict()) == list(once.state_dict())
    once.load_state_dict(twice.state_dict())  # learned predictors kept from the first patch: same weights in both
    x = zoo.images(name, batch)
    for got, want in zip(zoo.outputs(name, twice, x), zoo.outputs(name, once, x), strict=True):
        assert torch.equal(got, want)
