"""Choose squeeze options (beyond the paper: floor, floor action, weighting, temperature) on training images.

Every combination of the ``--option`` values is patched at the budget (keep rate solved at ``--locations`` for each,
so the floor's fused token is paid for), scored by top-1 on the first ``--images`` images of the *training* split
(never the test split) and printed; the paper's squeeze is always a candidate and wins ties. For example::

    tpsvit calibrate --data fashion-mnist-textures --method etps --budget 0.35 \\
        --option squeeze_floor=none,0,0.2,0.4 --option squeeze_floor_action=drop,fuse --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpsvit.errors import InvalidArgumentError

DEFAULT_IMAGES = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="NAME_OR_DIR",
                        help="'fashion-mnist-cluttered', 'fashion-mnist-textures', 'fashion-mnist' (their training "
                             "split), or an ImageFolder tree of training images (default: the checkpoint's dataset, "
                             "else fashion-mnist-cluttered)")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="the model (default: the shipped one for --data: its base model for etps, its dtps "
                             "fine-tune for dtps)")
    parser.add_argument("--method", choices=("etps", "dtps"), default="etps", help="the squeezing method (etps)")
    parser.add_argument("--budget", type=float, required=True, metavar="FRACTION",
                        help="fraction of the unpatched GMACs every candidate meets (keep rate solved per candidate)")
    parser.add_argument("--locations", type=int, nargs="+", default=[3, 6, 9], metavar="BLOCK",
                        help="etps: blocks where tokens are reduced (default: 3 6 9); dtps keeps its trained ones")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=V1,V2",
                        help="values to try, repeatable; keys: squeeze_floor (numbers in [-1, 1] or none), "
                             "squeeze_floor_action (drop, fuse), squeeze_weighting (similarity, importance), "
                             "temperature (numbers > 0); every combination is tried")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, metavar="N",
                        help=f"the first N training images calibrate (default: {DEFAULT_IMAGES})")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write every trial and the choice here")


def _data_and_model(args):
    """(calibration data, its description, the model, the dataset name, the checkpoint path)."""
    from tpsvit.data.datasets import FashionMNIST, build_dataset, embedded_name
    from tpsvit.io.assets import DEFAULT_DATA, DEMO_MODELS, demo_checkpoint
    from tpsvit.io.loading import checkpoint_metadata, load_model
    from tpsvit.measure.bench import input_size

    data = args.data
    if data is None and args.checkpoint:
        data = embedded_name(checkpoint_metadata(args.checkpoint).get("data") or "")
    data = data or DEFAULT_DATA
    checkpoint = args.checkpoint
    if checkpoint is None:
        name = embedded_name(data)
        if name not in DEMO_MODELS:
            raise InvalidArgumentError(f"--data {data!r} has no shipped model; pass --checkpoint FILE")
        if args.method == "dtps" and "dtps" not in DEMO_MODELS[name].finetuned:
            raise InvalidArgumentError(f"no shipped dtps fine-tune for {name}; pass --checkpoint FILE of one")
        checkpoint = str(demo_checkpoint("dtps" if args.method == "dtps" else None, name))
    model = load_model(checkpoint=checkpoint).eval()
    chans, height, _ = input_size(model)
    dataset = build_dataset(data, train=True, img_size=height, in_chans=chans, model=model, limit=args.images)
    if isinstance(dataset, FashionMNIST):
        return dataset.tensors(), f"first {len(dataset)} training images of {dataset.slug}", model, data, checkpoint
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    return loader, f"{len(dataset)} images of {data}", model, data, checkpoint


def _label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "paper (no option)"


def run(args: argparse.Namespace) -> int:
    import torch

    from tpsvit.measure.bench import environment, format_environment
    from tpsvit.measure.calibrate import PAPER, calibrate, parse_option

    if not args.option:
        raise InvalidArgumentError("give at least one --option KEY=V1,V2,... (e.g. squeeze_floor=none,0.2,0.4)")
    if args.images < 1:
        raise InvalidArgumentError(f"--images must be >= 1, got {args.images}")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    values: dict = {}
    for text in args.option:
        key, choices = parse_option(text)
        values.setdefault(key, [])
        values[key] += [c for c in choices if c not in values[key]]
    calib, what, model, data, checkpoint = _data_and_model(args)
    result = calibrate(model, args.method, args.budget, calib, values, locations=tuple(args.locations),
                       batch_size=args.batch_size)
    env = environment("cpu", None)
    print(f"tpsvit calibrate: {args.method} at {args.budget:.0%} of the GMACs ({result.target_gmacs:.4g}), blocks "
          f"{list(result.locations)}, {checkpoint}, {what} | {format_environment(env)}")
    width = max(len(_label(t.options)) for t in result.trials)
    print(f"{'options':<{width}}  {'keep':>7}  {'GMACs':>8}  {'top-1 %':>7}")
    for trial in sorted(result.trials, key=lambda t: -t.top1):
        mark = "  <- chosen" if trial is result.best else ("  <- paper" if trial is result.paper else "")
        row = f"{_label(trial.options):<{width}}  {trial.keep_rate:>7.4g}  {trial.gmacs:>8.4g}  {trial.top1:>7.2f}"
        print(row + mark)
    for key in (k for k in PAPER if k in values and k != "squeeze_floor_action"):
        single = result.best_single(key)
        print(f"best {key} alone: {_label(single.options)} ({single.top1:.2f}% vs paper {result.paper.top1:.2f}%)")
    print(f"chosen: {_label(result.best.options)} ({result.best.top1:.2f}% vs paper {result.paper.top1:.2f}%)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"command": "tpsvit calibrate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
                  "data": data, "calibration": what, "checkpoint": checkpoint, "environment": env,
                  **result.as_dict()}
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}", file=sys.stderr)
    return 0
