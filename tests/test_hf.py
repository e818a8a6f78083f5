"""Hugging Face transformers vision models (tpsvit.hf): tiny random configs built offline, no hub."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import tpsvit

transformers = pytest.importorskip("transformers")

ALL = ["etps", "dtps", "evit", "dynamicvit", "tome"]
LOCATIONS = (1, 2)
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=32,
             patch_size=4, layer_norm_eps=1e-6)


def build(kind: str):
    """(model, number of prefix tokens) for a tiny random model of ``kind`` (8x8 = 64 patch tokens)."""
    torch.manual_seed(0)
    t = transformers
    if kind == "vit":
        model, prefix = t.ViTForImageClassification(t.ViTConfig(**SMALL, num_labels=5)), 1
    elif kind == "vit_model":
        model, prefix = t.ViTModel(t.ViTConfig(**SMALL)), 1
    elif kind == "deit_teacher":
        model, prefix = t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**SMALL, num_labels=5)), 2
    elif kind == "dinov2":
        model, prefix = t.Dinov2ForImageClassification(t.Dinov2Config(**SMALL, num_labels=5)), 1
    elif kind == "dinov2_registers":
        config = t.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)
        model, prefix = t.Dinov2WithRegistersModel(config), 5
    elif kind == "clip":
        model, prefix = t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL)), 1
    elif kind == "dinov2_backbone":
        model, prefix = t.Dinov2Backbone(t.Dinov2Config(**SMALL, out_features=["stage2", "stage4"])), 1
    elif kind == "registers_backbone":
        config = t.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4, out_features=["stage1", "stage3"])
        model, prefix = t.Dinov2WithRegistersBackbone(config), 5
    elif kind == "siglip":
        model, prefix = t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL)), 0
    else:  # pragma: no cover
        raise KeyError(kind)
    return model.eval(), prefix


KINDS = ["vit", "vit_model", "deit_teacher", "dinov2", "dinov2_registers", "clip", "siglip"]


def outputs(model, images) -> list[torch.Tensor]:
    out = model(pixel_values=images)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def patch(model, method, keep_rate, locations=LOCATIONS):
    kwargs = {"r": 0 if keep_rate == 1.0 else None} if method == "tome" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SigLIP: the class-free scorer warning (tested below)
        return tpsvit.patch(model, method, keep_rate=keep_rate, locations=locations, **kwargs)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_keep_one_is_identity_and_unpatch_round_trips(kind, images):
    model, _ = build(kind)
    cls, keys = type(model), list(model.state_dict())
    with torch.no_grad():
        reference = outputs(model, images)
        for method in ALL:
            patch(model, method, 1.0)
            assert tpsvit.is_patched(model) and model.tps.method == method
            for got, want in zip(outputs(model, images), reference, strict=True):
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            tpsvit.unpatch(model)
            assert type(model) is cls and list(model.state_dict()) == keys
            assert all(not m._forward_hooks for m in model.modules())
        for got, want in zip(outputs(model, images), reference, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ALL)
def test_methods_reduce_as_scheduled_and_restore(kind, method, images):
    model, prefix = build(kind)
    patch(model, method, 0.5)
    assert model.tps.num_prefix_tokens == prefix
    counts = []
    layers = tpsvit.families.family_of(model).blocks(model)

    def count(module, args, out):  # transformers 4's CLIP / SigLIP layers return (hidden_states,)
        counts.append((out[0] if isinstance(out, tuple) else out).shape[1])

    hooks = [layer.register_forward_hook(count) for layer in layers]
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        out = model(pixel_values=images)
    for hook in hooks:
        hook.remove()
    extra = 1 if method == "evit" else 0
    n1 = math.ceil(0.5 * 64)
    n2 = math.ceil(0.5 * (n1 + extra))
    assert counts == [prefix + 64, prefix + n1 + extra, prefix + n2 + extra, prefix + n2 + extra]
    assert [step.block for step in trace.locations] == list(LOCATIONS)
    assert all(torch.isfinite(t).all() for t in out.values() if isinstance(t, torch.Tensor))
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is not None:
        assert hidden.shape[1] == prefix + n2 + extra
        kept_prefix, grid = tpsvit.restore(hidden, trace)
        assert kept_prefix.shape == (2, prefix, 64) and grid.shape == (2, 64, 64)


@pytest.mark.parametrize("method", ALL)
def test_vit_matches_timm_with_the_same_weights(method, images):
    """The same weights in a timm VisionTransformer, patched the same way, give the same logits."""
    import timm

    model, _ = build("vit")
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
        num_classes=5,
    ).eval()
    hf = model.state_dict()
    if "vit.layers.0.attention.q_proj.weight" not in hf:
        pytest.skip("the weight mapping below uses transformers 5 names")
    mapped = {
        "cls_token": hf["vit.embeddings.cls_token"], "pos_embed": hf["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["vit.layernorm.weight"], "norm.bias": hf["vit.layernorm.bias"],
        "head.weight": hf["classifier.weight"], "head.bias": hf["classifier.bias"],
    }
    for i in range(4):
        src, dst = f"vit.layers.{i}.", f"blocks.{i}."
        att = src + "attention."
        for part in ("weight", "bias"):
            mapped[dst + f"attn.qkv.{part}"] = torch.cat([hf[att + f"{p}_proj.{part}"] for p in "qkv"])
            mapped[dst + f"attn.proj.{part}"] = hf[att + f"o_proj.{part}"]
            mapped[dst + f"norm1.{part}"] = hf[src + f"layernorm_before.{part}"]
            mapped[dst + f"norm2.{part}"] = hf[src + f"layernorm_after.{part}"]
            mapped[dst + f"mlp.fc1.{part}"] = hf[src + f"mlp.fc1.{part}"]
            mapped[dst + f"mlp.fc2.{part}"] = hf[src + f"mlp.fc2.{part}"]
    timm_model.load_state_dict(mapped)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, timm_model(images), atol=1e-5, rtol=1e-5)
        patch(model, method, 0.5)
        patch(timm_model, method, 0.5)
        if method in ("dtps", "dynamicvit"):
            for param in model.tps_predictors.parameters():
                param.normal_(0.0, 0.5)
            timm_model.tps_predictors.load_state_dict(model.tps_predictors.state_dict())
        torch.testing.assert_close(model(images).logits, timm_model(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "vit_model", "deit_teacher", "dinov2_registers", "clip"])
@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_masked_path_equals_gather_path(kind, method, images):
    model, prefix = build(kind)
    patch(model, method, 0.5)
    with torch.no_grad():
        # spread the scores so that the test compares the paths, not tie-breaks (0.5 saturates CLIP's log-probs at 0)
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.1)
        gather = model(pixel_values=images)
        model._tps_runtime.force_masked = True
        masked = model(pixel_values=images)
    assert tpsvit.forward_state(model).masked
    if hasattr(gather, "last_hidden_state"):  # the class / prefix tokens agree; the other rows differ by design
        torch.testing.assert_close(masked.last_hidden_state[:, : max(prefix, 1)],
                                   gather.last_hidden_state[:, : max(prefix, 1)], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(masked.logits, gather.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_training_step_reaches_the_predictors(method, images):
    model, _ = build("vit")
    patch(model, method, 0.5).train()
    torch.manual_seed(0)
    model(pixel_values=images).logits.sum().backward()
    assert tpsvit.forward_state(model).masked and len(tpsvit.forward_state(model).decisions) == 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.tps_predictors.parameters())


def test_heads_pooling_all_tokens_refuse_the_masked_path(images):
    model, _ = build("dinov2")
    patch(model, "dtps", 0.5).train()
    with pytest.raises(ValueError, match="averages all patch tokens"):
        model(pixel_values=images)
    model.eval()
    model(pixel_values=images)  # the gather path is fine


def test_siglip_uses_the_class_free_scorer():
    model, _ = build("siglip")
    with pytest.warns(UserWarning, match="attention_received"):
        tpsvit.patch(model, "etps", keep_rate=0.5, locations=LOCATIONS)
    assert model.tps.scorer == "attention_received"


def test_unsupported_transformers_class_names_the_supported_ones():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    with pytest.raises(tpsvit.UnsupportedModelError, match="BertModel.*supported transformers classes: ViTModel"):
        tpsvit.patch(bert)


@pytest.mark.parametrize("kind", [*KINDS, "dinov2_backbone"])
@pytest.mark.parametrize("method", [None, *ALL])
def test_gmacs_match_the_flop_counter(kind, method):
    """The analytic count covers each family's embedding, layers and head (SigLIP's attention pool, DINOv2's
    two-token classifier, DeiT's two heads, ViT's pooler, CLIP's projection) and equals FlopCounterMode's."""
    from tpsvit.measure.flops import counted_gmacs

    model, _ = build(kind)
    if method is not None:
        patch(model, method, 0.5)
    analytic, counted = tpsvit.gmacs(model), counted_gmacs(model)
    assert analytic == pytest.approx(counted, rel=1e-4)
    if method is not None:
        assert analytic < 0.75 * counted_gmacs(tpsvit.unpatch(model))


@pytest.mark.parametrize("kind", ["dinov2_backbone", "registers_backbone"])
def test_backbone_feature_maps_keep_the_full_grid(kind, images):
    model, _ = build(kind)
    with torch.no_grad():
        reference = model(pixel_values=images).feature_maps
        hooks = {name: list(m._forward_hooks.values()) for name, m in model.named_modules()}  # transformers' own
        for method in ALL:
            patch(model, method, 1.0)
            for got, want in zip(model(pixel_values=images).feature_maps, reference, strict=True):
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            patch(model, method, 0.5)
            maps = model(pixel_values=images).feature_maps
            assert [m.shape for m in maps] == [m.shape for m in reference]
            assert all(torch.isfinite(m).all() for m in maps)
            tpsvit.unpatch(model)
            assert {name: list(m._forward_hooks.values()) for name, m in model.named_modules()} == hooks


@pytest.mark.parametrize("method", ALL)
def test_backbone_last_stage_is_the_restored_tokens_of_the_base_model(method, images):
    """Dinov2Backbone's last feature map equals tpsvit.restore of the patched Dinov2Model's tokens (same weights)."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**SMALL, out_features=["stage4"])
    backbone, base = transformers.Dinov2Backbone(config).eval(), transformers.Dinov2Model(config).eval()
    base.load_state_dict(backbone.state_dict(), strict=False)
    for model in (backbone, base):
        patch(model, method, 0.5)
    if method in ("dtps", "dynamicvit"):
        base.tps_predictors.load_state_dict(backbone.tps_predictors.state_dict())
    with torch.no_grad(), tpsvit.tracing(base) as trace, tpsvit.tracing(backbone) as own:
        tokens = base(pixel_values=images).last_hidden_state  # after the final layernorm, as the feature maps
        feature_map = backbone(pixel_values=images).feature_maps[-1]
    _, grid = tpsvit.restore(tokens, trace)
    assert len(own.locations) == len(LOCATIONS)  # the user's trace still records the backbone's passes
    with torch.no_grad():  # and once it ends, the backbone's own trace is back
        torch.testing.assert_close(backbone(pixel_values=images).feature_maps[-1], feature_map, atol=0, rtol=0)
    expected = grid.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)
    if method == "dynamicvit":
        assert (grid == 0).all(dim=-1).any()  # dropped patches are zeros


@pytest.mark.parametrize(("kind", "method"), [
    ("vit", "etps"), ("vit_model", "tome"), ("deit_teacher", "evit"), ("dinov2", "dtps"),
    ("dinov2_registers", "dynamicvit"), ("clip", "tome"), ("siglip", "etps"), ("dinov2_backbone", "etps"),
])
def test_compile_fullgraph_matches_eager(kind, method, images):
    model, _ = build(kind)
    patch(model, method, 0.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    with torch.no_grad():
        expected, got = model(pixel_values=images), compiled(pixel_values=images)
    for key, value in expected.items():
        for want, have in zip(value if isinstance(value, tuple) else (value,),
                              got[key] if isinstance(value, tuple) else (got[key],), strict=True):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "method"), [("vit", "etps"), ("dinov2_registers", "tome"), ("siglip", "dtps")])
def test_torch_export_with_dynamic_batch_matches_eager(kind, method, images):
    """transformers materialises an all-visible attention mask while tracing; the patched layers drop it once the
    sequence is shorter (eager passes None), so the exported program runs the reduced sequence correctly."""
    model, _ = build(kind)
    patch(model, method, 0.5)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(model, (images,), dynamic_shapes={"pixel_values": {0: batch}}).module()
        for x in (images, images[:1], torch.randn(3, 3, 32, 32)):
            for got, want in zip(exported(x).values(), outputs(model, x), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_full_length_attention_mask_is_refused_after_a_reduction():
    from tpsvit.families.hf_common import _mask_for

    mask = torch.zeros(1, 1, 65, 65)
    assert _mask_for(mask, 65) is mask and _mask_for(None, 33) is None
    with pytest.raises(ValueError, match="attention_mask for 65 tokens cannot apply after tpsvit reduced them to 33"):
        _mask_for(mask, 33)


def test_export_onnx_of_a_classifier(tmp_path, images):
    pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'tps-vit[export]'")
    pytest.importorskip("onnxscript", reason="needs the export extra: pip install 'tps-vit[export]'")
    model, _ = build("deit_teacher")
    patch(model, "etps", 0.5)
    result = tpsvit.export_onnx(model, tmp_path / "deit.onnx", batch_size=2, dynamic_batch=True)
    assert result["max_abs_diff"] <= 1e-4
    from tpsvit.io.export import run_onnx

    with torch.no_grad():
        expected = model(pixel_values=images[:1]).logits.numpy()
    assert abs(run_onnx(tmp_path / "deit.onnx", images[:1]) - expected).max() < 1e-4
