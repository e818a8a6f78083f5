"""Dense prediction on reduced tokens: segmentation of the cluttered canvas, every method x restore mode x budget.

Setting (a) of the dense-prediction issue: the shipped cluttered base model stays frozen; two small heads are trained
on its *unpatched* patch tokens (training images, fixed training view): a linear layer per token and a two-layer
conv head on the 7x7 grid, both upsampled bilinearly to the 56x56 pixels. At test time each method reduces tokens
(off-the-shelf, blocks 3/6/9, keep rate solved for the GMACs budget; ToMe: r in every block; dtps / dynamicvit:
the base backbone with the predictors of the shipped cluttered classification fine-tunes, which were trained at keep
0.5 on those fine-tuned backbones; ``--schedule auto``: the schedule :func:`tpsvit.plan` picks by classification
top-1 on 2,000 training images, methods without predictors) and
``tpsvit.restore(mode=...)`` rebuilds the grid the heads read. mIoU over 11 classes (background + 10 garments) and
pixel accuracy on the full test set. GMACs include the head.

    python benchmarks/dense.py --threads 1 [--budgets 0.65 0.5 0.35] [--train-images 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import tpsvit
from tpsvit.core.methods import METHODS as REGISTRY
from tpsvit.core.methods import Method, get_method, register_method
from tpsvit.data.segmentation import SEG_CLASSES, confusion, miou, segmentation_split
from tpsvit.dense import ConvHead, LinearHead, tokens_to_grid
from tpsvit.io.assets import load_demo_model
from tpsvit.measure.budget import solve_keep_rate, solve_tome_r
from tpsvit.patch import PREDICTORS

# etps-random: the squeeze with random scores; drop: class-attention top-k with the pruned tokens dropped (EViT's
# scorer and placement without its fused token; registered below through tpsvit's method registry)
METHODS = ("etps", "dtps", "evit", "dynamicvit", "drop", "tome", "etps-random")
MODES = ("host", "frozen", "zeros")
LOCATIONS = (3, 6, 9)


def _features(model, images, batch: int, desc: str) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), batch), desc=desc, file=sys.stderr, leave=False):
            out.append(model.forward_features(images[i:i + batch])[:, model.num_prefix_tokens:])
    return torch.cat(out)


def train_head(head: nn.Module, grids: torch.Tensor, pixels: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(grids) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(epochs), desc=f"{type(head).__name__} seed {seed}", file=sys.stderr, leave=False):
        order = torch.randperm(len(grids))
        for i in range(0, len(grids) - 255, 256):
            idx = order[i:i + 256]
            logits = F.interpolate(head(grids[idx]), size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, pixels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def _score(heads: dict, grid: torch.Tensor, pixels: torch.Tensor, counts: dict, key) -> None:
    with torch.inference_mode():
        for name, head in heads.items():
            logits = F.interpolate(head(grid), size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            counts[(name, *key)] = counts.get((name, *key), 0) + confusion(logits.argmax(1), pixels)


def patch_for_budget(model, method: str, budget: float, schedule: str = "fixed", calib=None) -> dict:
    """Patch ``model`` in place with ``method`` at ``budget`` of its GMACs (blocks 3/6/9; ToMe: r in every block;
    ``-random``: the method's reducer with random scores; dtps / dynamicvit: the predictors of the shipped cluttered
    fine-tune of that method; ``schedule="auto"``: :func:`tpsvit.plan` on ``calib`` (images, labels) instead, for
    methods without predictors); returns the solved keep rate / r (and blocks)."""
    base = method.removesuffix("-random")
    if schedule == "auto" and not get_method(base).learned and base == method:
        plan = tpsvit.plan(model, base, budget, data=calib)
        tpsvit.patch(model, **plan.patch_kwargs())
        return {"keep_rate": plan.keep_rate, "r": plan.r, "blocks": list(plan.locations)}
    if base == "tome":
        amount = {"r": solve_tome_r(model, budget=budget)}
        tpsvit.patch(model, "tome", r=amount["r"], locations=tuple(range(len(model.blocks))))
    else:
        amount = {"keep_rate": solve_keep_rate(model, base, budget=budget, locations=LOCATIONS)}
        tpsvit.patch(model, base, locations=LOCATIONS, scorer="random" if method.endswith("-random") else "default",
                     **amount)
        if get_method(base).learned:
            trained = getattr(load_demo_model(base), PREDICTORS)
            getattr(model, PREDICTORS).load_state_dict(trained.state_dict())
    return amount


if "drop" not in REGISTRY:
    register_method(Method("drop", "cls_attention", "drop", "inside", "class-attention top-k, pruned tokens dropped"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=None, help="default: the full test set (10,000)")
    p.add_argument("--epochs", type=int, default=8, help="head training epochs on the cached unpatched features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="head seeds")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--schedule", choices=["fixed", "auto", "both"], default="fixed",
                   help="fixed: blocks 3/6/9 (ToMe: r in every block); auto: tpsvit.plan's schedule by classification "
                        "top-1 on 2,000 training images (methods without predictors; rows '<method> auto'); both")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="save the table here")
    p.add_argument("--plot", help="mIoU-vs-GMACs plot (PNG) of the table")
    p.add_argument("--from-json", help="only print and plot a saved run")
    p.add_argument("--markdown", metavar="HEAD", help="with --from-json: print HEAD's (conv / linear) rows as a "
                                                      "markdown table, budgets as columns")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(_format(saved["table"], saved["unpatched_backbone_gmacs"], saved.get("test_images", 10000)))
        if args.markdown:
            print(markdown_table(saved["table"], args.markdown))
        if args.plot:
            plot(saved["table"], args.plot)
        return 0
    torch.set_num_threads(args.threads)
    began = time.time()
    model = load_demo_model()
    side = model.patch_embed.grid_size[0]
    classes = len(SEG_CLASSES)
    train_x, train_pix, train_labels = segmentation_split(True, limit=args.train_images)
    calib = train_x[:2000], train_labels[:2000]
    test_x, test_pix, _ = segmentation_split(False, limit=args.test_images)
    train_grids = tokens_to_grid(_features(model, train_x, args.batch_size, "train features"), side)
    heads = {}
    for seed in args.seeds:
        heads[f"linear/seed{seed}"] = train_head(LinearHead(model.embed_dim, classes), train_grids, train_pix,
                                                 args.epochs, seed)
        heads[f"conv/seed{seed}"] = train_head(ConvHead(model.embed_dim, classes), train_grids, train_pix,
                                               args.epochs, seed)
    head_macs = {"linear": LinearHead(model.embed_dim, classes).macs(side, side) / 1e9,
                 "conv": ConvHead(model.embed_dim, classes).macs(side, side) / 1e9}
    full = tpsvit.gmacs(model)
    counts: dict = {}
    schedules = ["fixed", "auto"] if args.schedule == "both" else [args.schedule]
    runs = [("unpatched", None, None)] + [
        (m if schedule == "fixed" else f"{m} auto", b, schedule) for schedule in schedules for m in args.methods
        for b in args.budgets if schedule == "fixed" or not (get_method(m.removesuffix("-random")).learned
                                                             or m.endswith("-random"))]
    gmacs, amounts = {}, {}
    for method, budget, schedule in tqdm(runs, desc="configurations", file=sys.stderr):
        tpsvit.unpatch(model)
        if method != "unpatched":
            amounts[(method, budget)] = patch_for_budget(model, method.removesuffix(" auto"), budget, schedule, calib)
        gmacs[(method, budget)] = tpsvit.gmacs(model)
        torch.manual_seed(0)  # the random scorer's draws
        with torch.inference_mode():
            for i in range(0, len(test_x), args.batch_size):
                x, pix = test_x[i:i + args.batch_size], test_pix[i:i + args.batch_size]
                if method == "unpatched":
                    grid = tokens_to_grid(model.forward_features(x)[:, 1:], side)
                    _score(heads, grid, pix, counts, (method, budget, "-"))
                    continue
                with tpsvit.tracing(model) as trace:
                    tokens = model.forward_features(x)
                for mode in MODES:
                    _, grid = tpsvit.restore(tokens, trace, mode=mode, norm=model.norm if mode == "frozen" else None)
                    _score(heads, tokens_to_grid(grid, side), pix, counts, (method, budget, mode))
    rows = []
    for (head_seed, method, budget, mode), c in counts.items():
        kind = head_seed.split("/")[0]
        m, acc = miou(c)
        rows.append({"head": kind, "seed": head_seed.split("seed")[1], "method": method, "budget": budget,
                     "mode": mode, "miou": m, "pixel_acc": acc, "backbone_gmacs": gmacs[(method, budget)],
                     "gmacs": gmacs[(method, budget)] + head_macs[kind], "amount": amounts.get((method, budget))})
    table = _summarise(rows)
    print(_format(table, full, len(test_x)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "unpatched_backbone_gmacs": full, "head_gmacs": head_macs,
                       "test_images": len(test_x),
                       "rows": rows, "table": table, "wall_s": time.time() - began,
                       "threads": args.threads}, f, indent=1)
    if args.plot:
        plot(table, args.plot)
    return 0


def plot(table: list[dict], path: str, head: str = "conv", title: str = "frozen backbone") -> None:
    """mIoU vs GMACs of ``head``'s rows, one panel per restore mode: one colour per method (its auto-schedule rows
    dashed in the same colour), the unpatched model as a star."""
    from matplotlib.figure import Figure

    rows = [r for r in table if r["head"] == head]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    methods = [m for m in METHODS if any(r["method"].removesuffix(" auto") == m for r in rows)]
    fig = Figure(figsize=(5 * len(modes), 4.5))
    axes = [fig.add_subplot(1, len(modes), k + 1) for k in range(len(modes))]
    for ax, mode in zip(axes, modes, strict=True):
        for r in rows:
            if r["method"] == "unpatched":
                ax.plot(r["gmacs"], r["miou_mean"], "k*", markersize=12, label="unpatched")
        for colour, method in enumerate(methods):
            for name, style in ((method, "-"), (f"{method} auto", "--")):
                line = sorted((r["gmacs"], r["miou_mean"]) for r in rows if r["method"] == name and r["mode"] == mode)
                if line:
                    ax.plot(*zip(*line), style, marker="o", color=f"C{colour}", label=name)
        ax.set(xlabel="GMACs per image (backbone + head)", ylabel="mIoU %", title=f"restore={mode!r}, {head} head, "
                                                                                  f"{title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean and both seeds' mIoU per head x method x budget x mode."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["head"], r["method"], r["budget"], r["mode"]), []).append(r)
    out = []
    for (head, method, budget, mode), rs in groups.items():
        values = [r["miou"] for r in sorted(rs, key=lambda r: r["seed"])]
        out.append({"head": head, "method": method, "budget": budget, "mode": mode, "gmacs": rs[0]["gmacs"],
                    "miou_mean": sum(values) / len(values), "miou_seeds": values,
                    "pixel_acc_mean": sum(r["pixel_acc"] for r in rs) / len(rs), "amount": rs[0]["amount"]})
    return out


def markdown_table(table: list[dict], head: str = "conv") -> str:
    """``head``'s rows as markdown: one row per method x restore mode (methods in :data:`METHODS` order, then their
    auto-schedule rows; a "zeros" row equal to the "host" row, as for methods that drop, is folded into it), one column
    per budget, each cell the mean mIoU (seed values)."""
    rows = [r for r in table if r["head"] == head and r["method"] != "unpatched"]
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    cells = {(r["method"], r["mode"], b): r for r in rows for b in [r["budget"]]}
    rank = {m: i for i, m in enumerate([*METHODS, *(f"{m} auto" for m in METHODS)])}
    lines = ["| method | restore | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for method in sorted({r["method"] for r in rows}, key=lambda m: rank.get(m, len(rank))):
        def values(mode, method=method):
            return [cells.get((method, mode, b), {}).get("miou_seeds") for b in budgets]
        for mode in MODES:
            if all(v is None for v in values(mode)) or (mode == "zeros" and values("zeros") == values("host")):
                continue
            label = "host (= zeros)" if mode == "host" and values("zeros") == values("host") else mode
            cells_text = ["" if v is None else f"{sum(v) / len(v):.2f} ({' / '.join(f'{x:.2f}' for x in v)})"
                          for v in values(mode)]
            lines.append(f"| {method} | {label} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def _format(table: list[dict], full: float, images: int) -> str:
    lines = [f"unpatched backbone: {full:.4f} GMACs; mIoU % over {len(SEG_CLASSES)} classes (mean of head seeds: "
             f"values), {images} test images",
             f"{'head':7} {'method':12} {'budget':>6} {'mode':7} {'GMACs':>8} {'mIoU':>6}  seeds          pix acc"]
    for r in sorted(table, key=lambda r: (r["head"], -(r["budget"] or 1), r["method"], r["mode"])):
        seeds = " / ".join(f"{v:.2f}" for v in r["miou_seeds"])
        budget = f"{r['budget']:.0%}" if r["budget"] else "100%"
        lines.append(f"{r['head']:7} {r['method']:12} {budget:>6} {r['mode']:7} {r['gmacs']:8.4f} "
                     f"{r['miou_mean']:6.2f}  {seeds:14} {r['pixel_acc_mean']:6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
