"""The squeeze inside a model (``benchmarks/squeeze_hosts.py --diagnose``): at every location of a patched model, on
training images, for the output tokens that took pruned tokens in (TPS hosts, EViT's fused token) against the kept
tokens that took nothing:

* norms before and after the LayerNorm the tokens meet next (norm2 of the same block for methods inside the block,
  norm1 for methods before it), and a host's norm after the squeeze over its own norm before it;
* the squeeze's weights: each host's self weight e / (e + sum exp(c)), donors per host, donors' cosine to their host;
* the class attention the next block pays them (mass per token, relative to the kept tokens that took nothing);
* the kinds of the donors and hosts (garment / clutter / empty cells).

A model is ``LABEL=FILE`` (a checkpoint of a patched model, e.g. a fine-tune's final.safetensors) or
``LABEL=shelf:FILE`` (the base model patched as FILE is: the off-the-shelf counterpart of a fine-tune).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import tpsvit
from tpsvit.data.cluttered import token_kinds
from tpsvit.data.datasets import FashionMNIST, normalize_uint8
from tpsvit.io.loading import load_model

QUANTILES = (0.1, 0.5, 0.9)


def load_diagnosed(spec: str, base_path: str):
    """A patched model from ``FILE`` or ``shelf:FILE`` (see the module docstring)."""
    if spec.startswith("shelf:"):
        tuned = load_model(checkpoint=spec[len("shelf:") :])
        cfg = tuned.tps
        if cfg.spec.learned:
            return tuned.eval()  # a learned method has no off-the-shelf form: the checkpoint's own predictors
        kwargs = dict(
            method=cfg.method, locations=cfg.locations, temperature=cfg.temperature, fuse=cfg.fuse, scorer=cfg.scorer
        )
        if cfg.r is not None:
            kwargs.update(r=list(cfg.r), keep_rate=1.0)
        else:
            kwargs.update(keep_rate=list(cfg.keep_rate))
        return tpsvit.patch(load_model(checkpoint=base_path), **kwargs).eval()
    return load_model(checkpoint=spec).eval()


def _gather(x, index):
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _Sums:
    """Running sums and value lists per key."""

    def __init__(self):
        self.sums, self.counts, self.values = {}, {}, {}

    def add(self, key, values: torch.Tensor, keep_values: bool = False):
        values = values.detach().float().flatten()
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()
        if keep_values:
            self.values.setdefault(key, []).append(values)

    def result(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        for k, parts in self.values.items():
            v = torch.cat(parts)
            if v.numel():
                out[k + "_quantiles"] = [float(q) for q in torch.quantile(v[:100_000], torch.tensor(QUANTILES))]
        return out


def _location_stats(model, block, x_in, x_out, step, attn_in, grid, acc: _Sums) -> None:
    prefix = model.tps.num_prefix_tokens
    patches_in, patches_out = x_in[:, prefix:].float(), x_out[:, prefix:].float()
    batch, n_out = patches_out.shape[:2]
    host_of = torch.zeros(batch, n_out, dtype=torch.bool)
    squeezed = step.host >= 0
    host_of.scatter_(1, step.host.clamp_min(0), squeezed)
    donors = torch.zeros(batch, n_out).scatter_add(1, step.host.clamp_min(0), squeezed.float())
    plain = ~host_of
    norm = block.norm2 if model.tps.spec.placement == "inside" else block.norm1
    ln = norm(patches_out).norm(dim=-1)
    raw = patches_out.norm(dim=-1)
    acc.add("norm_pre_ln_host", raw[host_of])
    acc.add("norm_pre_ln_plain", raw[plain])
    acc.add("norm_post_ln_host", ln[host_of], True)
    acc.add("norm_post_ln_plain", ln[plain], True)
    acc.add("host_fraction", host_of.float())
    acc.add("donors_per_host", donors[host_of], True)
    k = step.kept.shape[1]
    kept_in = _gather(patches_in, step.kept)
    own = torch.where(host_of[:, :k], raw[:, :k] / kept_in.norm(dim=-1).clamp_min(1e-12), torch.nan)
    acc.add("host_norm_after_over_before", own[host_of[:, :k]], True)
    if model.tps.spec.reducer == "squeeze":
        pruned_in = _gather(patches_in, step.pruned)
        hosts_in = _gather(kept_in, step.host.clamp_min(0))
        cos = F.cosine_similarity(pruned_in, hosts_in, dim=-1)
        acc.add("donor_cos", cos, True)
        denom = torch.full((batch, k), math.e).scatter_add(1, step.host, torch.exp(cos / model.tps.temperature))
        self_weight = math.e / denom
        acc.add("host_self_weight", self_weight[host_of[:, :k]], True)
        acc.add("donor_weight", torch.exp(cos) / denom.gather(1, step.host), True)
    # kinds: donors and hosts by the cell of the token (fused token: none)
    pos_in = step.positions
    own_kind = torch.where(pos_in >= 0, grid.gather(1, pos_in.clamp_min(0)), 3)
    for kind, name in enumerate(("garment", "clutter", "empty")):
        kept_kind = own_kind.gather(1, step.kept) == kind
        acc.add(f"host_is_{name}", kept_kind[host_of[:, :k]].float())
    if attn_in is not None:
        q, kk, _ = attn_in
        logits = (q[:, :, :1] * model.blocks[block._tps_index + 1].attn.scale) @ kk.transpose(-2, -1)
        cls = logits.softmax(dim=-1).mean(dim=1)[:, 0, prefix:]  # (B, n_out)
        mass_host = (cls * host_of).sum(1)
        mass_plain = (cls * plain).sum(1)
        acc.add("cls_mass_on_hosts", mass_host)
        acc.add("cls_mass_on_plain", mass_plain)
        per_host = mass_host / host_of.sum(1).clamp_min(1)
        per_plain = mass_plain / plain.sum(1).clamp_min(1)
        valid = (host_of.sum(1) > 0) & (plain.sum(1) > 0)
        acc.add("cls_attention_per_host_over_per_plain", (per_host / per_plain.clamp_min(1e-12))[valid], True)


def model_internals(model, images: torch.Tensor, kinds: torch.Tensor, batch: int = 256) -> dict:
    """Per location, :class:`_Sums` results of :func:`_location_stats` over ``images``."""
    runtime = model._tps_runtime
    locations = list(model.tps.locations)
    captured: dict = {}
    original = runtime.reduce

    def reduce(block, x, extras):
        out = original(block, x, extras)
        if block._tps_index in locations:
            captured[block._tps_index] = (x.detach(), out.detach())
        return out

    def capture_next(module, args, output):
        index = module._tps_diag_index
        attn = model.blocks[index].attn
        q, k, v = (
            output.detach().reshape(output.shape[0], output.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        )
        captured[("attn", index - 1)] = (attn.q_norm(q), attn.k_norm(k), v)

    hooks = []
    for loc in locations:
        if loc + 1 < len(model.blocks):
            model.blocks[loc + 1].attn.qkv._tps_diag_index = loc + 1
            hooks.append(model.blocks[loc + 1].attn.qkv.register_forward_hook(capture_next))
    runtime.reduce = reduce
    accs = {loc: _Sums() for loc in locations}
    try:
        with torch.inference_mode(), tpsvit.tracing(model) as trace:
            for start in range(0, len(images), batch):
                captured.clear()
                model(normalize_uint8(images[start : start + batch]))
                grid = kinds[start : start + batch]
                for step in trace.locations:
                    x_in, x_out = captured[step.block]
                    _location_stats(
                        model,
                        model.blocks[step.block],
                        x_in,
                        x_out,
                        step,
                        captured.get(("attn", step.block)),
                        grid,
                        accs[step.block],
                    )
    finally:
        del runtime.reduce
        for h in hooks:
            h.remove()
    return {str(loc): acc.result() for loc, acc in accs.items()}


def diagnose(args, spec, seed: int) -> dict:
    images, kinds = token_kinds(FashionMNIST(train=True).images, seed, spec, args.images)
    report = {"data": args.data, "images": args.images, "seed": seed, "models": {}}
    for item in args.diagnose:
        label, path = item.split("=", 1)
        model = load_diagnosed(path, args.checkpoint)
        report["models"][label] = {
            "source": path,
            "method": model.tps.method,
            "keep_rate": list(model.tps.keep_rate or ()),
            "gmacs": tpsvit.gmacs(model),
            "locations": model_internals(copy.deepcopy(model), images, kinds),
        }
        print(f"{label}: done", flush=True)
    return report


ROWS = (
    ("host_fraction", "output tokens that are hosts"),
    ("donors_per_host", "donors per host"),
    ("host_self_weight", "host self weight e/(e+sum)"),
    ("donor_cos", "donor cos to host"),
    ("norm_pre_ln_host", "norm before LN, hosts"),
    ("norm_pre_ln_plain", "norm before LN, other kept"),
    ("host_norm_after_over_before", "host norm after/before squeeze"),
    ("norm_post_ln_host", "norm after LN, hosts"),
    ("norm_post_ln_plain", "norm after LN, other kept"),
    ("cls_mass_on_hosts", "class attention mass on hosts"),
    ("cls_mass_on_plain", "... on other kept"),
    ("cls_attention_per_host_over_per_plain", "class attention per host / per other kept token"),
    ("host_is_garment", "hosts that are garment tokens"),
    ("host_is_clutter", "hosts that are clutter tokens"),
)


def format_diagnosis(report: dict) -> str:
    """A markdown table per location: one column per model."""
    labels = list(report["models"])
    out = []
    blocks = sorted({b for m in report["models"].values() for b in m["locations"]}, key=int)
    for block in blocks:
        out += [
            "",
            f"Block {block} ({report['data']}, first {report['images']} training images)",
            "",
            "| quantity | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for key, name in ROWS:
            cells = []
            for label in labels:
                row = report["models"][label]["locations"].get(block, {})
                cells.append(f"{row[key]:.3f}" if key in row else "")
            if any(cells):
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)
