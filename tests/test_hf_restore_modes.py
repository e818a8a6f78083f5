"""patch(..., restore=MODE) on models that return feature maps (Dinov2Backbone): the maps follow tpsvit.restore."""

from __future__ import annotations

import pytest
import torch
from test_hf import SMALL

import tpsvit
from tpsvit.errors import InvalidArgumentError

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("mode", ["host", "frozen", "zeros"])
@pytest.mark.parametrize("method", ["etps", "tome", "dynamicvit"])
def test_backbone_maps_are_the_restored_tokens_in_every_mode(method, mode, images):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**SMALL, out_features=["stage4"])
    backbone, base = transformers.Dinov2Backbone(config).eval(), transformers.Dinov2Model(config).eval()
    base.load_state_dict(backbone.state_dict(), strict=False)
    amount = {"r": 8} if method == "tome" else {"keep_rate": 0.5}
    tpsvit.patch(backbone, method, locations=(1, 2), restore=mode, **amount)
    tpsvit.patch(base, method, locations=(1, 2), **amount)
    if method == "dynamicvit":
        base.tps_predictors.load_state_dict(backbone.tps_predictors.state_dict())
    with torch.no_grad(), tpsvit.tracing(base) as trace:
        tokens = base(pixel_values=images).last_hidden_state  # after the final layernorm, as the feature maps
        feature_map = backbone(pixel_values=images).feature_maps[-1]
        _, grid = tpsvit.restore(tokens, trace, mode=mode, norm=base.layernorm if mode == "frozen" else None)
    expected = grid.reshape(len(images), 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)
    removed = ~trace.survivors()
    cells = feature_map.flatten(2).transpose(1, 2)[removed]
    assert (cells.abs().sum(-1) == 0).all() == (mode == "zeros" or (mode == "host" and method == "dynamicvit"))


def test_restore_option_is_refused_where_the_model_returns_tokens(images):
    model = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)).eval()
    with pytest.raises(InvalidArgumentError, match="restore='frozen' applies to models that return feature maps"):
        tpsvit.patch(model, "etps", 0.5, (1, 2), restore="frozen")
    with pytest.raises(InvalidArgumentError, match="restore='grid'; allowed: host, frozen, zeros"):
        tpsvit.patch(model, "etps", 0.5, (1, 2), restore="grid")
    assert not tpsvit.is_patched(model)
