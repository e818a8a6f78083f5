"""Throughput (images/s) of the unpatched and patched model, timed in the same run, interleaved.

Random input of the model's size, inference mode, warm-up discarded; one table per batch size with the speed-up
over the unpatched model and how much of the GMACs reduction it turns into speed.
"""

from __future__ import annotations

import argparse

from tpsvit.commands.options import (
    DEFAULT_MODEL,
    add_model_arguments,
    add_threads_argument,
    add_variant_arguments,
    apply_threads,
)

COLUMNS = [
    ("label", "variant", ""),
    ("gmacs", "GMACs", ".3f"),
    ("images_per_s", "images/s", ".1f"),
    ("ms_per_batch", "ms/batch", ".1f"),
    ("speedup", "speed-up", ".3f"),
    ("gmacs_ratio", "GMACs ratio", ".3f"),
    ("speedup_of_gmacs_ratio", "of GMACs ratio", ".1%"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_variant_arguments(parser)
    group = parser.add_argument_group("timing")
    group.add_argument("--batch-size", nargs="+", type=int, default=[64], metavar="N",
                       help="batch size; several values sweep them (default: 64)")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    group.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (default: fp32)")
    group.add_argument("--runs", type=int, default=10, help="timed passes per model per round (default: 10)")
    group.add_argument("--warmup", type=int, default=3, help="untimed passes per model first (default: 3)")
    group.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all models (default: 3)")
    add_threads_argument(group)
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one per batch size)")


def compare_speed(models: dict, gmacs_of: dict, batch_size: int, **timing) -> list[dict]:
    """Time ``models`` interleaved and add GMACs, speed-up over the first model (the unpatched one), the GMACs ratio
    and the speed-up as a fraction of that ratio."""
    from tpsvit.measure.bench import benchmark_interleaved

    results = benchmark_interleaved(models, batch_size=batch_size, **timing)
    labels = list(models)
    ref_speed, ref_gmacs = results[labels[0]]["images_per_s"], gmacs_of[labels[0]]
    rows = []
    for label in labels:
        row = {"label": label, "gmacs": gmacs_of[label], **results[label]}
        row["speedup"] = row["images_per_s"] / ref_speed
        row["gmacs_ratio"] = ref_gmacs / row["gmacs"]
        row["speedup_of_gmacs_ratio"] = row["speedup"] / row["gmacs_ratio"] if row["gmacs_ratio"] != 1 else None
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from tpsvit.commands.flops import load_base_model, make_variant, variants_from_args
    from tpsvit.measure.bench import environment, format_environment
    from tpsvit.measure.evaluation import format_table, write_json
    from tpsvit.measure.flops import gmacs

    apply_threads(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(args)
    variants = variants_from_args(args, base)
    models = {v.label: make_variant(base, v) for v in variants}
    gmacs_of = {label: gmacs(m, args.img_size) for label, m in models.items()}
    env = environment(device, args.amp)
    name = args.model or (args.checkpoint and f"checkpoint {args.checkpoint}") or DEFAULT_MODEL
    print(f"{name} | {format_environment(env)}", flush=True)
    print(f"{args.runs} timed runs x {args.repeats} interleaved rounds per model, {args.warmup} warm-up runs; "
          "speed-up and GMACs ratio relative to the unpatched model", flush=True)
    tables = []
    for batch_size in args.batch_size:
        rows = compare_speed(models, gmacs_of, batch_size, img_size=args.img_size, device=device, runs=args.runs,
                             warmup=args.warmup, repeats=args.repeats, amp=args.amp,
                             progress=not args.no_progress, desc=f"batch size {batch_size}")
        print(f"\nbatch size {batch_size}", flush=True)
        print(format_table(rows, COLUMNS), flush=True)
        tables.append({"batch_size": batch_size, "rows": rows})
    if args.json:
        write_json({"model": name, "environment": env, "variants": [v.as_dict() for v in variants],
                    "runs": args.runs, "repeats": args.repeats, "warmup": args.warmup, "results": tables}, args.json)
        print(f"saved {args.json}")
    return 0
