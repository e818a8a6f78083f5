"""Training memory: bytes saved for backward per image, unpatched vs dTPS vs DynamicViT, with and without gradient
checkpointing, measured on CPU (no GPU needed; the count is the same on a GPU for the same dtype).

For each model, one training forward (train mode: the learned methods run their full-length masked path with
Gumbel decisions) and the loss (cross-entropy, plus the keep-ratio loss for the learned methods) run under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for the backward pass; their
storages are counted once each, parameters excluded. With ``--grad-checkpointing`` (tpsvit.train's
enable_grad_checkpointing, every block, patched ones too) what is kept is each block's input; the backward pass then
recomputes one block at a time, which adds about one block's share on top (the "+1 block" column).
Per image = (bytes at the larger batch - bytes at the smaller) / the difference in batch size, so constant costs
(autocast's weight copies) drop out. Multiply by the per-device batch for the activation memory of a GPU step.

    python benchmarks/train_memory.py [--model deit_small_patch16_224] [--batch-sizes 1 2] [--amp bf16|none]
                                      [--keep-rate 0.7] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

import tpsvit
from tpsvit.io.loading import create_model
from tpsvit.measure.bench import environment, format_environment
from tpsvit.measure.evaluation import format_table, write_json
from tpsvit.train.losses import keep_ratio_loss
from tpsvit.train.modeling import enable_grad_checkpointing

MIB = 2**20
LOCATIONS = (3, 6, 9)


def saved_bytes(model: torch.nn.Module, batch: int, img_size: int, amp: torch.dtype | None) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one training forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return tensor

    in_chans = model.patch_embed.proj.in_channels
    torch.manual_seed(0)
    x = torch.randn(batch, in_chans, img_size, img_size)
    y = torch.randint(0, model.num_classes, (batch,))
    cast = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if tpsvit.is_patched(model) and tpsvit.forward_state(model).decisions:
            loss = loss + keep_ratio_loss(tpsvit.forward_state(model).decisions, model.tps.keep_rate)
    del loss, logits
    return sum(seen.values())


def build(name: str, method: str, keep_rate: float, checkpointed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, pretrained=False)
    if method != "unpatched":
        tpsvit.patch(model, method, keep_rate=keep_rate, locations=LOCATIONS)
    if checkpointed:
        enable_grad_checkpointing(model)
    return model


def measure(name: str, methods, keep_rate: float, batch_sizes, amp) -> list[dict]:
    small, large = batch_sizes
    rows = []
    for method in methods:
        for checkpointed in (False, True):
            model = build(name, method, keep_rate, checkpointed)
            img_size = model.patch_embed.img_size[0]
            low = saved_bytes(model, small, img_size, amp)
            high = saved_bytes(model, large, img_size, amp)
            per_image = (high - low) / (large - small)
            rows.append({"method": method, "grad_checkpointing": checkpointed, "per_image_bytes": per_image,
                         "per_image_mib": per_image / MIB, f"batch_{large}_mib": high / MIB})
    for row in rows:  # checkpointed: + one block's recomputation during backward (the plain run's per-block share)
        if row["grad_checkpointing"]:
            plain = next(r for r in rows if r["method"] == row["method"] and not r["grad_checkpointing"])
            depth = len(build(name, "unpatched", keep_rate, False).blocks)
            row["peak_per_image_mib"] = row["per_image_mib"] + plain["per_image_mib"] / depth
        else:
            row["peak_per_image_mib"] = row["per_image_mib"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm name (random init)")
    parser.add_argument("--methods", nargs="+", default=["unpatched", "dtps", "dynamicvit"])
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 2], metavar=("SMALL", "LARGE"))
    parser.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="autocast dtype of the forward")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.batch_sizes[1] <= args.batch_sizes[0]:
        parser.error("--batch-sizes: the second must be larger than the first")
    torch.set_num_threads(1)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    env = environment("cpu", args.amp if amp is not None else None)
    rows = measure(args.model, args.methods, args.keep_rate, args.batch_sizes, amp)
    print(f"{args.model}, keep rate {args.keep_rate:g} at {LOCATIONS}, autocast {args.amp}; "
          f"{format_environment(env)}")
    print(format_table(rows, [("method", "method", ""), ("grad_checkpointing", "checkpointing", ""),
                              ("per_image_mib", "saved MiB/image", ".1f"),
                              ("peak_per_image_mib", "+1 block MiB/image", ".1f"),
                              (f"batch_{args.batch_sizes[1]}_mib", f"MiB at batch {args.batch_sizes[1]}", ".1f")]))
    for row in rows:
        if not row["grad_checkpointing"]:
            gib = row["per_image_bytes"] * 1024 / 2**30
            print(f"{row['method']}: {gib:.0f} GiB of saved activations at 1024 images per device", file=sys.stderr)
    if args.json:
        write_json({"model": args.model, "keep_rate": args.keep_rate, "locations": list(LOCATIONS),
                    "amp": args.amp, "batch_sizes": args.batch_sizes, "environment": env, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
