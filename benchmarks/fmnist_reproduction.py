"""The paper's central claim at small scale, on real images: TPS vs EViT, DynamicViT and ToMe on Fashion-MNIST.

For every method at each budget (fraction of the unpatched GMACs; keep rate solved at blocks 3/6/9, ToMe: r in every
block) this script evaluates the mini-DeiT off-the-shelf, fine-tunes it with one shared short recipe
(``fmnist-finetune``: distillation from the unpatched model, keep-ratio loss for dtps/dynamicvit, predictors at 100x
the backbone lr), and evaluates it again. Learned methods (dtps, dynamicvit) have no meaningful off-the-shelf number
(their predictors are random) and are reported as such. ``--robustness`` adds the paper's robustness analysis: the
scorer replaced by random scores, squeeze (dtps) vs drop (dynamicvit) at the same placement and schedule, and eTPS
vs EViT, off-the-shelf.

    python benchmarks/fmnist_reproduction.py --checkpoint src/tpsvit/assets/mini_deit_fmnist.safetensors \
        --train-limit 6000 --epochs 1 --json outputs/reproduction.json --plot outputs/reproduction.png

Prints a table; ``--json`` saves every number with the exact configuration, ``--plot`` the accuracy-vs-GMACs curves.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import tpsvit
from tpsvit.budget import plan_variants
from tpsvit.data import FashionMNIST
from tpsvit.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs
from tpsvit.loading import load_model
from tpsvit.methods import METHODS
from tpsvit.train import train

COLUMNS = [("method", "method", ""), ("budget", "budget", ""), ("amount", "keep / r", ""), ("gmacs", "GMACs", ".4g"),
           ("off_the_shelf", "off-the-shelf top-1 %", ".2f"), ("fine_tuned", "fine-tuned top-1 %", ".2f")]

ROBUSTNESS_COLUMNS = [("budget", "budget", ""), ("pair", "scorer", ""), ("squeeze", "squeeze top-1 %", ".2f"),
                      ("prune", "prune top-1 %", ".2f"), ("gain", "gain", "+.2f")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="src/tpsvit/assets/mini_deit_fmnist.safetensors",
                   help="the unpatched base model (tpsvit safetensors)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per run (shared recipe)")
    p.add_argument("--train-limit", type=int, default=6000, help="training images per fine-tune")
    p.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--no-finetune", action="store_true", help="off-the-shelf numbers only")
    p.add_argument("--robustness", action="store_true", help="also the random-scorer robustness analysis")
    p.add_argument("--out", default="runs/reproduction", help="folder for the fine-tuning runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    p.add_argument("--json", help="save the results here")
    p.add_argument("--plot", help="save accuracy-vs-GMACs (fine-tuned) here")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="no runs: merge saved results (e.g. of parallel runs over different methods), print, plot")
    return p.parse_args(argv)


def fine_tune(args, variant, index: int) -> torch.nn.Module:
    """One run of the shared recipe for a variant; returns the fine-tuned model."""
    overrides = {"recipe": "fmnist-finetune", "checkpoint": args.checkpoint, "method": variant.method,
                 "locations": list(variant.locations or range(12)), "epochs": args.epochs,
                 "limit": args.train_limit, "val_limit": 1000, "seed": args.seed, "threads": args.threads,
                 "out": f"{args.out}/{index:02d}-{variant.method}-{variant.budget.split()[0].rstrip('%')}"}
    if variant.r is not None:
        overrides.update(r=variant.r, keep_rate=1.0)
    else:
        overrides.update(keep_rate=variant.keep_rate)
    if not tpsvit.methods.get_method(variant.method).learned:
        overrides["keep_ratio_weight"] = 0.0
    result = train(overrides, command="benchmarks/fmnist_reproduction.py " + " ".join(sys.argv[1:]))
    return result["model"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return merge(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = load_model(checkpoint=args.checkpoint).eval()
    data = FashionMNIST(train=False, limit=args.test_limit).tensors()
    variants = [v for b in args.budgets for v in plan_variants(base, args.methods, keep_rates=(), budget=b,
                                                               unpatched=False)]
    shelf = {"unpatched": base, **{v.label: v.apply(copy.deepcopy(base)) for v in variants}}
    scores = evaluate_many(shelf, data, batch_size=500, progress=False)
    rows = [{"method": "unpatched", "budget": "100%", "amount": "", "gmacs": tpsvit.gmacs(base),
             "off_the_shelf": scores["unpatched"]["top1"], "fine_tuned": None}]
    for i, variant in enumerate(variants):
        learned = tpsvit.methods.get_method(variant.method).learned
        row = {"method": variant.method, "budget": variant.budget.split()[0], "amount": variant.amount,
               "gmacs": tpsvit.gmacs(shelf[variant.label]), "keep_rate": variant.keep_rate, "r": variant.r,
               "off_the_shelf": None if learned else scores[variant.label]["top1"], "fine_tuned": None}
        if not args.no_finetune:
            tuned = fine_tune(args, variant, i).eval()
            row["fine_tuned"] = evaluate_many({"m": tuned}, data, batch_size=500, progress=False)["m"]["top1"]
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    print(format_table(rows, COLUMNS))

    report = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args), "rows": rows}
    if args.robustness:
        report["robustness"] = robustness(base, data, args.budgets)
        print(format_table(report["robustness"], ROBUSTNESS_COLUMNS))
    report["seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and not args.no_finetune:
        plot(rows, args.plot)
    print(f"done in {report['seconds'] / 60:.1f} min")
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Fine-tuned top-1 vs GMACs, one line per method, the unpatched model as a star."""
    points = [{"method": None if r["method"] == "unpatched" else r["method"], "gmacs": r["gmacs"],
               "top1": r["off_the_shelf"] if r["method"] == "unpatched" else r["fine_tuned"]} for r in rows]
    plot_accuracy_vs_gmacs(points, path, title="mini-DeiT on Fashion-MNIST, fine-tuned (one shared short recipe)")


def merge(args) -> int:
    """Print (and plot) the rows of several saved runs as one table; the unpatched row is taken once."""
    reports = [json.loads(Path(p).read_text()) for p in args.from_json]
    rows = [reports[0]["rows"][0]] + [r for rep in reports for r in rep["rows"] if r["method"] != "unpatched"]
    order = {m: i for i, m in enumerate(METHODS)}
    rows[1:] = sorted(rows[1:], key=lambda r: (-float(r["budget"].rstrip("%")), order[r["method"]]))
    print(format_table(rows, COLUMNS))
    for rep in reports:
        if "robustness" in rep:
            print(format_table(rep["robustness"], ROBUSTNESS_COLUMNS))
    if args.plot:
        plot(rows, args.plot)
    return 0


def robustness(base, data, budgets) -> list[dict]:
    """Random scores instead of the scorer: how much accuracy squeezing keeps over plain pruning (off-the-shelf).

    dtps vs dynamicvit: same placement (before the block) and schedule, squeeze vs drop. etps vs evit: the
    class-attention family, squeeze into hosts vs fuse into one token. Each pair shares one solved keep rate.
    """
    torch.manual_seed(0)
    rows = []
    for budget in budgets:
        for squeezer, pruner in (("dtps", "dynamicvit"), ("etps", "evit")):
            rate = plan_variants(base, [squeezer], keep_rates=(), budget=budget, unpatched=False)[0].keep_rate
            models = {name: tpsvit.patch(copy.deepcopy(base), name, keep_rate=rate, scorer="random")
                      for name in (squeezer, pruner)}
            top1 = {name: [] for name in models}
            for seed in range(3):  # random scores: average a few draws
                torch.manual_seed(seed)
                result = evaluate_many(models, data, batch_size=500, progress=False)
                for name in models:
                    top1[name].append(result[name]["top1"])
            mean = {name: sum(v) / len(v) for name, v in top1.items()}
            rows.append({"budget": f"{budget:.0%}", "pair": f"random: {squeezer} vs {pruner} @ keep {rate:g}",
                         "squeeze": mean[squeezer], "prune": mean[pruner], "gain": mean[squeezer] - mean[pruner]})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
