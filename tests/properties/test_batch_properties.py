"""Properties of eval mode: the same input gives the same output, and an image's output does not depend on the
other images of its batch (one image alone equals its row in a batch), for every family and every method.

What does not promise it (docs/properties.md): ``scorer="random"`` (fresh random scores on every call) and dtps /
dynamicvit in train mode (Gumbel samples); neither is drawn here.
"""

from __future__ import annotations

import torch
import zoo
from draws import valid_patches
from hypothesis import given
from hypothesis import strategies as st


@given(valid_patches(), st.integers(2, 4), st.data())
def test_eval_outputs_are_deterministic_and_independent_of_the_batch(patch, batch, data):
    name, method, kwargs = patch
    size = data.draw(st.sampled_from(zoo.ZOO[name].sizes), label="image side")
    row = data.draw(st.integers(0, batch - 1), label="row")
    model = zoo.patch(zoo.fresh(name), method, **kwargs)
    x = zoo.images(name, batch, size, seed=batch)
    first = zoo.outputs(name, model, x)
    for again, out in zip(zoo.outputs(name, model, x), first, strict=True):
        assert torch.equal(again, out)
    for alone, out in zip(zoo.outputs(name, model, x[row : row + 1]), first, strict=True):
        torch.testing.assert_close(alone[0], out[row], rtol=1e-4, atol=1e-5)
