"""timm's Eva family (DINOv3, EVA-02, Perception Encoder, RoPE ViTs): every method, with rotary angles carried by the
surviving tokens. Tiny random models built like the real definitions in timm/models/eva.py."""

from __future__ import annotations

import pytest
import torch
from test_patch import _block_lengths
from timm.models.eva import Eva

import tpsvit
from tpsvit.core.methods import METHODS
from tpsvit.families import gather_rope
from tpsvit.measure.flops import counted_gmacs

ALL = list(METHODS)

# (label, Eva kwargs): the variants of the family that the patch must support.
EVA_VARIANTS = {
    # DINOv3: class + 4 register tokens, LayerScale, DINOv3 rope (rotate-half), no abs pos embed, avg pool
    "dinov3": dict(use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=4, init_values=0.1,
                   use_abs_pos_emb=False, qkv_bias=False, global_pool="avg", use_fc_norm=False),
    # EVA-02: abs + "cat" rope (interleaved), SwiGLU MLP with scale norm, class token, avg pool
    "eva02": dict(use_rot_pos_emb=True, rope_type="cat", swiglu_mlp=True, scale_mlp=True, mlp_ratio=4 * 2 / 3,
                  ref_feat_shape=(4, 4)),
    # RoPE-Mixed ViT: AttentionRope, learned per-block (mixed) rope, LayerScale, class-token pooling
    "rope_mixed": dict(attn_type="rope", use_rot_pos_emb=True, rope_type="mixed", init_values=0.1,
                       use_abs_pos_emb=False, global_pool="token", rope_grid_indexing="xy"),
    # grouped-query attention (AttentionRope, separate q/k/v, one kv head), no class token: class-free scorer
    "gqa_no_cls": dict(attn_type="rope", qkv_fused=False, num_kv_heads=1, use_rot_pos_emb=True, rope_type="cat",
                       class_token=False, num_reg_tokens=1, global_pool="avg"),
}


def tiny_eva(variant: str = "dinov3", **overrides) -> Eva:
    kwargs = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=2, num_classes=7)
    kwargs.update(EVA_VARIANTS[variant])
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Eva(**kwargs).eval()
    with torch.no_grad():  # random heads start at 1e-3 scale: make the logits depend on the tokens
        model.head.weight.normal_(0, 0.3)
    return model


def _patch(model, method, **kwargs):
    if method in ("etps", "evit") and model.cls_token is None:
        with pytest.warns(UserWarning, match="no class token"):
            return tpsvit.patch(model, method, **kwargs)
    return tpsvit.patch(model, method, **kwargs)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
@pytest.mark.parametrize("method", ALL)
def test_keep_rate_one_is_the_unpatched_model_and_round_trip(variant, method, images):
    model = tiny_eva(variant)
    keys = list(model.state_dict())
    with torch.no_grad():
        reference = model(images)
        _patch(model, method, keep_rate=1.0, locations=(1, 3))
        assert torch.equal(model(images), reference)
        model.train()
        out = model(images)
        assert torch.isfinite(out).all()
        model.eval()
        _patch(model, method, keep_rate=0.5, locations=(1, 3))
        reduced = model(images)
        assert reduced.shape == reference.shape and torch.isfinite(reduced).all()
        assert not torch.allclose(reduced, reference)
        tpsvit.unpatch(model)
        assert type(model) is Eva and all(type(b).__name__ == "EvaBlock" for b in model.blocks)
        assert torch.equal(model(images), reference)
    assert list(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("variant", ["dinov3", "eva02"])
@pytest.mark.parametrize("method", ALL)
def test_token_counts_follow_the_schedule(variant, method, images):
    model = _patch(tiny_eva(variant), method, keep_rate=0.6, locations=(1, 3))
    prefix = model.num_prefix_tokens
    expected = [(a + prefix, m + prefix) for a, m in model.tps.patch_tokens_per_block(64)]
    assert _block_lengths(model, images) == expected


def _rope_table(model, images):
    x = model.patch_embed(images)
    return model._pos_embed(x)[1]


@pytest.mark.parametrize("variant", ["dinov3", "eva02", "rope_mixed"])
@pytest.mark.parametrize("method", ALL)
def test_each_block_gets_the_rope_rows_of_its_surviving_tokens(variant, method, images):
    """After a reduction the attention of every later block is called with exactly the rotary rows of the original
    grid positions of its patch tokens: a kept or host token keeps its own angles, ToMe's merged token keeps the
    destination's, EViT's fused token (no grid cell) gets the identity rotation."""
    model = _patch(tiny_eva(variant), method, keep_rate=0.5, locations=(1, 3))
    seen = {}
    for index, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: seen.__setitem__(i, kwargs["rope"]), with_kwargs=True
        )
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        model(images)
        table = _rope_table(model, images)
    mixed = variant == "rope_mixed"
    origin = torch.arange(64).expand(3, -1)  # original grid index of each current patch token (-1: none)
    for step in trace.locations:
        # output token j of the step is input token kept[j]; EViT appends its fused token, which has no grid cell
        origin = origin.gather(1, step.kept)
        if step.num_out > origin.shape[1]:
            origin = torch.cat([origin, origin.new_full((3, step.num_out - origin.shape[1]), -1)], dim=1)
        nxt = step.block if METHODS[method].placement == "before" else step.block + 1
        rope = seen[nxt]
        rows = table[nxt] if mixed else table
        while rows.ndim < 4:
            rows = rows.unsqueeze(0)
        rows = rows.expand(3, *rows.shape[1:])
        assert rope.shape[-2] == origin.shape[1]
        for b in range(3):
            for j, pos in enumerate(origin[b].tolist()):
                got = rope[b, :, j]
                if pos >= 0:
                    assert torch.equal(got, rows[b, :, pos])
                else:
                    half = got.shape[-1] // 2
                    assert torch.equal(got[..., :half], torch.zeros_like(got[..., :half]))
                    assert torch.equal(got[..., half:], torch.ones_like(got[..., half:]))
    if method == "tome":  # every merged token's destination is a B-side token, which stays with its own angles
        first = trace.locations[0]
        prefix = model.num_prefix_tokens
        destinations = first.kept.gather(1, first.host)  # input index of each merged token's destination
        assert all((d + prefix) % 2 == 1 for d in destinations.flatten().tolist())
        assert first.pruned.numel() > 0


def test_gather_rope_shapes():
    table = torch.randn(6, 8)
    positions = torch.tensor([[5, 0, -1], [1, 2, 3]])
    out = gather_rope(table, positions)
    assert out.shape == (2, 1, 3, 8)
    assert torch.equal(out[0, 0, 0], table[5]) and torch.equal(out[1, 0, 2], table[3])
    assert out[0, 0, 2].tolist() == [0.0] * 4 + [1.0] * 4
    per_head = torch.randn(2, 6, 8)
    assert torch.equal(gather_rope(per_head, positions)[1, 1, 0], per_head[1, 1])
    assert gather_rope(table, None) is table and gather_rope(None, positions) is None


def test_dynamicvit_equals_timm_blocks_on_the_kept_tokens_with_their_rope(images):
    """Dropping tokens before block 2 equals running timm's own blocks on the kept tokens with their rope rows."""
    model = tpsvit.patch(tiny_eva("eva02"), "dynamicvit", keep_rate=0.5, locations=(2,))
    with torch.no_grad():
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.5)
        with tpsvit.tracing(model) as trace:
            patched = model(images)
        kept = trace.locations[0].kept
        tpsvit.unpatch(model)
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        for block in model.blocks[:2]:
            x = block(x, rope=rope)
        prefix = model.num_prefix_tokens
        patches = x[:, prefix:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1)
        rope_kept = rope[kept][:, None]  # (B, 1, K, 2D)
        for block in model.blocks[2:]:
            x = block(x, rope=rope_kept)
        reference = model.forward_head(model.norm(x))
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["dinov3", "rope_mixed"])
@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_masked_path_equals_gather_path(variant, method, images):
    model = tpsvit.patch(tiny_eva(variant), method, keep_rate=0.5, locations=(1, 3))
    with torch.no_grad():
        for param in model.tps_predictors.parameters():
            param.normal_(0.0, 0.5)
        gather = model(images)
        model._tps_runtime.force_masked = True
        masked = model(images)
    assert tpsvit.forward_state(model).masked
    torch.testing.assert_close(masked, gather, atol=1e-5, rtol=1e-5)
    model._tps_runtime.force_masked = False
    assert all(m.fused_attn for m in (b.attn for b in model.blocks))  # restored after the masked attention


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_training_step_reaches_the_predictors(method, images):
    model = tpsvit.patch(tiny_eva("dinov3"), method, keep_rate=0.5, locations=(1, 3)).train()
    torch.manual_seed(0)
    out = model(images)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.tps_predictors.parameters())
    assert len(tpsvit.forward_state(model).decisions) == 2


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
@pytest.mark.parametrize("method", ALL)
def test_gmacs_match_the_flop_counter(variant, method):
    model = tiny_eva(variant)
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
    _patch(model, method, keep_rate=0.5, locations=(1, 3))
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
    assert tpsvit.gmacs(model) < tpsvit.gmacs(tpsvit.unpatch(model))


@pytest.mark.parametrize("method", ALL)
def test_trace_restore_and_viz(method, images, tmp_path):
    from tpsvit.viz import visualize

    model = tpsvit.patch(tiny_eva("dinov3"), method, keep_rate=0.5, locations=(1, 3))
    with torch.no_grad(), tpsvit.tracing(model) as trace:
        features = model.forward_features(images)
    prefix, grid = tpsvit.restore(features, trace)
    assert prefix.shape == (3, 5, 32) and grid.shape == (3, 64, 32)
    assert trace.grid_size == (8, 8) and trace.num_prefix == 5
    paths = visualize(model, images[:1], tmp_path, dpi=30)
    assert len(paths) == 1 and paths[0].exists()


def test_real_model_definitions_patch_on_the_meta_device():
    """The registered timm names build and patch (no weights, no forward): DINOv3, EVA-02, PE, RoPE ViT."""
    import timm

    for name in ("vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_small_patch16_rope_224",
                 "vit_small_patch16_rope_mixed_224", "vit_pe_core_small_patch16_384"):
        with torch.device("meta"):
            model = timm.create_model(name)
        for method in ALL:
            tpsvit.patch(model, method, keep_rate=0.7)
        assert 0 < tpsvit.gmacs(model) < tpsvit.gmacs(tpsvit.unpatch(model))
        tpsvit.unpatch(model)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("vit_relpos_small_patch16_224", "VisionTransformerRelPos: .*relative-position bias.*kept positions"),
        ("beit_base_patch16_224", "Beit: .*relative-position bias.*kept positions"),
        ("samvit_base_patch16", "VisionTransformerSAM: .*windows"),
        ("swin_tiny_patch4_window7_224", "SwinTransformer: .*hierarchical"),
        ("swinv2_tiny_window8_256", "SwinTransformerV2: .*hierarchical"),
        ("naflexvit_base_patch16_gap", "NaFlexVit: .*padding mask"),
        ("resnet18", "not a timm VisionTransformer .* nor a timm Eva"),
    ],
)
def test_refused_families_say_why_and_what_is_needed(name, pattern):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(TypeError, match=pattern):
        tpsvit.patch(model, "etps")
    with pytest.raises(TypeError, match=pattern):
        tpsvit.gmacs(model)


def test_post_norm_eva_is_refused():
    with pytest.raises(TypeError, match="use_post_norm"):
        tpsvit.patch(tiny_eva("eva02", use_post_norm=True, scale_mlp=False), "etps")


@pytest.mark.parametrize("method", [None, "etps", "dtps", "tome"])
def test_gmacs_of_an_attention_pool_head_like_perception_encoder(method):
    """PE-style: AttentionRope, rope, pre-transformer norm, attention-pool (map) head over the surviving tokens."""
    model = tiny_eva("dinov3", attn_type="rope", global_pool="map", use_pre_transformer_norm=True, num_reg_tokens=0,
                     attn_pool_num_heads=2)
    if method is not None:
        tpsvit.patch(model, method, keep_rate=0.5, locations=(1, 3))
    assert tpsvit.gmacs(model) == pytest.approx(counted_gmacs(model), rel=0.02)
