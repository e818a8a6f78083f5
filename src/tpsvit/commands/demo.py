"""TPS on real images in minutes: the shipped Fashion-MNIST mini-DeiT, unpatched vs five methods at three budgets.

Loads the mini-DeiT shipped in tpsvit/assets (trained from scratch by ``tpsvit train``) and, for dtps / dynamicvit,
the shipped short fine-tunes of their predictors. Every method is patched at the paper's locations (3, 6, 9) with the
keep rate that the budget solver picks for each budget (ToMe: its usual r in every block), all evaluated in one pass
over the Fashion-MNIST test set. Prints the table, writes results.csv / results.json, an accuracy-vs-GMACs plot and a
token map of one test image into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from tpsvit.assets import FINETUNED, demo_checkpoint
from tpsvit.bench import environment, format_environment
from tpsvit.budget import Variant, plan_variants
from tpsvit.commands.evaluate import COLUMNS, weights_status
from tpsvit.data import FASHION_MNIST_CLASSES, FashionMNIST
from tpsvit.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs, write_csv, write_json
from tpsvit.flops import gmacs
from tpsvit.loading import checkpoint_metadata, load_model
from tpsvit.methods import METHODS

DEFAULT_BUDGETS = (0.65, 0.5, 0.35)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), metavar="FRACTION",
                        help="fractions of the unpatched GMACs (default: 0.65 0.5 0.35)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to compare (default: all: {' '.join(METHODS)})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate the first N test images only (default: all 10,000)")
    parser.add_argument("--data", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: found)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", metavar="DIR", default="tpsvit-demo", help="output folder (default: ./tpsvit-demo)")
    parser.add_argument("--checkpoint", metavar="FILE", help="a base model other than the shipped one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _models(args) -> tuple[torch.nn.Module, dict, dict[str, torch.nn.Module], dict[str, dict]]:
    base_path = args.checkpoint or demo_checkpoint()
    base = load_model(checkpoint=base_path).eval()
    tuned, tuned_meta = {}, {}
    if args.checkpoint is None:
        for method in FINETUNED:
            if method in args.methods:
                path = demo_checkpoint(method)
                tuned[method] = load_model(checkpoint=path).eval()
                tuned_meta[method] = checkpoint_metadata(path)
    return base, checkpoint_metadata(base_path), tuned, tuned_meta


def _variants(base, methods, budgets) -> list[Variant]:
    variants = [Variant()]
    for budget in budgets:
        variants += plan_variants(base, methods=methods, keep_rates=(), budget=budget, unpatched=False)
    return variants


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    base, base_meta, tuned, tuned_meta = _models(args)
    images, labels = FashionMNIST(root=args.data, train=False, limit=args.limit).tensors()
    variants = _variants(base, args.methods, args.budgets)
    models, rows = {}, []
    for variant in variants:
        source, meta = (tuned[variant.method], tuned_meta[variant.method]) if variant.method in tuned else (
            base, base_meta)
        models[variant.label] = variant.apply(copy.deepcopy(source))
        rows.append({**variant.as_dict(), "name": variant.method or "unpatched", "amount": variant.amount,
                     "gmacs": gmacs(models[variant.label]), "status": weights_status(variant, source, meta)})
    env = environment("cpu", None)
    print(f"tpsvit demo: {base_meta.get('model', 'model')} on Fashion-MNIST test ({len(labels)} images) | "
          f"{format_environment(env)}")
    results = evaluate_many(models, (images, labels), batch_size=args.batch_size, device="cpu",
                            progress=not args.no_progress, desc="demo")
    for row in rows:
        row.update(results[row["label"]])
    print(format_table(rows, COLUMNS))
    print("budget = fraction of the unpatched GMACs; keep rate at blocks 3, 6, 9 (ToMe: r tokens merged in every "
          "block); images/s = forward passes during this evaluation, batch " + str(args.batch_size))

    out = Path(args.out)
    paths = [
        write_csv(rows, out / "results.csv"),
        write_json({"environment": env, "count": len(labels), "base": base_meta, "rows": rows}, out / "results.json"),
        plot_accuracy_vs_gmacs(rows, out / "accuracy_vs_gmacs.png", title="mini-DeiT on Fashion-MNIST"),
    ]
    paths += _token_maps(models, variants, images, labels, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"tpsvit demo: done in {time.perf_counter() - start:.0f} s")
    return 0


def _token_maps(models, variants, images, labels, out: Path) -> list[Path]:
    """One token map of the first test image for each method, at the middle budget."""
    from tpsvit.viz import visualize

    budgets = sorted({v.budget for v in variants if v.budget})
    middle = budgets[len(budgets) // 2] if budgets else None
    paths = []
    for variant in variants:
        if variant.method is not None and variant.budget == middle:
            paths += visualize(models[variant.label], images[:1], out / "token_maps", names=["test_0000"],
                               labels=[int(labels[0])], class_names=FASHION_MNIST_CLASSES)
    return paths
