"""Speed of token reduction on DeiT-S on this machine: how much of the GMACs cut becomes speed, what TPS's squeeze
costs over plain pruning, and the paper's headline (DeiT-S under TPS at a 35% budget vs the unpatched DeiT-T).

All models (random init: speed does not depend on the weights) are timed in the same process on the same random
input, interleaved round after round (tpsvit.measure.bench.benchmark_interleaved), for each batch size:

* unpatched DeiT-S; etps / evit / dtps / dynamicvit at each keep rate (locations 3, 6, 9);
* DeiT-S under etps at a 35% GMACs budget (keep rate solved at 3, 6, 9) and the unpatched DeiT-T.

Reported: for etps, speed-up over unpatched / GMACs ratio (target >= 95%); the squeeze overhead, i.e. the extra time
of etps over evit and of dtps over dynamicvit at the same schedule, in % of the patched model's time (target <= 3%;
dtps vs dynamicvit is the clean pair: same predictor, same tokens, only the squeeze differs; evit keeps one extra
fused token); and images/s of DeiT-S@35% vs DeiT-T. Defaults are short (about 2-4 minutes on 2 CPU cores).

    python benchmarks/speed.py [--batch-sizes 16 64] [--keep-rates 0.7 0.5] [--runs 1] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch

from tpsvit.io.loading import create_model
from tpsvit.measure.bench import benchmark_interleaved, environment, format_environment
from tpsvit.measure.budget import solve_keep_rate, solve_tome_r
from tpsvit.measure.evaluation import format_table, write_json
from tpsvit.measure.flops import gmacs
from tpsvit.patch import patch

SMALL, TINY = "deit_small_patch16_224", "deit_tiny_patch16_224"
LOCATIONS = (3, 6, 9)
PAIRS = (("etps", "evit"), ("dtps", "dynamicvit"))  # (with squeeze, plain pruning at the same schedule)


def build(keep_rates, budget: float, budget_methods=("etps",)) -> tuple[dict, dict, float]:
    """Models by label, their GMACs, and etps's keep rate solved for the budget (each of ``budget_methods`` gets a
    row at the budget: keep rate solved at 3, 6, 9; ToMe's r in every block)."""
    torch.manual_seed(0)
    base = create_model(SMALL, pretrained=False).eval()
    models = {"DeiT-S unpatched": base}
    for rate in keep_rates:
        for method in ("etps", "evit", "dtps", "dynamicvit"):
            models[f"DeiT-S {method} {rate:g}"] = patch(_clone(base), method, keep_rate=rate, locations=LOCATIONS)
    budget_rate = solve_keep_rate(SMALL, "etps", budget=budget, locations=LOCATIONS)
    for method in dict.fromkeys(["etps", *budget_methods]):  # etps first: the headline row
        if method == "tome":
            model = patch(_clone(base), "tome", r=solve_tome_r(SMALL, budget=budget))
        else:
            rate = solve_keep_rate(SMALL, method, budget=budget, locations=LOCATIONS)
            model = patch(_clone(base), method, keep_rate=rate, locations=LOCATIONS)
        models[f"DeiT-S {method} {budget:.0%} budget"] = model
    models["DeiT-T unpatched"] = create_model(TINY, pretrained=False).eval()
    return models, {label: gmacs(m) for label, m in models.items()}, budget_rate


def _clone(model):
    clone = create_model(SMALL, pretrained=False)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def summarize(results: dict, gmacs_of: dict, keep_rates, budget: float) -> dict:
    """The derived numbers of one batch size."""
    base = results["DeiT-S unpatched"]
    out = {"speedup_of_gmacs_ratio": {}, "squeeze_overhead_pct": {}}
    for rate in keep_rates:
        label = f"DeiT-S etps {rate:g}"
        speedup = results[label]["images_per_s"] / base["images_per_s"]
        ratio = gmacs_of["DeiT-S unpatched"] / gmacs_of[label]
        out["speedup_of_gmacs_ratio"][f"etps {rate:g}"] = {"speedup": speedup, "gmacs_ratio": ratio,
                                                           "fraction": speedup / ratio}
        for squeezing, plain in PAIRS:
            t_sq = results[f"DeiT-S {squeezing} {rate:g}"]["ms_per_batch"]
            t_plain = results[f"DeiT-S {plain} {rate:g}"]["ms_per_batch"]
            out["squeeze_overhead_pct"][f"{squeezing} vs {plain} {rate:g}"] = 100 * (t_sq - t_plain) / t_sq
    headline = results[f"DeiT-S etps {budget:.0%} budget"]
    tiny = results["DeiT-T unpatched"]
    out["headline"] = {"deit_s_tps_budget_images_per_s": headline["images_per_s"],
                       "deit_t_images_per_s": tiny["images_per_s"],
                       "ratio": headline["images_per_s"] / tiny["images_per_s"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--budget", type=float, default=0.35, help="GMACs budget of the headline row (default 0.35)")
    parser.add_argument("--runs", type=int, default=1, help="timed passes per model per round (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--budget-methods", nargs="+", default=["etps"],
                        choices=["etps", "dtps", "evit", "dynamicvit", "tome"],
                        help="methods with a row at the budget (default: etps, the headline)")
    parser.add_argument("--compile", action="store_true",
                        help="time every model under torch.compile(fullgraph=True, dynamic=False) (inductor); the "
                             "compile happens in the warm-up")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, gmacs_of, budget_rate = build(args.keep_rates, args.budget, args.budget_methods)
    if args.compile:
        models = {label: torch.compile(m, fullgraph=True, dynamic=False) for label, m in models.items()}
    env = environment(args.device, args.amp)
    print(format_environment(env) + (", torch.compile (inductor)" if args.compile else ", eager"))
    print(f"{args.runs} timed run(s) x {args.repeats} interleaved rounds per model, {args.warmup} warm-up; "
          f"locations {list(LOCATIONS)}; {args.budget:.0%} budget = etps keep {budget_rate:g}")
    report = {"environment": env, "compiled": args.compile, "locations": list(LOCATIONS), "budget": args.budget,
              "budget_keep_rate": budget_rate, "runs": args.runs, "repeats": args.repeats, "warmup": args.warmup,
              "gmacs": gmacs_of, "batches": []}
    columns = [("label", "model", ""), ("gmacs", "GMACs", ".3f"), ("images_per_s", "images/s", ".1f"),
               ("ms_per_batch", "ms/batch", ".1f"), ("speedup", "speed-up", ".3f")]
    for batch_size in args.batch_sizes:
        results = benchmark_interleaved(models, batch_size=batch_size, device=args.device, runs=args.runs,
                                        warmup=args.warmup, repeats=args.repeats, amp=args.amp)
        ref = results["DeiT-S unpatched"]["images_per_s"]
        rows = [{"label": label, "gmacs": gmacs_of[label], **r, "speedup": r["images_per_s"] / ref}
                for label, r in results.items()]
        derived = summarize(results, gmacs_of, args.keep_rates, args.budget)
        print(f"\nbatch size {batch_size}")
        print(format_table(rows, columns))
        for name, d in derived["speedup_of_gmacs_ratio"].items():
            print(f"  {name}: speed-up {d['speedup']:.3f} / GMACs ratio {d['gmacs_ratio']:.3f} = "
                  f"{d['fraction']:.1%} (target >= 95%)")
        for name, pct in derived["squeeze_overhead_pct"].items():
            print(f"  squeeze overhead {name}: {pct:+.1f}% of the patched model's time (target <= 3%)")
        h = derived["headline"]
        print(f"  headline: DeiT-S etps@{args.budget:.0%} {h['deit_s_tps_budget_images_per_s']:.1f} images/s vs "
              f"DeiT-T {h['deit_t_images_per_s']:.1f} images/s (x{h['ratio']:.2f})")
        report["batches"].append({"batch_size": batch_size, "rows": rows, **derived})
    if args.json:
        write_json(report, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
