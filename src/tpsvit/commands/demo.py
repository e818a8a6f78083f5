"""TPS on real images in minutes: a shipped mini-DeiT, unpatched vs five methods at three budgets.

Loads the mini-DeiT shipped in tpsvit/assets for ``--data`` (cluttered Fashion-MNIST by default, plain Fashion-MNIST
on request; each trained from scratch by ``tpsvit train``) and, for dtps / dynamicvit, the shipped short fine-tunes of
their predictors. Every method is patched at the paper's locations (3, 6, 9) with the keep rate that the budget solver
picks for each budget (ToMe: its usual r in every block), all evaluated in one pass over the test set. Prints the
table, writes results.csv / results.json, an accuracy-vs-GMACs plot and token maps of a few test images into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tpsvit.core.methods import METHODS
from tpsvit.errors import InvalidArgumentError
from tpsvit.io.assets import DEFAULT_DATA, DEMO_MODELS, demo_checkpoint

if TYPE_CHECKING:
    import torch

    from tpsvit.measure.budget import Variant

DEFAULT_BUDGETS = (0.65, 0.5, 0.35)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), metavar="FRACTION",
                        help="fractions of the unpatched GMACs (default: 0.65 0.5 0.35)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to compare (default: all: {' '.join(METHODS)})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate the first N test images only (default: all 10,000)")
    parser.add_argument("--data", choices=list(DEMO_MODELS), default=DEFAULT_DATA,
                        help=f"embedded dataset and its shipped models (default: {DEFAULT_DATA})")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: found)")
    parser.add_argument("--scorer", choices=["default", "random"], default="default",
                        help="random: the pruning methods score tokens randomly (robustness study; ToMe unchanged)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    parser.add_argument("--schedule", choices=["fixed", "auto"], default="fixed",
                        help="fixed: keep rate solved at blocks 3/6/9 (ToMe: r in every block); auto: the best of a "
                             "few schedule families at the same GMACs by top-1 on training images (tpsvit.plan)")
    parser.add_argument("--calib-images", type=int, default=1000, metavar="N",
                        help="--schedule auto: the first N training images calibrate (default: 1000)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's; on a small shared CPU, 1 is often faster)")
    parser.add_argument("--out", metavar="DIR", default="tpsvit-demo", help="output folder (default: ./tpsvit-demo)")
    parser.add_argument("--checkpoint", metavar="FILE", help="a base model other than the shipped one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _models(args) -> tuple[torch.nn.Module, dict, dict[str, torch.nn.Module], dict[str, dict]]:
    from tpsvit.io.loading import checkpoint_metadata, load_model

    base_path = args.checkpoint or demo_checkpoint(None, args.data)
    base = load_model(checkpoint=base_path).eval()
    tuned, tuned_meta = {}, {}
    if args.checkpoint is None:
        for method in DEMO_MODELS[args.data].finetuned:
            if method in args.methods:
                path = demo_checkpoint(method, args.data)
                tuned[method] = load_model(checkpoint=path).eval()
                tuned_meta[method] = checkpoint_metadata(path)
    return base, checkpoint_metadata(base_path), tuned, tuned_meta


def _variants(base, methods, budgets, auto: bool = False, tuned=None, calib=None, batch_size=500) -> list[Variant]:
    from tpsvit.commands.evaluate import auto_variant
    from tpsvit.measure.budget import Variant, plan_variants

    variants = [Variant()]
    for budget in budgets:
        fixed = plan_variants(base, methods=methods, keep_rates=(), budget=budget, unpatched=False)
        if auto:
            fixed = [auto_variant((tuned or {}).get(v.method, base), v, budget, calib, f"{len(calib[1])} training "
                                  "images", batch_size)[0] for v in fixed]
        variants += fixed
    return variants


def run(args: argparse.Namespace) -> int:
    import torch

    from tpsvit.commands.evaluate import COLUMNS, weights_status
    from tpsvit.commands.flops import with_scorer
    from tpsvit.data.datasets import embedded_dataset
    from tpsvit.measure.bench import environment, format_environment
    from tpsvit.measure.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs, write_csv, write_json
    from tpsvit.measure.flops import gmacs

    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        untrained = [m for m in args.methods if METHODS[m].learned and m not in DEMO_MODELS[args.data].finetuned]
        if untrained:
            print(f"tpsvit demo: no shipped fine-tune of {', '.join(untrained)} for {args.data}: left out (train one "
                  f"with `tpsvit train --recipe ...-finetune --method METHOD`)", file=sys.stderr)
            args.methods = [m for m in args.methods if m not in untrained]
    base, base_meta, tuned, tuned_meta = _models(args)
    dataset = embedded_dataset(args.data)
    images, labels = dataset(root=args.data_dir, train=False).tensors()
    if args.limit is not None:
        if not 1 <= args.limit <= len(labels):
            raise InvalidArgumentError(f"--limit {args.limit} is outside 1..{len(labels)} (the test images)")
        images, labels = images[: args.limit], labels[: args.limit]
    calib = None
    if args.schedule == "auto":
        if args.calib_images < 1:
            raise InvalidArgumentError(f"--calib-images must be >= 1, got {args.calib_images}")
        calib = dataset(root=args.data_dir, train=True, limit=args.calib_images).tensors()
    variants = _variants(base, args.methods, args.budgets, args.schedule == "auto", tuned, calib, args.batch_size)
    variants = with_scorer(variants, args.scorer)
    models, rows = {}, []
    for variant in variants:
        source, meta = (tuned[variant.method], tuned_meta[variant.method]) if variant.method in tuned else (
            base, base_meta)
        models[variant.label] = variant.apply(copy.deepcopy(source))
        rows.append({**variant.as_dict(), "name": variant.method or "unpatched", "amount": variant.amount,
                     "gmacs": gmacs(models[variant.label]), "status": weights_status(variant, source, meta)})
    env = environment("cpu", None)
    print(f"tpsvit demo: {base_meta.get('model', 'model')} on {args.data} test ({len(labels)} images) | "
          f"{format_environment(env)}")
    results = evaluate_many(models, (images, labels), batch_size=args.batch_size, device="cpu",
                            progress=not args.no_progress, desc="demo")
    for row in rows:
        row.update(results[row["label"]])
    print(format_table(rows, COLUMNS))
    where = ("schedule chosen on training images (tpsvit.plan)" if args.schedule == "auto" else
             "keep rate at blocks 3, 6, 9 (ToMe: r tokens merged in every block)")
    print(f"budget = fraction of the unpatched GMACs; {where}; images/s = forward passes during this evaluation, "
          f"batch {args.batch_size}")

    out = Path(args.out)
    paths = [
        write_csv(rows, out / "results.csv"),
        write_json({"environment": env, "data": args.data, "count": len(labels), "base": base_meta, "rows": rows},
                   out / "results.json"),
        plot_accuracy_vs_gmacs(rows, out / "accuracy_vs_gmacs.png", title=f"mini-DeiT on {args.data}"),
    ]
    paths += _token_maps(models, variants, images, labels, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"tpsvit demo: done in {time.perf_counter() - start:.0f} s")
    return 0


def _token_maps(models, variants, images, labels, out: Path) -> list[Path]:
    """One token map of the first test image for each method, at the middle budget."""
    from tpsvit.data.datasets import FASHION_MNIST_CLASSES
    from tpsvit.viz import visualize

    budgets = sorted({v.budget for v in variants if v.budget})
    middle = budgets[len(budgets) // 2] if budgets else None
    paths = []
    for variant in variants:
        if variant.method is not None and variant.budget == middle:
            paths += visualize(models[variant.label], images[:1], out / "token_maps", names=["test_0000"],
                               labels=[int(labels[0])], class_names=FASHION_MNIST_CLASSES)
    return paths
