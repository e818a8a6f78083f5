"""Analytic GMACs of a ViT (timm or Hugging Face), patched or not, from the tokens each block really sees; and a
flop-counter check.

What is counted (multiply-accumulates per image, the convention of the token-reduction literature):

* the patch embedding (a convolution over every patch) and the classifier head(s) on the pooled token; an
  attention-pool head (``global_pool='map'``: SigLIP, Perception Encoder) on the tokens leaving the last block;
* per block: the attention's linear layers (qkv, proj) on the tokens attention sees, the two attention products
  (``q @ k^T`` and ``attn @ v``, N^2 x heads x head_dim each) and the MLP's linear layers on the tokens the MLP sees;
* per reduction step: the scorer (the class-token attention row ``q_cls @ K^T``: N x heads x head_dim; the
  class-free ``attention_received`` scorer: every query's row, N^2 x heads x head_dim; the learned
  predictor's linear layers on every patch token; ToMe's bipartite matching: ceil(t/2) x floor(t/2) x head_dim over
  all t tokens, prefix included) and TPS's squeeze similarity (pruned x reserved x C).

Elementwise work (norms, softmax, GELU, residual adds, the squeeze/EViT/ToMe weighted sums) is not counted, as in the
papers and as :class:`torch.utils.flop_counter.FlopCounterMode` does not count it either: the analytic matmul terms
are the ones that counter sees, so the two agree (see :func:`counted_gmacs`). Prefix tokens count as tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tpsvit.core.config import TPSConfig
from tpsvit.core.methods import keep_count, tome_merge_count
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError


@dataclass(frozen=True)
class ViTShape:
    """What the MAC count needs to know about a timm VisionTransformer (read by :func:`vit_shape`).

    Per-token costs are in MACs; ``embed_macs`` and ``head_macs`` are per image.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    num_prefix_tokens: int
    num_patches: int
    embed_macs: int
    attn_linear_macs: tuple[int, ...]  # per block: qkv + proj, per token
    mlp_macs: tuple[int, ...]  # per block: MLP linears, per token
    head_macs: int
    predictor_macs: int  # the dTPS / DynamicViT keep predictor, per patch token
    pool_token_macs: int = 0  # attention-pool head (global_pool='map'): kv projection + its two products, per token
    pool_fixed_macs: int = 0  # attention-pool head: latent query projection, output projection and MLP, per image

    @property
    def attn_dim(self) -> int:
        """Width of q, k and v summed over heads."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class BlockMACs:
    """MACs of one block for one image, by part (see the module docstring for what each part covers)."""

    block: int
    tokens_attn: int  # tokens attention sees, prefix included
    tokens_mlp: int  # tokens the MLP sees, prefix included
    linear: int
    attention: int
    mlp: int
    scorer: int
    squeeze: int

    @property
    def total(self) -> int:
        """All MACs of this block."""
        return self.linear + self.attention + self.mlp + self.scorer + self.squeeze

    def as_dict(self) -> dict:
        """Plain data, with the total, for JSON and tables."""
        return {**asdict(self), "total": self.total}


def _linear_macs(module: nn.Module | None) -> int:
    """Per-token MACs of every ``nn.Linear`` inside ``module`` (registered submodules only)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _img_hw(img_size) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    try:
        h, w = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"img_size must be an int or (height, width), got {img_size!r}") from None
    return h, w


def vit_shape(model: nn.Module, img_size=None) -> ViTShape:
    """Read the shape of a model tpsvit can patch (works on the ``meta`` device: no forward pass).

    ``img_size`` (int or (H, W)) overrides the model's input size; default: the size the model was built for.
    """
    from tpsvit.families import family_of

    family = family_of(model)  # a supported family, else an error saying why
    heads, pool = family.head_parts(model)
    pool_token_macs, pool_fixed_macs = _pool_macs(pool)
    proj = family.patch_projection(model)
    if not isinstance(proj, nn.Conv2d):
        raise UnsupportedModelError("GMACs are modelled for a convolutional patch embedding (no hybrid backbones)")
    if img_size is None:
        built_for = family.input_size(model)
        if built_for is None:
            raise InvalidArgumentError(f"cannot tell the input size of {type(model).__name__}; pass img_size")
        img_size = built_for[1:]
    h, w = _img_hw(img_size)
    ph, pw = proj.stride
    if h < ph or w < pw:
        raise InvalidArgumentError(f"img_size {(h, w)} is smaller than one {ph}x{pw} patch")
    num_patches = ((h - proj.kernel_size[0]) // ph + 1) * ((w - proj.kernel_size[1]) // pw + 1)
    kernel = proj.in_channels // proj.groups * proj.kernel_size[0] * proj.kernel_size[1]
    blocks = family.blocks(model)
    num_heads, head_dim = family.attention_shape(blocks[0])
    parts = [family.block_parts(b) for b in blocks]
    dim = family.embed_dim(model)
    half, quarter = dim // 2, dim // 4
    return ViTShape(
        depth=len(blocks),
        embed_dim=dim,
        num_heads=num_heads,
        head_dim=head_dim,
        num_prefix_tokens=family.num_prefix_tokens(model),
        num_patches=num_patches,
        embed_macs=num_patches * kernel * proj.out_channels,
        attn_linear_macs=tuple(_linear_macs(attn) for attn, _ in parts),
        mlp_macs=tuple(sum(_linear_macs(m) for m in mlp) for _, mlp in parts),
        head_macs=sum(_linear_macs(h) for h in heads),
        predictor_macs=dim * dim + dim * half + half * quarter + quarter * 2,
        pool_token_macs=pool_token_macs,
        pool_fixed_macs=pool_fixed_macs,
    )


def _pool_macs(pool: nn.Module | None) -> tuple[int, int]:
    """(per token, per image) MACs of an attention-pool head: timm's ``AttentionPoolLatent`` or a latent probe over
    ``nn.MultiheadAttention`` (transformers' SigLIP head)."""
    if pool is None:
        return 0, 0
    if hasattr(pool, "kv") and getattr(pool, "pos_embed", None) is None:  # timm AttentionPoolLatent
        latent = int(pool.latent_len)
        per_token = _linear_macs(pool.kv) + 2 * latent * int(pool.kv.in_features)
        return per_token, latent * (_linear_macs(pool.q) + _linear_macs(pool.proj) + _linear_macs(pool.mlp))
    attention, probe = getattr(pool, "attention", None), getattr(pool, "probe", None)
    if isinstance(attention, nn.MultiheadAttention) and probe is not None and attention._qkv_same_embed_dim:
        latent, dim = int(probe.shape[1]), int(attention.embed_dim)
        # in_proj is a parameter, not a Linear: k and v for every token, q for the latent; out_proj and the MLP
        # (the Linear layers inside the head) run on the latent only
        return 2 * dim * dim + 2 * latent * dim, latent * (dim * dim + _linear_macs(pool))
    raise UnsupportedModelError(f"GMACs of this attention-pool head ({type(pool).__name__}) are not modelled")


def block_macs(shape: ViTShape, config: TPSConfig | None = None) -> list[BlockMACs]:
    """Per-block MACs of one image for a model of ``shape`` under ``config`` (None: unpatched).

    Works from the config alone (no model, no forward), so the budget solver can try many schedules.
    """
    if config is not None and config.depth != shape.depth:
        raise InvalidArgumentError(f"config is for {config.depth} blocks but the model has {shape.depth}")
    prefix = shape.num_prefix_tokens
    if config is None:
        schedule = [(shape.num_patches, shape.num_patches)] * shape.depth
    else:
        schedule = config.patch_tokens_per_block(shape.num_patches)
    out, n_prev = [], shape.num_patches
    for block, (n_attn, n_mlp) in enumerate(schedule):
        scorer = squeeze = 0
        reduction = config.reduction_at(block) if config is not None else None
        if reduction is not None:
            n_in = n_prev if config.spec.placement == "before" else n_attn
            scorer, squeeze = _reduction_macs(shape, config, n_in, reduction)
        tokens_attn, tokens_mlp = prefix + n_attn, prefix + n_mlp
        out.append(
            BlockMACs(
                block=block,
                tokens_attn=tokens_attn,
                tokens_mlp=tokens_mlp,
                linear=tokens_attn * shape.attn_linear_macs[block],
                attention=2 * tokens_attn * tokens_attn * shape.attn_dim,
                mlp=tokens_mlp * shape.mlp_macs[block],
                scorer=scorer,
                squeeze=squeeze,
            )
        )
        n_prev = n_mlp
    return out


def _reduction_macs(shape: ViTShape, config: TPSConfig, n: int, reduction: dict) -> tuple[int, int]:
    """(scorer, squeeze) MACs of reducing ``n`` patch tokens at one location; mirrors the runtime's shortcuts."""
    spec = config.spec
    if spec.reducer == "merge":
        r = tome_merge_count(n, **reduction)
        t = shape.num_prefix_tokens + n  # the split alternates over the whole sequence, prefix included
        return (math.ceil(t / 2) * (t // 2) * shape.head_dim if r > 0 else 0), 0
    k = keep_count(n, reduction["keep_rate"])
    if k >= n:
        return 0, 0
    if config.scorer == "random":
        scorer = 0
    elif spec.scorer == "predictor":
        scorer = n * shape.predictor_macs
    elif config.scorer == "attention_received":  # every query's row: one more Q K^T product
        scorer = (shape.num_prefix_tokens + n) ** 2 * shape.attn_dim
    else:  # the class token's attention row over every token the block attends to
        scorer = (shape.num_prefix_tokens + n) * shape.attn_dim
    squeeze = (n - k) * k * shape.embed_dim if spec.reducer == "squeeze" else 0
    return scorer, squeeze


def total_macs(shape: ViTShape, config: TPSConfig | None = None) -> int:
    """MACs of one image: patch embedding + every block + head."""
    blocks = block_macs(shape, config)
    return shape.embed_macs + sum(b.total for b in blocks) + _head_macs(shape, blocks)


def _head_macs(shape: ViTShape, blocks: list[BlockMACs]) -> int:
    """Classifier head(s), plus an attention-pool head over the tokens that leave the last block."""
    return shape.head_macs + shape.pool_fixed_macs + blocks[-1].tokens_mlp * shape.pool_token_macs


def _config_of(model: nn.Module) -> TPSConfig | None:
    from tpsvit.patch import is_patched

    return model.tps if is_patched(model) else None


def gmacs(model: nn.Module, img_size=None) -> float:
    """Analytic multiply-accumulates per image, in G, for the model's current patch (or unpatched).

    Counts the tokens each block sees at inference (``model.tps.patch_tokens_per_block``), see the module
    docstring. Unpatched DeiT-T / S / B at 224px give 1.254 / 4.599 / 17.564 (1.3 / 4.6 / 17.6).
    """
    return total_macs(vit_shape(model, img_size), _config_of(model)) / 1e9


def gmacs_per_block(model: nn.Module, img_size=None) -> dict:
    """The breakdown behind :func:`gmacs`: ``{"embed", "blocks": [BlockMACs.as_dict()...], "head", "total"}`` in MACs
    (``"gmacs"`` in G)."""
    shape = vit_shape(model, img_size)
    blocks = block_macs(shape, _config_of(model))
    head = _head_macs(shape, blocks)
    total = shape.embed_macs + sum(b.total for b in blocks) + head
    return {
        "embed": shape.embed_macs,
        "blocks": [b.as_dict() for b in blocks],
        "head": head,
        "total": total,
        "gmacs": total / 1e9,
    }


# ------------------------------------------------------------------------------------------ flop-counter check


def register_cpu_attention_formula() -> None:
    """Teach ``FlopCounterMode`` the CPU fused-attention kernel (same formula as the CUDA SDPA kernels). Idempotent."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted_gmacs(model: nn.Module, img_size=None, in_chans: int | None = None, batch_size: int = 1) -> float:
    """GMACs per image measured by :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) on random input.

    Runs one eval-mode forward pass of ``batch_size`` images (mode restored afterwards); a cross-check of
    :func:`gmacs`, which it should match within a fraction of a percent.
    """
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_formula()
    from tpsvit.measure.bench import input_size

    chans, h, w = input_size(model, img_size, in_chans)
    reference = next(model.parameters())
    x = torch.randn(batch_size, chans, h, w, device=reference.device, dtype=reference.dtype)
    was_training = model.training
    model.eval()
    # parameters that require grad trip FlopCounterMode's module tracker on an expanded parameter (the latent query
    # of attention-pool heads); nothing is differentiated here, so switch requires_grad off for the count
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in grads:
            param.requires_grad_(False)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for param, flag in grads:
            param.requires_grad_(flag)
    return counter.get_total_flops() / 2 / batch_size / 1e9


BREAKDOWN_PARTS = ("linear", "attention", "mlp", "scorer", "squeeze")


def format_breakdown(breakdown: dict, columns: Sequence[str] = BREAKDOWN_PARTS) -> str:
    """A per-block table of :func:`gmacs_per_block` in MMACs, for the terminal."""
    head = f"{'block':>5} {'tok attn':>8} {'tok mlp':>8} " + " ".join(f"{c:>10}" for c in columns) + f" {'total':>10}"
    lines = [head, f"{'embed':>5} {'':>8} {'':>8} " + " " * (11 * len(columns)) + f"{breakdown['embed'] / 1e6:>10.2f}"]
    for b in breakdown["blocks"]:
        parts = " ".join(f"{b[c] / 1e6:>10.2f}" for c in columns)
        lines.append(f"{b['block']:>5} {b['tokens_attn']:>8} {b['tokens_mlp']:>8} {parts} {b['total'] / 1e6:>10.2f}")
    lines.append(f"{'head':>5} {'':>8} {'':>8} " + " " * (11 * len(columns)) + f"{breakdown['head'] / 1e6:>10.2f}")
    lines.append(f"total {breakdown['gmacs']:.4f} GMACs (MMACs per part)")
    return "\n".join(lines)
