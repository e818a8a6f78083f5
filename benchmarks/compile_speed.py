"""Speed of what is shipped: eager, torch.compile and onnxruntime, unpatched and under eTPS, on DeiT-S (CPU).

For each batch size, in one process, on the same random input, timed in interleaved rounds (every runner once per
round, round after round, so load drifts hit all alike; the median pass is reported):

* unpatched DeiT-S and DeiT-S under etps at each keep rate (locations 3, 6, 9), random weights, 224 px;
* each of them three ways: eager PyTorch, ``torch.compile(fullgraph=True, dynamic=False)`` (inductor), and its ONNX
  file (``tpsvit.export_onnx``, dynamic batch) in onnxruntime's CPU provider with the same thread count.

Reported per row: images/s, the speed-up over the unpatched model *of the same kind* (compiled vs compiled, ...), the
GMACs ratio (unpatched / patched) and speed-up / GMACs ratio (target >= 90% for compiled and onnxruntime). Compile
and export times are printed too (first call of a compiled model, including its warm-up compile).

    python benchmarks/compile_speed.py [--quick] [--keep-rates 0.7 0.5] [--batch-sizes 1 16] [--threads 1]
                                       [--json benchmarks/results/compile_speed.json]

The full form compiles 3 models x 2 batch sizes with inductor and exports 3 ONNX files: about 10-15 minutes on a
small CPU. ``--quick`` is keep 0.5, batch 16, fewer runs (a few minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tpsvit.io.loading import create_model
from tpsvit.measure.bench import environment, format_environment
from tpsvit.measure.evaluation import format_table, write_json
from tpsvit.measure.flops import gmacs
from tpsvit.patch import patch

MODEL = "deit_small_patch16_224"
LOCATIONS = (3, 6, 9)
KINDS = ("eager", "compiled", "onnxruntime")


def build_models(keep_rates) -> dict:
    """Unpatched DeiT-S and its etps copies (same random weights), eval mode, by label."""
    torch.manual_seed(0)
    base = create_model(MODEL).eval()
    models = {"unpatched": base}
    for rate in keep_rates:
        clone = create_model(MODEL)
        clone.load_state_dict(base.state_dict())
        models[f"etps {rate:g}"] = patch(clone, "etps", keep_rate=rate, locations=LOCATIONS).eval()
    return models


def onnx_runners(models: dict, folder: Path, threads: int) -> tuple[dict, dict]:
    """One ONNX file per model (dynamic batch) and a function running it in onnxruntime; and the export seconds."""
    import onnxruntime as ort

    from tpsvit.io.export import export_onnx

    runners, seconds = {}, {}
    for label, model in models.items():
        path = folder / f"{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        export_onnx(model, path, batch_size=1, dynamic_batch=True, model_name=MODEL)
        seconds[label] = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runners[label] = lambda x, s=session, n=name: s.run(None, {n: x})
    return runners, seconds


def time_interleaved(runners: dict, inputs: dict, runs: int, warmup: int, repeats: int) -> dict:
    """Median seconds per pass of each runner; ``inputs[label]`` is what it is called with."""
    samples = {label: [] for label in runners}
    first_call = {}
    with torch.inference_mode():
        for label, run in runners.items():
            start = time.perf_counter()
            run(inputs[label])
            first_call[label] = time.perf_counter() - start
            for _ in range(warmup):
                run(inputs[label])
        for _ in range(repeats):
            for label, run in runners.items():
                for _ in range(runs):
                    start = time.perf_counter()
                    run(inputs[label])
                    samples[label].append(time.perf_counter() - start)
    return {label: {"seconds": statistics.median(s), "first_call_s": first_call[label], "runs": len(s)}
            for label, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--runs", type=int, default=3, help="timed passes per runner per round (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes after the first call (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="keep 0.5, batch 16, 2 runs x 2 rounds (overrides those options)")
    parser.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    parser.add_argument("--json", metavar="PATH", help="save the table and settings as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.keep_rates, args.batch_sizes, args.runs, args.repeats = [0.5], [16], 2, 2
    torch.set_num_threads(args.threads)
    kinds = KINDS[:2] if args.no_onnx else KINDS
    env = environment("cpu")
    if not args.no_onnx:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    print(f"{MODEL} (random weights, 224 px), etps at blocks {list(LOCATIONS)} | {format_environment(env)}"
          + (f", onnxruntime {env['onnxruntime']}" if "onnxruntime" in env else ""))
    models = build_models(args.keep_rates)
    gmacs_of = {label: gmacs(m) for label, m in models.items()}
    compiled = {label: torch.compile(m, fullgraph=True, dynamic=False) for label, m in models.items()}
    report = {"model": MODEL, "locations": list(LOCATIONS), "environment": env, "runs": args.runs,
              "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "gmacs": gmacs_of,
              "batches": []}
    columns = [("label", "model", ""), ("kind", "kind", ""), ("images_per_s", "images/s", ".1f"),
               ("ms_per_batch", "ms/batch", ".1f"), ("speedup", "speed-up", ".3f"),
               ("gmacs_ratio", "GMACs ratio", ".3f"), ("speedup_of_gmacs_ratio", "of GMACs ratio", ".1%")]
    with tempfile.TemporaryDirectory() as tmp:
        onnx, export_s = ({}, {}) if args.no_onnx else onnx_runners(models, Path(tmp), args.threads)
        if export_s:
            print("ONNX export + check: " + ", ".join(f"{k} {v:.0f} s" for k, v in export_s.items()))
        report["onnx_export_s"] = export_s
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            runners, inputs = {}, {}
            for label in models:
                for kind, run in (("eager", models[label]), ("compiled", compiled[label]),
                                  ("onnxruntime", onnx.get(label))):
                    if kind in kinds:
                        runners[(label, kind)] = run
                        inputs[(label, kind)] = x.numpy() if kind == "onnxruntime" else x
            times = time_interleaved(runners, inputs, args.runs, args.warmup, args.repeats)
            rows = []
            for (label, kind), t in times.items():
                ref = times[("unpatched", kind)]["seconds"]
                row = {"label": label, "kind": kind, "batch_size": batch_size, "gmacs": gmacs_of[label],
                       "images_per_s": batch_size / t["seconds"], "ms_per_batch": 1e3 * t["seconds"],
                       "first_call_s": t["first_call_s"], "runs": t["runs"], "speedup": ref / t["seconds"],
                       "gmacs_ratio": gmacs_of["unpatched"] / gmacs_of[label]}
                row["speedup_of_gmacs_ratio"] = (row["speedup"] / row["gmacs_ratio"]
                                                 if label != "unpatched" else None)
                rows.append(row)
            rows.sort(key=lambda r: (kinds.index(r["kind"]), list(models).index(r["label"])))
            print(f"\nbatch size {batch_size}: speed-up over the unpatched model of the same kind")
            print(format_table(rows, columns))
            firsts = [f"{r['label']} {r['first_call_s']:.0f} s" for r in rows if r["kind"] == "compiled"]
            print("  compile (first call, inductor): " + ", ".join(firsts))
            report["batches"].append({"batch_size": batch_size, "rows": rows})
    if args.json:
        write_json(report, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
