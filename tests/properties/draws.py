"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import zoo
from hypothesis import strategies as st


@st.composite
def valid_patches(draw, names=None, methods=zoo.ALL_METHODS):
    """(zoo name, method, patch kwargs) of a valid patch: ascending distinct locations (maybe none), a keep rate in
    [0.01, 1] (one, or one per location) or, for ToMe, sometimes an r up to half the patch tokens."""
    name = draw(st.sampled_from(sorted(names or zoo.ZOO)))
    depth = zoo.ZOO[name].depth
    method = draw(st.sampled_from(methods))
    locations = draw(st.lists(st.integers(0, depth - 1), unique=True).map(sorted))
    if method == "tome" and draw(st.booleans()):
        amount = {"r": draw(st.integers(0, zoo.num_patches(name) // 2))}
    elif draw(st.booleans()):
        amount = {"keep_rate": draw(st.lists(st.floats(0.01, 1.0), min_size=len(locations), max_size=len(locations)))}
    else:
        amount = {"keep_rate": draw(st.floats(0.01, 1.0))}
    return name, method, {"locations": locations, **amount}
