"""Dense prediction, setting (b): the backbone and the conv head fine-tuned with the reduction in place.

The same task, heads and test set as ``benchmarks/dense.py`` (setting (a)). Per head seed, a conv head is first
trained on the unpatched features of the frozen shipped base model (as in setting (a)); then, for every method x
restore mode x budget, a copy of the base model is patched (blocks 3/6/9, keep rate solved for the GMACs budget; ToMe:
r in every block) and backbone and head are fine-tuned together on the restored grid: the same steps, images, batch
order and optimiser for every configuration, the unpatched model included (fine-tuned the same way, so that the
baseline has had the same training). mIoU over 11 classes on the full test set; GMACs include the head.

dtps / dynamicvit start from the predictors of the shipped cluttered classification fine-tunes (as in setting (a))
and keep them frozen: their masked training path keeps every token (masked, not removed), so no grid can be restored
from it; they fine-tune on the inference (gather) path instead, with hard top-k decisions (the mini-DeiT has no
dropout or drop-path, so its eval mode trains the same backbone function).

    python benchmarks/dense_finetune.py --threads 1 --json benchmarks/results/dense_finetune.json \\
        --plot docs/images/dense_finetune.png

Rerunning with the same --json resumes: finished configurations are kept and skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tpsvit
from tpsvit.data.segmentation import confusion, miou, segmentation_split
from tpsvit.dense import ConvHead, Segmenter, tokens_to_grid
from tpsvit.io.assets import load_demo_model
from tpsvit.io.atomic import atomic_write

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dense import _features, _summarise, markdown_table, patch_for_budget, plot, train_head  # noqa: E402

METHODS = ("etps", "dtps", "evit", "dynamicvit", "drop", "tome", "etps-random")
MODES = ("host", "frozen")


def finetune(segmenter: Segmenter, images, pixels, steps: int, batch: int, lr: float, seed: int) -> None:
    """Backbone and head together, pixel cross-entropy, AdamW with a cosine schedule; batches drawn by ``seed``."""
    params = [p for p in segmenter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    segmenter.train()
    torch.manual_seed(seed)  # the random scorer's draws
    for step in range(steps):
        idx = order[(step * batch) % len(images):][:batch]
        loss = F.cross_entropy(segmenter(images[idx]), pixels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    segmenter.eval()


def evaluate(segmenter: Segmenter, images, pixels, batch: int) -> tuple[float, float]:
    """(mIoU, pixel accuracy) in percent on ``images``."""
    counts = 0
    torch.manual_seed(0)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            counts = counts + confusion(segmenter(images[i:i + batch]).argmax(1), pixels[i:i + batch])
    return miou(counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=("host", "frozen", "zeros"))
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=None, help="default: the full test set (10,000)")
    p.add_argument("--head-epochs", type=int, default=8, help="epochs of the conv head on frozen unpatched features")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per configuration (same for all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2.5e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="save (after every configuration) and resume from here")
    p.add_argument("--plot", help="mIoU-vs-GMACs plot (PNG)")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (budgets as columns)")
    p.add_argument("--from-json", help="no runs: print (and plot) a saved run")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        return _report(saved, args)
    torch.set_num_threads(args.threads)
    began = time.time()
    saved = {"rows": []}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
    done = {(r["method"], r["budget"], r["mode"], r["seed"]) for r in saved["rows"]}
    base = load_demo_model()
    side = base.patch_embed.grid_size[0]
    train_x, train_pix, _ = segmentation_split(True, limit=args.train_images)
    test_x, test_pix, _ = segmentation_split(False, limit=args.test_images)
    head_macs = ConvHead(base.embed_dim, 11).macs(side, side) / 1e9
    runs = [("unpatched", None, None)] + [(m, b, mode) for m in args.methods for b in args.budgets
                                           for mode in args.modes]
    todo = [(run, s) for s in args.seeds for run in runs if (*run, s) not in done]
    heads, feats = {}, None
    for run, seed in tqdm(todo, desc="fine-tunes", file=sys.stderr):
        if seed not in heads:
            if feats is None:
                feats = tokens_to_grid(_features(base, train_x, 500, "train features"), side)
            heads[seed] = train_head(ConvHead(base.embed_dim, 11), feats, train_pix, args.head_epochs, seed)
        method, budget, mode = run
        model, head = copy.deepcopy(base), copy.deepcopy(heads[seed])
        amount = patch_for_budget(model, method, budget) if method != "unpatched" else None
        gmacs = tpsvit.gmacs(model) + head_macs
        t0 = time.time()
        segmenter = Segmenter(model, head, restore=mode or "host")  # an unpatched model needs no restore
        finetune(segmenter, train_x, train_pix, args.steps, args.batch_size, args.lr, seed)
        m, acc = evaluate(segmenter, test_x, test_pix, 500)
        saved["rows"].append({"method": method, "budget": budget, "mode": mode, "seed": seed, "miou": m,
                              "pixel_acc": acc, "gmacs": gmacs, "amount": amount, "train_s": time.time() - t0})
        saved.update(args=vars(args), threads=args.threads, test_images=len(test_x), table=summarise(saved["rows"]))
        if args.json:
            text = json.dumps(saved, indent=1)
            atomic_write(args.json, lambda tmp, text=text: Path(tmp).write_text(text))
    print(f"{time.time() - began:.0f} s, {args.threads} thread(s)")
    return _report(saved, args)


def _report(saved: dict, args) -> int:
    """Print the table of a saved run (markdown too with --markdown) and plot it with --plot."""
    saved["table"] = summarise(saved["rows"])
    print(format_table(saved["table"], saved.get("test_images", 10000)))
    if args.markdown:
        print(markdown_table(saved["table"]))
    if args.plot:
        plot(saved["table"], args.plot, title="fine-tuned")
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and per-seed mIoU per method x budget x mode: dense.py's table rows (head 'conv', mode '-' unpatched)."""
    return _summarise([{**r, "head": "conv", "mode": r["mode"] or "-"} for r in rows])


def format_table(table: list[dict], images: int) -> str:
    lines = [f"fine-tuned backbone + conv head; mIoU % (mean: seeds), {images} test images",
             f"{'method':12} {'budget':>6} {'mode':7} {'GMACs':>8} {'mIoU':>6}  seeds"]
    for r in sorted(table, key=lambda r: (-(r["budget"] or 1), r["method"], r["mode"])):
        budget = f"{r['budget']:.0%}" if r["budget"] else "100%"
        seeds = " / ".join(f"{v:.2f}" for v in r["miou_seeds"])
        lines.append(f"{r['method']:12} {budget:>6} {r['mode']:7} {r['gmacs']:8.4f} {r['miou_mean']:6.2f}  {seeds}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
