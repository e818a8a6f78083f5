"""Speed of token reduction on a Hugging Face transformers ViT-B/16 against its timm twin (DeiT-B), CPU or GPU.

Does the speed-up that etps / ToMe give a timm model carry over to the same architecture in transformers, where
tpsvit swaps each ``ViTLayer``'s forward for one composed of the layer's own modules, captures q / k with forward
hooks and keeps transformers' (SDPA) attention? Six models, random weights, eval mode, timed in the same process on
the same random input, interleaved (tpsvit.measure.bench.benchmark_interleaved), separately for each batch size:

* ``transformers.ViTForImageClassification(ViTConfig(num_labels=1000))``: ViT-B/16 shapes, default SDPA attention;
  unpatched, ``tpsvit.patch(model, "etps", keep_rate=0.7)`` (default locations 3, 6, 9) and ToMe with the r whose
  analytic GMACs are closest to etps@0.7's (r in every block);
* timm ``deit_base_patch16_224`` (same shapes, pretrained=False) with the same three configurations.

Patched models are deep copies of their family's unpatched model (same weights). Timing: ``--repeats`` rounds; each
round is one benchmark_interleaved call (every model ``--runs`` passes, A B C D E F), so the spread of the per-round
speed-ups is reported alongside the median over rounds.

Reported per row: GMACs (analytic ``tpsvit.gmacs``; the unpatched pair is checked by FlopCounterMode too), images/s,
speed-up over the family's own unpatched model (median over rounds, with the range of the per-round speed-ups),
speed-up / GMACs ratio and HF speed-up / timm speed-up; and the same from each model's fastest pass (least touched
by other load on a shared machine). Targets: at batch 16, the HF speed-up is at least 90% of the GMACs ratio, and
within 5% of the timm speed-up (judged on both estimates).

    python benchmarks/hf_speed.py [--quick] [--batch-sizes 1 16] [--threads 1] [--json benchmarks/results/hf_speed.json]

Needs ``pip install 'tps-vit[hf]'`` (transformers). The full form on one CPU thread takes about 10-12 minutes (ViT-B
at batch 16 is a few seconds per pass); ``--quick`` (1 run x 2 rounds) a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from tpsvit.io.loading import create_model
from tpsvit.measure.bench import benchmark_interleaved, environment, format_environment
from tpsvit.measure.budget import schedule_gmacs
from tpsvit.measure.evaluation import format_table, write_json
from tpsvit.measure.flops import counted_gmacs, gmacs
from tpsvit.patch import patch

TIMM = "deit_base_patch16_224"
FAMILIES = ("HF ViT-B/16", "timm DeiT-B")
KEEP_RATE = 0.7
TARGET_OF_GMACS = 0.90  # HF speed-up >= 90% of the GMACs ratio at the target batch size
TARGET_VS_TIMM = 0.05  # |HF speed-up / timm speed-up - 1| <= 5%
TARGET_BATCH = 16


def import_transformers():
    try:
        import transformers
    except ImportError:
        sys.exit("hf_speed.py needs Hugging Face transformers: pip install 'tps-vit[hf]'")
    return transformers


def matching_tome_r(keep_rate: float) -> tuple[int, float, float]:
    """ToMe's r (every block) whose analytic GMACs on DeiT-B are closest to etps at ``keep_rate`` (default
    locations); and both GMACs. The HF ViT-B/16 has the same shapes, so the same r applies to it."""
    target = schedule_gmacs(TIMM, "etps", keep_rate)
    costs = {r: schedule_gmacs(TIMM, "tome", r=r) for r in range(0, 99)}  # 196 patch tokens: at most 98 per block
    r = min(costs, key=lambda k: abs(costs[k] - target))
    return r, costs[r], target


def build(transformers, keep_rate: float, r: int) -> dict:
    """The six models by (family, method): each family unpatched, etps at ``keep_rate`` and tome at ``r``."""
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    torch.manual_seed(0)
    timm_model = create_model(TIMM, pretrained=False).eval()
    models = {}
    for family, base in zip(FAMILIES, (hf, timm_model)):
        models[(family, "unpatched")] = base
        models[(family, "etps")] = patch(copy.deepcopy(base), "etps", keep_rate=keep_rate).eval()
        models[(family, "tome")] = patch(copy.deepcopy(base), "tome", r=r).eval()
    return models


def analytic_gmacs(models: dict) -> dict:
    """``tpsvit.gmacs`` of every model."""
    return {key: gmacs(model, img_size=224) for key, model in models.items()}


def check_unpatched(models: dict, own: dict) -> dict:
    """Counted (FlopCounterMode) GMACs of the two unpatched models, and whether HF matches timm within 0.1%."""
    counted = {family: counted_gmacs(models[(family, "unpatched")], img_size=224, in_chans=3) for family in FAMILIES}
    hf, tm = counted[FAMILIES[0]], counted[FAMILIES[1]]
    analytic_hf, analytic_timm = own[(FAMILIES[0], "unpatched")], own[(FAMILIES[1], "unpatched")]
    match = abs(hf / tm - 1) < 1e-3 and abs(analytic_hf / analytic_timm - 1) < 1e-3
    return {"counted": counted, "analytic_timm": analytic_timm, "analytic_hf": analytic_hf, "match": match}


def time_rounds(models: dict, batch_size: int, runs: int, warmup: int, repeats: int, device, amp) -> dict:
    """Per model: (median, fastest) ms per batch of each round's ``runs`` passes; one benchmark_interleaved call per
    round, the warm-up in the first only."""
    labels = {f"{family} {method}": (family, method) for family, method in models}
    named = {label: models[key] for label, key in labels.items()}
    rounds = {key: [] for key in models}
    for i in range(repeats):
        results = benchmark_interleaved(named, batch_size=batch_size, img_size=224, in_chans=3, device=device,
                                        runs=runs, warmup=warmup if i == 0 else 0, repeats=1, amp=amp,
                                        progress=True, desc=f"batch {batch_size} round {i + 1}/{repeats}")
        for label, key in labels.items():
            rounds[key].append((results[label]["ms_per_batch"], results[label]["ms_per_batch_min"]))
    return rounds


def summarize(rounds: dict, own: dict, batch_size: int) -> list[dict]:
    rows = []
    for (family, method), pairs in rounds.items():
        times, fastest = [t for t, _ in pairs], [f for _, f in pairs]
        base = [t for t, _ in rounds[(family, "unpatched")]]
        base_fastest = min(f for _, f in rounds[(family, "unpatched")])
        per_round = [b / t for b, t in zip(base, times)]  # speed-up in each round (same round, same load)
        ms = statistics.median(times)
        speedup = statistics.median(base) / ms
        best = base_fastest / min(fastest)  # fastest pass over fastest pass: least touched by other load
        ratio = own[(family, "unpatched")] / own[(family, method)]
        rows.append({
            "family": family, "method": method, "batch_size": batch_size, "gmacs": own[(family, method)],
            "images_per_s": batch_size / ms * 1e3, "ms_per_batch": ms, "ms_per_round": times,
            "ms_per_batch_min": min(fastest), "speedup": speedup, "speedup_min": min(per_round),
            "speedup_max": max(per_round), "speedup_per_round": per_round, "speedup_best": best,
            "gmacs_ratio": ratio, "speedup_of_gmacs_ratio": speedup / ratio if method != "unpatched" else None,
            "speedup_best_of_gmacs_ratio": best / ratio if method != "unpatched" else None,
        })
    by_key = {(r["family"], r["method"]): r for r in rows}
    for row in rows:
        twin = by_key[(FAMILIES[1], row["method"])]
        paired = row["family"] == FAMILIES[0] and row["method"] != "unpatched"
        row["hf_vs_timm"] = row["speedup"] / twin["speedup"] if paired else None
        row["hf_vs_timm_best"] = row["speedup_best"] / twin["speedup_best"] if paired else None
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The two targets for each patched HF row, judged on the median speed-up and on the fastest-pass one."""
    out = []
    for row in rows:
        if row["family"] != FAMILIES[0] or row["method"] == "unpatched":
            continue
        for suffix, how in (("", "median"), ("_best", "fastest pass")):
            if row["batch_size"] == TARGET_BATCH:
                value = row[f"speedup{suffix}"] / row["gmacs_ratio"]
                out.append({"target": f"HF {row['method']} speed-up ({how}) >= {TARGET_OF_GMACS:.0%} of the GMACs "
                                      "ratio", "value": value, "met": value >= TARGET_OF_GMACS})
            value = row[f"hf_vs_timm{suffix}"]
            out.append({"target": f"HF {row['method']} speed-up ({how}) within {TARGET_VS_TIMM:.0%} of timm's",
                        "value": value, "met": abs(value - 1) <= TARGET_VS_TIMM})
    return out


def git_state() -> str:
    """The commit the library was measured at (``-dirty``: with uncommitted changes), or "" outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--keep-rate", type=float, default=KEEP_RATE, help="etps keep rate (default 0.7)")
    parser.add_argument("--runs", type=int,
                        help="timed passes per model per round (default: 4 at batch 1-3, 2 at 4-7, else 1)")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 run x 2 rounds per batch size")
    parser.add_argument("--json", metavar="PATH", help="save the table and settings as JSON")
    args = parser.parse_args(argv)
    transformers = import_transformers()
    if args.quick:
        args.runs, args.repeats = 1, 2
    torch.set_num_threads(args.threads)
    env = environment(args.device, args.amp)
    env["transformers"] = transformers.__version__
    env["git"] = git_state()
    print(format_environment(env) + f", transformers {env['transformers']}")
    r, tome_gmacs, etps_gmacs = matching_tome_r(args.keep_rate)
    print(f"etps keep {args.keep_rate:g} at blocks 3, 6, 9: {etps_gmacs:.3f} GMACs; closest ToMe: r={r} in every "
          f"block, {tome_gmacs:.3f} GMACs")
    models = build(transformers, args.keep_rate, r)
    attn = models[(FAMILIES[0], "unpatched")].config._attn_implementation
    own = analytic_gmacs(models)
    check = check_unpatched(models, own)
    counted = check["counted"]
    print(f"unpatched GMACs: {FAMILIES[0]} counted {counted[FAMILIES[0]]:.3f}, analytic {check['analytic_hf']:.3f}; "
          f"{FAMILIES[1]} counted "
          f"{counted[FAMILIES[1]]:.3f}, analytic {check['analytic_timm']:.3f} -> "
          + ("same model cost" if check["match"] else "MISMATCH: the comparison is not like for like"))
    print(f"HF attention implementation: {attn}")
    report = {"environment": env, "timm_model": TIMM, "hf_config": "ViTConfig(num_labels=1000)",
              "hf_attn_implementation": attn, "keep_rate": args.keep_rate, "locations": [3, 6, 9], "tome_r": r,
              "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick, "gmacs_check": check,
              "batches": []}
    columns = [("family", "family", ""), ("method", "method", ""), ("gmacs", "GMACs", ".3f"),
               ("images_per_s", "images/s", ".2f"), ("speedup", "speed-up", ".3f"),
               ("spread", "rounds min-max", ""), ("speedup_of_gmacs_ratio", "of GMACs ratio", ".1%"),
               ("hf_vs_timm", "HF/timm", ".3f"), ("speedup_best", "fastest-pass speed-up", ".3f"),
               ("speedup_best_of_gmacs_ratio", "of GMACs ratio", ".1%"), ("hf_vs_timm_best", "HF/timm", ".3f")]
    for batch_size in args.batch_sizes:
        runs = args.runs or (4 if batch_size < 4 else 2 if batch_size < 8 else 1)
        rounds = time_rounds(models, batch_size, runs, args.warmup, args.repeats, args.device, args.amp)
        rows = summarize(rounds, own, batch_size)
        for row in rows:
            row["runs"] = runs
            row["spread"] = (f"{row['speedup_min']:.3f}-{row['speedup_max']:.3f}"
                             if row["method"] != "unpatched" else "-")
        checks = targets(rows)
        print(f"\nbatch size {batch_size}: {runs} run(s) x {args.repeats} interleaved rounds per model, "
              f"{args.warmup} warm-up; speed-up over the family's own unpatched model: median over rounds (and "
              "each round's), and fastest pass over fastest pass")
        print(format_table(rows, columns))
        for c in checks:
            print(f"  target {c['target']}: {c['value']:.3f} -> {'met' if c['met'] else 'NOT met'}")
        report["batches"].append({"batch_size": batch_size, "runs": runs,
                                  "rows": [{k: v for k, v in row.items() if k != "spread"}
                                           for row in rows],
                                  "targets": checks})
    if args.json:
        write_json(report, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
