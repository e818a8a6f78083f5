"""GMACs of DeiT-T/S/B, unpatched and under each method at the paper's schedule, next to the paper's numbers.

Schedule: locations 3, 6, 9 (0-based), keep 0.7 at each (ToMe: also its usual r=13 in every block), plus one row per
method at a 35% budget (keep rate solved at the same locations; ToMe: r in every block, since merging at most half
the tokens at three locations cannot reach 35%). Counted analytically from the token schedule (tpsvit.flops), on
weightless models: nothing is run. Paper numbers are only those stated in the paper (see ../shared/paper.md).

    python benchmarks/gmacs_table.py [--json PATH] [--markdown]
"""

from __future__ import annotations

import argparse
import sys

from tpsvit.core.methods import METHODS
from tpsvit.measure.budget import model_shape, schedule_gmacs, solve_keep_rate, solve_tome_r
from tpsvit.measure.evaluation import format_table, write_json

MODELS = {"DeiT-T": "deit_tiny_patch16_224", "DeiT-S": "deit_small_patch16_224", "DeiT-B": "deit_base_patch16_224"}
LOCATIONS = (3, 6, 9)
KEEP = 0.7
BUDGET = 0.35

# (model, method or None for unpatched, schedule) -> GMACs as printed in the paper. Nothing else is known.
PAPER = {
    ("DeiT-T", None, ""): 1.3,
    ("DeiT-S", None, ""): 4.6,
    ("DeiT-B", None, ""): 17.6,
    ("DeiT-S", "etps", "keep 0.7"): 3.0,
    ("DeiT-S", "dtps", "keep 0.7"): 3.0,
    ("DeiT-S", "evit", "keep 0.7"): 3.0,
    ("DeiT-S", "dynamicvit", "keep 0.7"): 2.9,
    ("DeiT-S", "tome", "r=13"): 2.7,
}


def _row(model: str, name: str, full: float, method: str | None, schedule: str, value: float, keep_rate=None,
         r=None) -> dict:
    return {
        "model": model, "timm_name": name, "method": method or "unpatched", "schedule": schedule,
        "keep_rate": keep_rate, "r": r, "locations": list(LOCATIONS) if keep_rate is not None else None,
        "gmacs": value, "fraction": value / full, "paper_gmacs": PAPER.get((model, method, schedule)),
    }


def table_rows() -> list[dict]:
    """Every (model, method, schedule) row with our analytic GMACs and, where the paper states it, the paper's."""
    rows = []
    for label, name in MODELS.items():
        shape = model_shape(name)
        full = schedule_gmacs(shape)
        rows.append(_row(label, name, full, None, "", full))
        for method in METHODS:
            value = schedule_gmacs(shape, method, KEEP, LOCATIONS)
            rows.append(_row(label, name, full, method, f"keep {KEEP}", value, keep_rate=KEEP))
        rows.append(_row(label, name, full, "tome", "r=13", schedule_gmacs(shape, "tome", r=13), r=13))
        for method in METHODS:
            if method == "tome":
                r = solve_tome_r(shape, budget=BUDGET)
                value = schedule_gmacs(shape, "tome", r=r)
                rows.append(_row(label, name, full, method, f"{BUDGET:.0%} budget (r={r})", value, r=r))
            else:
                rate = solve_keep_rate(shape, method, budget=BUDGET, locations=LOCATIONS)
                value = schedule_gmacs(shape, method, rate, LOCATIONS)
                rows.append(_row(label, name, full, method, f"{BUDGET:.0%} budget (keep {rate:g})", value,
                                 keep_rate=rate))
    return rows


COLUMNS = [("model", "model", ""), ("method", "method", ""), ("schedule", "schedule", ""), ("gmacs", "GMACs", ".3f"),
           ("fraction", "of unpatched", ".1%"), ("paper_gmacs", "paper", ".1f")]


def markdown(rows: list[dict]) -> str:
    """The table as Markdown, for the README."""
    lines = ["| model | method | schedule | GMACs (ours) | paper |", "|---|---|---|---:|---:|"]
    for r in rows:
        paper = f"{r['paper_gmacs']:.1f}" if r["paper_gmacs"] is not None else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['schedule']} | {r['gmacs']:.2f} | {paper} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="save the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead")
    args = parser.parse_args(argv)
    rows = table_rows()
    print(markdown(rows) if args.markdown else format_table(rows, COLUMNS))
    print(f"\nlocations {list(LOCATIONS)} (0-based), keep rate per location; paper numbers only where paper.md "
          "states them")
    if args.json:
        write_json({"locations": list(LOCATIONS), "keep_rate": KEEP, "budget": BUDGET, "rows": rows}, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
