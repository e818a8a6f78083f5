"""The paper's central claim at small scale: TPS vs EViT, DynamicViT and ToMe on (cluttered) Fashion-MNIST.

For every method at each budget (fraction of the unpatched GMACs; keep rate solved at blocks 3/6/9, ToMe: r in every
block) this script evaluates the shipped mini-DeiT off-the-shelf, fine-tunes it with one shared short recipe
(``cluttered-finetune`` / ``fmnist-finetune``: the release's losses and single lr, the same images and steps for every
method) once per seed, and evaluates every model on the full test set. Rows ``<method> (random)`` replace the
method's scorer by random scores (the paper's robustness analysis; off-the-shelf: one random draw per seed).
Learned methods (dtps, dynamicvit) get the predictor options given (``--predictor-init``, ``--predictor-loss``).

    python benchmarks/reproduction.py --seeds 0 --json outputs/repro_seed0.json   # one seed per process,
    python benchmarks/reproduction.py --seeds 1 --json outputs/repro_seed1.json   # two side by side, --threads 1
    python benchmarks/reproduction.py --from-json outputs/repro_seed*.json --plot docs/images/reproduction.png

``--option LABEL:KEY=VALUE,...`` adds rows of a squeezing method (``--option-methods``, etps) with squeeze options
beyond the paper (keys of :func:`tpsvit.patch` and the recipe: squeeze_floor, squeeze_floor_action, squeeze_weighting,
temperature; choose them with ``tpsvit calibrate`` on training images), the keep rate solved with the options at the
same budget. ``--finetune-auto`` also fine-tunes the methods without predictors at the schedule :func:`tpsvit.plan`
picks on training images (rows "(best schedule)").

``--json`` is rewritten after every run and a rerun with the same file skips the runs it holds (an interrupted
reproduction resumes). ``--eval-on calibration`` evaluates on held-out *training* images instead of the test set
(for choosing options without looking at the test set).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import tpsvit
from tpsvit.core.methods import METHODS, get_method
from tpsvit.data.datasets import embedded_dataset
from tpsvit.errors import InvalidArgumentError
from tpsvit.io.assets import demo_checkpoint
from tpsvit.io.loading import load_model
from tpsvit.measure.budget import Variant, plan_variants, solve_keep_rate
from tpsvit.measure.calibrate import parse_option
from tpsvit.measure.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs
from tpsvit.train import train
from tpsvit.train.recipe import parse_set, resolve

RECIPES = {"fashion-mnist-cluttered": "cluttered-finetune", "fashion-mnist-textures": "textures-finetune",
           "fashion-mnist": "fmnist-finetune"}
SCORER_ORDER = ("default", "auto", "random")  # row order within a budget: fixed schedule, best schedule, random
CALIBRATION = slice(50_000, 60_000)  # training images never used by the fine-tunes (--train-limit <= 50,000)
COLUMNS = [("method", "method", ""), ("budget", "budget", ""), ("amount", "keep / r", ""), ("blocks", "blocks", ""),
           ("gmacs", "GMACs", ".4g"),
           ("shelf", "off-the-shelf top-1 %", ""), ("tuned", "fine-tuned top-1 %", "")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=list(RECIPES), default="fashion-mnist-cluttered")
    p.add_argument("--checkpoint", help="the unpatched base model (default: the shipped one for --data)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--random", nargs="*", default=["etps"], choices=[m for m in METHODS if m != "tome"],
                   help="methods that also get random-score rows (default: etps, i.e. random squeeze)")
    p.add_argument("--option", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                   help="rows with squeeze options (beyond the paper), e.g. floor-fuse:squeeze_floor=0.2,"
                        "squeeze_floor_action=fuse; repeatable")
    p.add_argument("--option-methods", nargs="+", default=["etps"], choices=["etps", "dtps"],
                   help="the squeezing methods that get the --option rows")
    p.add_argument("--finetune-auto", action="store_true",
                   help="fine-tune the best-schedule rows too (methods without predictors), every seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per run (shared recipe)")
    p.add_argument("--train-limit", type=int, default=12000, help="training images per fine-tune epoch")
    p.add_argument("--predictor-init", default="class-attention", choices=["release", "class-attention"])
    p.add_argument("--predictor-loss", default="attention-distill", choices=["gumbel", "attention-distill"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides for every run")
    p.add_argument("--eval-on", choices=["test", "calibration"], default="test")
    p.add_argument("--no-auto", action="store_true",
                   help="skip the best-schedule rows (tpsvit.plan on the first --calib-images training images; "
                        "off-the-shelf, methods without predictors)")
    p.add_argument("--calib-images", type=int, default=2000)
    p.add_argument("--no-finetune", action="store_true", help="off-the-shelf numbers only")
    p.add_argument("--out", default="runs/reproduction", help="folder for the fine-tuning runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    p.add_argument("--json", help="save the results here (after every run; rerunning resumes)")
    p.add_argument("--plot", help="save fine-tuned accuracy vs GMACs here")
    p.add_argument("--markdown", help="with --from-json: also write the table as markdown here")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="no runs: merge saved results, print, plot")
    return p.parse_args(argv)


def evaluation_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    kind = embedded_dataset(args.data)
    if args.eval_on == "calibration":
        if args.train_limit > CALIBRATION.start:
            raise SystemExit(f"--train-limit {args.train_limit} overlaps the calibration images (50,000 on)")
        images, labels = kind(train=True).tensors()
        return images[CALIBRATION], labels[CALIBRATION]
    return kind(train=False).tensors()


def run_key(variant: Variant, scorer: str, seed: int) -> str:
    return f"{variant.label}|{scorer}|seed{seed}"


def parse_options(items: list[str]) -> dict[str, dict]:
    """``LABEL:KEY=VALUE,...`` items -> {label: {key: value}}, each value typed and checked as ``tpsvit calibrate``'s
    ``--option`` values are (:func:`tpsvit.measure.calibrate.parse_option`)."""
    out = {}
    for item in items:
        label, _, rest = item.partition(":")
        if not label or not rest or label in SCORER_ORDER:
            raise SystemExit(f"--option {item!r}: expected LABEL:KEY=VALUE,... with a new label")
        options = {}
        for pair in rest.split(","):
            try:
                key, (value,) = parse_option(pair)
            except InvalidArgumentError as err:
                raise SystemExit(f"--option {item!r}: {err}") from None
            options[key] = value
        out[label] = options
    return out


def fine_tune(args, variant: Variant, scorer: str, seed: int, depth: int, options: dict | None = None,
              tag_suffix: str = "") -> torch.nn.Module:
    """One run of the shared recipe for a variant of a ``depth``-block model (with squeeze ``options``, and the
    recipe's scorer ``default`` for them); returns the fine-tuned model."""
    suffix = tag_suffix or ("-random" if scorer == "random" else "")
    tag = f"{variant.method}{suffix}-{variant.budget.split()[0].rstrip('%')}"
    overrides = {"checkpoint": args.checkpoint, "method": variant.method,
                 "locations": list(variant.locations or range(depth)), "epochs": args.epochs,
                 "scorer": scorer if scorer in ("default", "random") else "default", **(options or {}),
                 "limit": args.train_limit, "val_limit": 500, "seed": seed, "threads": args.threads,
                 "out": f"{args.out}/{tag}-seed{seed}", "predictor_init": args.predictor_init,
                 "predictor_loss": args.predictor_loss, **parse_set(args.set)}
    if variant.r is not None:
        overrides.update(r=variant.r, keep_rate=1.0)
    else:
        overrides.update(keep_rate=variant.keep_rate)
    if not get_method(variant.method).learned:
        overrides["keep_ratio_weight"] = 0.0
    cfg = resolve(RECIPES[args.data], overrides)
    return train(cfg, command="benchmarks/reproduction.py " + " ".join(sys.argv[1:]))["model"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return merge(args)
    torch.set_num_threads(args.threads)
    args.checkpoint = args.checkpoint or str(demo_checkpoint(None, args.data))
    start = time.perf_counter()
    base = load_model(checkpoint=args.checkpoint).eval()
    data = evaluation_data(args)
    report = _load(args.json) or {"runs": {}}
    report.update(command=" ".join(["python", *sys.argv]), machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=args.threads, args=vars(args), count=len(data[1]))
    runs = report["runs"]

    def record(key: str, **values) -> None:
        runs[key] = values
        _save(args.json, report)
        print(f"{key}: {values}", flush=True)

    if "unpatched" not in runs:
        record("unpatched", top1=evaluate_many({"m": base}, data, batch_size=500, progress=False)["m"]["top1"],
               gmacs=tpsvit.gmacs(base))
    variants = [v for b in args.budgets for v in plan_variants(base, args.methods, keep_rates=(), budget=b,
                                                               unpatched=False)]
    jobs = [(v, "default", None) for v in variants] + [
        (Variant(v.method, v.keep_rate, v.r, v.locations, v.budget, "random"), "random", None)
        for v in variants if v.method in args.random]
    for label, options in parse_options(args.option).items():
        for v in variants:
            if v.method in args.option_methods:
                budget = float(v.budget.split("%")[0]) / 100
                rate = solve_keep_rate(base, v.method, budget=budget, locations=v.locations, options=options)
                jobs.append((Variant(v.method, rate, None, v.locations, v.budget), label, options))
    for variant, scorer, options in jobs:
        learned = get_method(variant.method).learned
        for seed in args.seeds:
            key = run_key(variant, scorer, seed)
            if key in runs:
                continue
            values = {"method": variant.method, "scorer": scorer, "seed": seed, "budget": variant.budget,
                      "amount": variant.amount, "keep_rate": variant.keep_rate, "r": variant.r,
                      **({"options": options} if options else {})}
            shelf = tpsvit.patch(copy.deepcopy(base), **variant.patch_kwargs(), **(options or {}))
            values["gmacs"] = tpsvit.gmacs(shelf)
            if not learned or scorer == "random":
                torch.manual_seed(seed)
                values["off_the_shelf"] = evaluate_many({"m": shelf}, data, batch_size=500, progress=False)["m"]["top1"]
            if not args.no_finetune:
                suffix = f"-{scorer}" if options else ""
                tuned = fine_tune(args, variant, scorer, seed, len(base.blocks), options, suffix).eval()
                torch.manual_seed(seed)
                values["fine_tuned"] = evaluate_many({"m": tuned}, data, batch_size=500, progress=False)["m"]["top1"]
            record(key, **values)
    if not args.no_auto:
        auto_rows(args, base, variants, data, runs, record)
    report["seconds"] = report.get("seconds", 0.0) + time.perf_counter() - start
    _save(args.json, report)
    rows = table_rows(report["runs"])
    print(format_table(rows, COLUMNS))
    if args.plot:
        plot(rows, args.plot, args.data)
    return 0


def auto_rows(args, base, variants, data, runs: dict, record) -> None:
    """Rows at the best schedule :func:`tpsvit.plan` finds on training images, per method and budget (methods without
    predictors): off-the-shelf, and with ``--finetune-auto`` fine-tuned once per seed."""
    kind = embedded_dataset(args.data)
    calib = kind(train=True, limit=args.calib_images).tensors()
    for variant in variants:
        key = f"{variant.label}|auto"
        tuned_keys = [f"{key}|seed{seed}" for seed in args.seeds] if args.finetune_auto and not args.no_finetune else []
        if get_method(variant.method).learned or (key in runs and all(k in runs for k in tuned_keys)):
            continue
        budget = float(variant.budget.split("%")[0]) / 100
        schedule = tpsvit.plan(base, variant.method, budget, data=calib)
        model = tpsvit.patch(copy.deepcopy(base), **schedule.patch_kwargs())
        top1 = evaluate_many({"m": model}, data, batch_size=500, progress=False)["m"]["top1"]
        amount = f"r={schedule.r}" if schedule.r is not None else f"{schedule.keep_rate:g}"
        values = dict(method=variant.method, scorer="auto", seed=0, budget=variant.budget, amount=amount,
                      keep_rate=schedule.keep_rate, r=schedule.r, gmacs=tpsvit.gmacs(model), off_the_shelf=top1,
                      schedule=schedule.as_dict(), blocks=",".join(map(str, schedule.locations)))
        if key not in runs:
            record(key, **values)
        planned = Variant(variant.method, schedule.keep_rate, schedule.r, tuple(schedule.locations), variant.budget)
        for seed, tuned_key in zip(args.seeds, tuned_keys, strict=True):
            if tuned_key in runs:
                continue
            tuned = fine_tune(args, planned, "default", seed, len(base.blocks), tag_suffix="-auto").eval()
            torch.manual_seed(seed)
            fine = evaluate_many({"m": tuned}, data, batch_size=500, progress=False)["m"]["top1"]
            record(tuned_key, **{**values, "seed": seed, "fine_tuned": fine})


def _load(path: str | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _save(path: str | None, report: dict) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(target)


def _mean_and_values(values: list[float]) -> str:
    if not values:
        return ""
    if len(set(values)) == 1:  # one run, or a deterministic evaluation repeated per seed
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({' / '.join(f'{v:.2f}' for v in values)})"


def _blocks(run: dict) -> str:
    return "all" if run["method"] == "tome" else "3,6,9"


def table_rows(runs: dict) -> list[dict]:
    """One row per method x scorer x budget: mean over seeds and each seed's value."""
    groups: dict[tuple, list[dict]] = {}
    for key, run in runs.items():
        if key != "unpatched":
            groups.setdefault((run["budget"], run["method"], run["scorer"]), []).append(run)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = [{"method": "unpatched", "budget": "100%", "amount": "", "gmacs": runs["unpatched"]["gmacs"],
             "shelf": f"{runs['unpatched']['top1']:.2f}", "tuned": "", "shelf_values": [runs["unpatched"]["top1"]],
             "tuned_values": []}]
    def rank(scorer: str) -> int:  # fixed schedule, best schedule, option rows, random
        return SCORER_ORDER.index(scorer) if scorer in ("default", "auto") else (3 if scorer == "random" else 2)

    for (budget, method, scorer), group in sorted(
            groups.items(), key=lambda kv: (-float(kv[0][0].split("%")[0]), rank(kv[0][2]), order[kv[0][1]],
                                            kv[0][2])):
        group.sort(key=lambda r: r["seed"])
        shelf = [r["off_the_shelf"] for r in group if r.get("off_the_shelf") is not None]
        tuned = [r["fine_tuned"] for r in group if r.get("fine_tuned") is not None]
        suffix = {"default": "", "random": " (random)", "auto": " (best schedule)"}.get(scorer, f" [{scorer}]")
        rows.append({"method": method + suffix, "budget": budget.split()[0],
                     "amount": group[0]["amount"], "blocks": group[0].get("blocks", _blocks(group[0])),
                     "gmacs": group[0]["gmacs"],
                     "shelf": _mean_and_values(shelf) or "(needs training)", "tuned": _mean_and_values(tuned),
                     "shelf_values": shelf, "tuned_values": tuned, "seeds": [r["seed"] for r in group]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The table of :func:`table_rows` in markdown (GMACs to 4 digits)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---|---|---|---|---:|---:|---:|"]
    for row in rows:
        cells = [format(row.get(key), spec) if spec and row.get(key) is not None else str(row.get(key) or "")
                 for key, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, data: str) -> None:
    """Fine-tuned top-1 (mean over seeds) vs GMACs, one line per method (and per schedule / option row), the
    unpatched model as a star."""
    points = [{"method": None, "gmacs": rows[0]["gmacs"], "top1": rows[0]["shelf_values"][0]}]
    points += [{"method": r["method"], "gmacs": r["gmacs"], "top1": statistics.mean(r["tuned_values"])}
               for r in rows[1:] if r["tuned_values"]]
    plot_accuracy_vs_gmacs(points, path, title=f"mini-DeiT on {data}, fine-tuned (one shared short recipe)")


def _data_of(report: dict) -> str:
    """The testbed of a saved report (a merged report keeps its sources' args as a list)."""
    given = report.get("args") or {}
    return (given[0] if isinstance(given, list) else given)["data"]


def merge(args) -> int:
    """Print (and plot) the runs of several saved reports (e.g. one per seed) as one table."""
    reports = [_load(p) for p in args.from_json]
    runs = {k: v for rep in reports for k, v in rep["runs"].items()}
    rows = table_rows(runs)
    print(format_table(rows, COLUMNS))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_table(rows) + "\n")
    if args.json:
        _save(args.json, {"sources": args.from_json, "runs": runs, "rows": rows,
                          "args": [rep.get("args") for rep in reports]})
    if args.plot:
        plot(rows, args.plot, _data_of(reports[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
