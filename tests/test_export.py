"""Deployment paths of a patched model: torch.compile (fullgraph, no graph breaks) and torch.export, for every
method in eval mode, on plain, distilled and register-token ViTs; both must match eager.

The method x model matrix compiles with ``backend="aot_eager"`` (dynamo with fullgraph=True still fails on any graph
break, AOT autograd still traces the whole graph; only inductor's code generation, slow on a small CPU, is left out);
one test compiles with the real inductor backend. torch.export is checked with a dynamic batch dimension.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, VARIANTS, tiny_vit

import tpsvit

KINDS = ("plain", "distilled", "registers")
TOL = 1e-4


def patched(method: str, kind: str = "plain", device: str = "cpu", depth: int = 2):
    """A tiny ViT (64 patch tokens) patched with ``method`` at two locations (ToMe: r=8 in every block)."""
    model = tiny_vit(depth=depth, **VARIANTS[kind])
    if method == "tome":
        kwargs = {"r": 8, "locations": tuple(range(depth))}
    else:
        kwargs = {"keep_rate": 0.5, "locations": (depth // 4, depth - 1)}
    return tpsvit.patch(model, method, **kwargs).eval().to(device)


def _batch(device: str, n: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(tpsvit.METHODS))
def test_compile_fullgraph_matches_eager(method, kind, device):
    model, x = patched(method, kind, device), _batch(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert got.shape == expected.shape == (3, 7)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(tpsvit.METHODS))
def test_export_with_dynamic_batch_matches_eager(method, kind, device):
    model, x = patched(method, kind, device), _batch(device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        exported = program.module()
        for images in (x, x[:1], _batch(device, 5)):  # the traced batch, batch 1, and another size
            torch.testing.assert_close(exported(images), model(images), atol=TOL, rtol=0)


def test_patch_is_live_in_the_compiled_graph():
    """The compiled patched model is not the unpatched one (the reduction is inside the graph, not skipped)."""
    x = _batch("cpu")
    model = patched("etps")
    with torch.no_grad():
        full = tpsvit.unpatch(patched("etps"))(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert (out - full).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_batch(device):
    model = patched("etps", device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for n in (3, 5):
            x = _batch(device, n)
            torch.testing.assert_close(compiled(x), model(x), atol=TOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_compile_matches_eager(device):
    """The real inductor backend (C++ / Triton code generation) on one method; slow on a small CPU, so only one."""
    model, x = patched("etps", device=device), _batch(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=TOL, rtol=0)
