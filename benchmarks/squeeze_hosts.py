"""Where do pruned tokens go? A census per method and budget on the cluttered testbeds, and (``--diagnose``) what the
squeeze looks like inside a model before and after fine-tuning.

Every patch token of a training image is a garment token (the garment touches its 8x8 cell), a clutter token (only
clutter does) or an empty one, from the generator's own layers (the garment composed alone from the same draws,
:func:`tpsvit.data.cluttered.token_kinds`); EViT's extra token is "fused". For each method at a GMACs budget (blocks
3/6/9 with the solved keep rate; ToMe: r in every block), every token removed at any location is counted by its own
kind and by where it went: into a garment / clutter / empty host (the host's own grid cell), into EViT's fused token,
or dropped (DynamicViT). Learned methods need predictors: the shipped fine-tuned checkpoints (cluttered testbed) or
``--checkpoint-for dtps=FILE``; their keep rate is set to the budget's.

    python benchmarks/squeeze_hosts.py [--data fashion-mnist-cluttered] [--budgets 0.5 0.35] [--images 2048]
        [--json PATH]
    python benchmarks/squeeze_hosts.py --diagnose etps=BASE etps=runs/x/etps-50-seed0/final.safetensors ...

Training images only (composed with a fixed seed), never the test set. 1 thread by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch

import tpsvit
from tpsvit.data.cluttered import ClutterSpec, token_kinds
from tpsvit.data.datasets import FashionMNIST, embedded_dataset, normalize_uint8
from tpsvit.io.assets import DEMO_MODELS, demo_checkpoint
from tpsvit.io.loading import load_model
from tpsvit.measure.budget import plan_variants

sys.path.insert(0, str(Path(__file__).parent))
from squeeze_internals import diagnose, format_diagnosis  # noqa: E402

KINDS = ("garment", "clutter", "empty", "fused")  # what a removed token is (fused: EViT's extra token)
DESTINATIONS = ("garment", "clutter", "empty", "fused", "dropped")  # where it went
METHODS = ("etps", "evit", "dtps", "dynamicvit", "tome")
SEED = 31337  # training images, composed once with this seed
DATA = ("fashion-mnist-cluttered", "fashion-mnist-textures")


def clutter_spec(data: str) -> ClutterSpec:
    """The generator of a testbed by its dataset name."""
    if data not in DATA:
        raise SystemExit(f"--data {data!r}; allowed: {', '.join(DATA)}")
    return embedded_dataset(data).default_spec()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default="fashion-mnist-cluttered", choices=DATA, help="the testbed (its shipped base model)"
    )
    p.add_argument("--checkpoint", help="the unpatched base model (default: the shipped one for --data)")
    p.add_argument(
        "--checkpoint-for",
        nargs="*",
        default=[],
        metavar="METHOD=FILE",
        help="fine-tuned checkpoints of learned methods (default: the shipped ones, where there are)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35], help="fractions of the unpatched GMACs")
    p.add_argument("--images", type=int, default=2048, help="training images (the first ones, at most 4096)")
    p.add_argument(
        "--diagnose",
        nargs="*",
        metavar="LABEL=FILE",
        help="squeeze internals of these models instead of the census (FILE: a checkpoint of a patched "
        "model; shelf:FILE: the base model patched as FILE is)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="save the results here")
    return p.parse_args(argv)


def _checkpoints(args) -> dict[str, str]:
    given = dict(item.split("=", 1) for item in args.checkpoint_for)
    shipped = DEMO_MODELS.get(args.data)
    for method in ("dtps", "dynamicvit"):
        if method not in given and shipped is not None and method in shipped.finetuned:
            given[method] = str(demo_checkpoint(method, args.data))
    return given


def census(model, images: torch.Tensor, kinds: torch.Tensor, batch: int = 256) -> dict:
    """Count every removed token of ``model`` on ``images`` by its own kind and destination, per location and in all.

    kinds (B, N) 0/1/2 per grid cell (garment / clutter / empty). Returns the counts (nested lists, KINDS x
    DESTINATIONS) per location and summed, plus the tokens of each kind entering the first location.
    """
    per_location: dict[int, torch.Tensor] = {}
    entering = torch.zeros(len(KINDS), dtype=torch.long)
    with torch.inference_mode(), tpsvit.tracing(model) as trace:
        for start in range(0, len(images), batch):
            model(normalize_uint8(images[start : start + batch]))
            grid = kinds[start : start + batch]
            for i, step in enumerate(trace.locations):
                own = torch.where(step.positions >= 0, grid.gather(1, step.positions.clamp_min(0)), 3)
                out_pos = step.positions.gather(1, step.kept)
                fused_slot = torch.full((own.shape[0], step.num_out - out_pos.shape[1]), 3, dtype=own.dtype)
                out_kind = torch.cat(
                    [torch.where(out_pos >= 0, grid.gather(1, out_pos.clamp_min(0)), 3), fused_slot], dim=1
                )
                pruned_kind = own.gather(1, step.pruned)
                dest = torch.where(step.host >= 0, out_kind.gather(1, step.host.clamp_min(0)), 4)
                counts = torch.bincount((pruned_kind * 5 + dest).flatten(), minlength=20).reshape(4, 5)
                per_location[step.block] = per_location.get(step.block, 0) + counts
                if i == 0:
                    entering += torch.bincount(own.flatten(), minlength=4)
    total = sum(per_location.values())
    return {
        "entering_first_location": entering.tolist(),
        "total": total.tolist(),
        "per_location": {str(b): c.tolist() for b, c in sorted(per_location.items())},
    }


def shares(counts) -> dict:
    """Per removed kind: how many per image were removed and the share of each destination."""
    out = {}
    for k, row in zip(KINDS, counts, strict=True):
        n = sum(row)
        if n:
            out[k] = {"removed": n, "to": {d: c / n for d, c in zip(DESTINATIONS, row, strict=True) if c}}
    return out


def run_census(args) -> dict:
    base = load_model(checkpoint=args.checkpoint).eval()
    spec = clutter_spec(args.data)
    images, kinds = token_kinds(FashionMNIST(train=True).images, SEED, spec, args.images)
    tuned = _checkpoints(args)
    report = {
        "data": args.data,
        "images": args.images,
        "seed": SEED,
        "checkpoint": args.checkpoint,
        "learned_checkpoints": tuned,
        "kinds_per_image": torch.bincount(kinds.flatten(), minlength=3).div(args.images).tolist(),
        "budgets": {},
    }
    for budget in args.budgets:
        rows = report["budgets"].setdefault(f"{budget:.0%}", {})
        for variant in plan_variants(base, args.methods, keep_rates=(), budget=budget, unpatched=False):
            if variant.method in ("dtps", "dynamicvit"):
                if variant.method not in tuned:
                    print(f"skip {variant.method}: no fine-tuned checkpoint (--checkpoint-for)", file=sys.stderr)
                    continue
                model = load_model(checkpoint=tuned[variant.method]).eval()
                tpsvit.set_keep_rate(model, variant.keep_rate)
            else:
                model = variant.apply(copy.deepcopy(base))
            counts = census(model, images, kinds)
            rows[variant.method] = {
                "amount": variant.amount,
                "gmacs": tpsvit.gmacs(model),
                **counts,
                "shares": shares(counts["total"]),
            }
            print(f"{variant.label}: {format_shares(rows[variant.method]['shares'], args.images)}", flush=True)
    return report


def format_shares(table: dict, images: int) -> str:
    return "; ".join(
        f"{k} {v['removed'] / images:.1f}/img -> " + ", ".join(f"{d} {s:.0%}" for d, s in v["to"].items())
        for k, v in table.items()
    )


def format_census(report: dict) -> str:
    """One markdown table: per budget and method, the share of removed clutter / garment tokens by destination."""
    lines = [
        f"Removed tokens by destination, {report['data']}, first {report['images']} training images "
        f"(seed {report['seed']}); tokens per image: garment {report['kinds_per_image'][0]:.1f}, clutter "
        f"{report['kinds_per_image'][1]:.1f}, empty {report['kinds_per_image'][2]:.1f}",
        "",
        "| budget | method | GMACs | removed | per image | -> garment | -> clutter | -> empty | -> fused | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for budget, rows in report["budgets"].items():
        for method, row in rows.items():
            for kind in ("clutter", "garment", "empty"):
                entry = row["shares"].get(kind)
                if entry is None:
                    continue
                cells = [f"{entry['to'].get(d, 0):.1%}" for d in DESTINATIONS]
                lines.append(
                    f"| {budget} | {method} ({row['amount']}) | {row['gmacs']:.4f} | {kind} | "
                    f"{entry['removed'] / report['images']:.1f} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.checkpoint = args.checkpoint or str(demo_checkpoint(None, args.data))
    if args.diagnose is not None:
        report = diagnose(args, clutter_spec(args.data), SEED)
        text = format_diagnosis(report)
    else:
        report = run_census(args)
        text = format_census(report)
    report.update(
        command=" ".join(["python", *sys.argv]),
        machine=platform.machine(),
        threads=args.threads,
        torch=torch.__version__,
    )
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"saved {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
