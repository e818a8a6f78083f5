"""Markdown summary of `tpsvit calibrate` reports: per report, the paper's squeeze, the best value of each option
alone (the others at the paper's) and the best combination, by calibration top-1 on training images.

    python benchmarks/squeeze_options_table.py benchmarks/results/squeeze_options/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _options(options: dict) -> str:
    if not options:
        return "paper"
    short = {"squeeze_floor": "floor", "squeeze_floor_action": "", "squeeze_weighting": "", "temperature": "T"}
    parts = []
    for key, value in options.items():
        parts.append(f"{short[key]}={value:g}" if isinstance(value, float) and short[key] else str(value))
    return ", ".join(parts)


def row(report: dict) -> str:
    paper, best, single = report["paper"], report["best"], report["best_single"]
    cells = [report["method"], report["data"].replace("fashion-mnist-", ""), f"{report['budget']:.0%}",
             f"{paper['top1']:.2f} (keep {paper['keep_rate']:g})"]
    for key in ("squeeze_floor", "squeeze_weighting", "temperature"):
        trial = single[key]
        delta = trial["top1"] - paper["top1"]
        cells.append(f"{_options(trial['options'])}: {trial['top1']:.2f} ({delta:+.2f})")
    cells.append(f"{_options(best['options'])}: {best['top1']:.2f} ({best['top1'] - paper['top1']:+.2f})")
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+")
    args = p.parse_args(argv)
    print("| method | testbed | budget | paper squeeze | best floor alone | best weighting alone | best temperature "
          "alone | best combination |")
    print("|---|---|---|---:|---|---|---|---|")
    for path in args.reports:
        print(row(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
