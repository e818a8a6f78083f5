import pytest
import torch
from conftest import tiny_vit

import tpsvit
from tpsvit.measure.budget import schedule_gmacs


@pytest.fixture
def calib():
    """64 random images labelled by the unpatched 12-block model itself (so pruning can only lose accuracy)."""
    torch.manual_seed(2)
    images = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        labels = tiny_vit(depth=12)(images).argmax(dim=-1)
    return images, labels


@pytest.mark.parametrize("method, budget", [("etps", 0.6), ("evit", 0.5), ("tome", 0.6)])
def test_plan_meets_the_budget_and_never_loses_to_the_fixed_schedule(method, budget, calib):
    model = tiny_vit(depth=12)
    full = tpsvit.gmacs(model)
    schedule = tpsvit.plan(model, method, budget, data=calib, batch_size=32)
    assert not tpsvit.is_patched(model)  # the model is left as it was
    assert schedule.gmacs <= budget * full + 1e-12
    assert schedule.fixed is not None and schedule.top1 >= schedule.fixed.top1
    assert schedule.top1 == max(c.top1 for c in schedule.candidates)
    assert all(c.gmacs <= budget * full + 1e-12 for c in schedule.candidates)
    tpsvit.patch(model, **schedule.patch_kwargs())
    assert tpsvit.gmacs(model) == pytest.approx(schedule.gmacs)
    assert schedule.gmacs == pytest.approx(schedule_gmacs(tiny_vit(depth=12), **schedule.patch_kwargs()))
    with torch.no_grad():
        top1 = 100.0 * (model(calib[0]).argmax(-1) == calib[1]).float().mean().item()
    assert top1 == pytest.approx(schedule.top1)
    if method == "tome":
        assert schedule.fixed.locations == tuple(range(12)) and schedule.r is not None
    else:
        assert schedule.fixed.locations == (3, 6, 9) and 0 < schedule.keep_rate <= 1
    assert schedule.as_dict()["chosen"]["top1"] == schedule.top1


def test_plan_restores_a_patched_model_and_needs_trained_predictors(calib):
    model = tpsvit.patch(tiny_vit(depth=12), "etps", keep_rate=0.9, locations=(2, 5))
    tpsvit.plan(model, "evit", 0.7, data=calib)
    assert model.tps.method == "etps" and model.tps.locations == (2, 5) and model.tps.keep_rate == (0.9, 0.9)
    with pytest.raises(ValueError, match="needs a model patched with dtps"):
        tpsvit.plan(tiny_vit(depth=12), "dtps", 0.7, data=calib)
    dtps = tpsvit.patch(tiny_vit(depth=12), "dtps", keep_rate=0.7, locations=(3, 6, 9))
    predictor = dtps.tps_predictors["3"]
    schedule = tpsvit.plan(dtps, "dtps", 0.6, data=calib)
    assert schedule.locations == (3, 6, 9) and dtps.tps_predictors["3"] is predictor
    with pytest.raises(ValueError, match="would discard"):
        tpsvit.plan(dtps, "etps", 0.6, data=calib)
    with pytest.raises(ValueError, match="no schedule of etps meets"):
        tpsvit.plan(tiny_vit(depth=12), "etps", 0.05, data=calib)
