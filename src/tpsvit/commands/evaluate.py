"""Top-1/top-5 accuracy, GMACs and images/s of the unpatched and patched model on a labelled dataset.

Data: Fashion-MNIST (``--data fashion-mnist`` or a folder of its IDX files; the default for 28x28 grey models), its
cluttered variant (``--data fashion-mnist-cluttered``; the default for 56x56 grey models) or an ImageFolder tree
(ImageNet val layout). Every variant is evaluated in the same pass over the data; images/s is the
forward time measured during that pass. Writes ``results.csv``, ``results.json`` and ``accuracy_vs_gmacs.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tpsvit.commands.options import add_model_arguments, add_variant_arguments
from tpsvit.core.methods import get_method
from tpsvit.errors import DatasetError, InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    from tpsvit.measure.budget import Variant

COLUMNS = [
    ("name", "method", ""),
    ("amount", "keep / r", ""),
    ("blocks", "blocks", ""),
    ("budget", "budget", ""),
    ("top1", "top-1 %", ".2f"),
    ("top5", "top-5 %", ".2f"),
    ("gmacs", "GMACs", ".4g"),
    ("images_per_s", "images/s", ".1f"),
    ("status", "weights", ""),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_model=None, default_text="the shipped Fashion-MNIST demo checkpoint")
    add_variant_arguments(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="NAME_OR_DIR",
                       help="'fashion-mnist', 'fashion-mnist-cluttered', 'fashion-mnist-textures', a folder of "
                            "Fashion-MNIST IDX files, or an ImageFolder tree root/<class>/<image> (default: the "
                            "checkpoint's embedded dataset, else fashion-mnist for 28x28 grey models, "
                            "fashion-mnist-cluttered for 56x56 ones); without --model/--checkpoint an embedded "
                            "dataset's name also picks its shipped model")
    group.add_argument("--split", choices=["test", "train"],
                       help="Fashion-MNIST split (default: test; not for an ImageFolder tree, which is one split)")
    group.add_argument("--limit", type=int, metavar="N", help="evaluate N images only (a deterministic subset)")
    group.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="ImageFolder loader processes (default: up to 4)")
    parser.add_argument("--scorer", choices=["default", "random"], default="default",
                        help="random: every pruning method scores tokens randomly (robustness study; ToMe unchanged)")
    group = parser.add_argument_group("schedule")
    group.add_argument("--schedule", choices=["fixed", "auto"], default="fixed",
                       help="budget rows: fixed = the paper's schedule (keep rate solved at --locations, ToMe's r in "
                            "every block); auto = the best of a few schedule families at the same GMACs by top-1 on "
                            "calibration images from the training split (tpsvit.plan; beyond the papers)")
    group.add_argument("--calib-images", type=int, default=1000, metavar="N",
                       help="--schedule auto: calibration images, the first N of the training split (default: 1000)")
    group.add_argument("--calib-data", metavar="DIR",
                       help="--schedule auto with ImageFolder data: an ImageFolder tree of training images")
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (default: fp32)")
    parser.add_argument("--out", metavar="DIR", help="write results.csv, results.json and accuracy_vs_gmacs.png here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def weights_status(variant: Variant, base, meta: dict) -> str:
    """How a variant's weights relate to its method: unpatched, fine-tuned, off-the-shelf or untrained predictor.

    "fine-tuned" means the checkpoint records a patch with this method (its ``recipe`` metadata, when a string, is
    added). A learned method (dtps, dynamicvit) whose locations have no predictors from the checkpoint is labelled
    "untrained predictor": its numbers are not meaningful.
    """
    from tpsvit.patch import PREDICTORS, is_patched

    if variant.method is None:
        return "unpatched"
    trained_by = (meta.get("patch") or {}).get("method")
    if get_method(variant.method).learned:
        predictors = getattr(base, PREDICTORS, None) if is_patched(base) else None
        trained = set(predictors.keys()) if predictors is not None else set()
        if not {str(loc) for loc in variant.locations or ()} <= trained:
            return "untrained predictor"
        if trained_by != variant.method:
            return f"off-the-shelf (predictors from {trained_by})"
    if trained_by == variant.method:
        recipe = meta.get("recipe")
        return f"fine-tuned ({recipe})" if isinstance(recipe, str) else "fine-tuned"
    return "off-the-shelf"


def load_data(args: argparse.Namespace, model):
    """(in-memory tensors or a DataLoader, dataset description, number of classes)."""
    import torch
    from torch.utils.data import DataLoader

    from tpsvit.data.datasets import DEFAULT_DATA_BY_INPUT, FashionMNIST, build_dataset, num_classes_of
    from tpsvit.measure.bench import input_size

    chans, h, w = input_size(model)
    data = args.data
    if data is None:
        data = DEFAULT_DATA_BY_INPUT.get((chans, h, w))
        if data is None:
            raise DatasetError(f"this model takes {chans}x{h}x{w} images; pass --data with an ImageFolder tree "
                               "(root/<class>/<image>), 'fashion-mnist' or 'fashion-mnist-cluttered'")
    split = args.split or "test"
    dataset = build_dataset(data, train=split == "train", img_size=h, in_chans=chans, model=model,
                            limit=args.limit)
    classes = num_classes_of(dataset)
    if isinstance(dataset, FashionMNIST):
        return dataset.tensors(), f"{dataset.title} {split} ({dataset.root})", classes
    if args.split is not None:
        raise InvalidArgumentError(f"--split {args.split} is for Fashion-MNIST; an ImageFolder tree ({data}) is one "
                                   "split: pass the folder of the split you want")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=torch.cuda.is_available())
    return loader, f"ImageFolder {data}", classes


def run(args: argparse.Namespace) -> int:
    import torch

    from tpsvit.commands.flops import load_base_model, make_variant, variants_from_args, with_scorer
    from tpsvit.data.datasets import embedded_name
    from tpsvit.families import family_of
    from tpsvit.io.hf_loading import is_hf_source
    from tpsvit.io.loading import checkpoint_metadata
    from tpsvit.measure.bench import environment, format_environment
    from tpsvit.measure.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs, write_csv, write_json
    from tpsvit.measure.flops import gmacs

    checkpoint = args.checkpoint
    if args.model is None and checkpoint is None:
        from tpsvit.io.assets import demo_checkpoint

        checkpoint = args.checkpoint = str(demo_checkpoint(None, _shipped_data(args.data)))
    base = load_base_model(args, default_model=None)  # reads and checks the checkpoint first
    meta = checkpoint_metadata(checkpoint) if checkpoint else {}
    if args.data is None and embedded_name(meta.get("data") or "") is not None:
        args.data = embedded_name(meta["data"])  # the embedded dataset the checkpoint was trained on
    data, description, classes = load_data(args, base)
    model_classes = family_of(base).num_classes(base)
    if model_classes is None:
        raise UnsupportedModelError(f"{type(base).__name__} has no classification head; tpsvit eval needs a classifier")
    if classes > model_classes:
        raise DatasetError(f"{description} has {classes} classes but the model predicts {model_classes}; "
                           "use a model or checkpoint trained for this dataset")
    if classes < model_classes:
        print(f"tpsvit eval: warning: the model's head predicts {model_classes} classes but {description} has "
              f"{classes}; labels are the dataset's class indices 0..{classes - 1} (sorted folder names), so unless "
              "the model was trained with these labels expect ~0% top-1", file=sys.stderr)
    variants, schedules = variants_from_args(args, base), []
    if args.schedule == "auto":
        variants, schedules = auto_schedules(args, base, variants)
    variants = with_scorer(variants, args.scorer)
    models = {v.label: make_variant(base, v) for v in variants}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, args.amp)
    name = meta.get("model") or args.model
    weights = "transformers" if is_hf_source(name) else ("pretrained" if args.pretrained else "random")
    source = f"{name} from {checkpoint}" if checkpoint else f"{name} ({weights})"
    print(f"{source} on {description} | {format_environment(env)}")
    results = evaluate_many(models, data, batch_size=args.batch_size, device=device, amp=args.amp,
                            progress=not args.no_progress, desc="eval")
    rows = []
    for variant in variants:
        label = variant.label
        rows.append({
            **variant.as_dict(),
            "name": variant.method or "unpatched",
            "amount": variant.amount,
            "gmacs": gmacs(models[label]),
            **results[label],
            "status": weights_status(variant, base, meta),
            "schedule": _schedule_of(variant, schedules),
        })
    print(format_table(rows, COLUMNS))
    count = rows[0]["count"]
    print(f"{count} images; images/s = forward passes during evaluation, batch {args.batch_size}")
    if args.out:
        out = Path(args.out)
        report = {"model": name, "checkpoint": checkpoint, "data": description, "split": args.split or "test",
                  "limit": args.limit, "count": count, "batch_size": args.batch_size, "environment": env,
                  "provenance": {k: v for k, v in meta.items() if k not in ("model_kwargs",)},
                  "schedule": args.schedule, "schedules": [s.as_dict() for _, s in schedules], "rows": rows}
        paths = [
            write_csv(rows, out / "results.csv"),
            write_json(report, out / "results.json"),
            plot_accuracy_vs_gmacs(rows, out / "accuracy_vs_gmacs.png", title=f"{name}, {description.split(' (')[0]}"),
        ]
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def load_calibration(args: argparse.Namespace, model):
    """The first ``--calib-images`` training images: Fashion-MNIST's training split, or ``--calib-data``."""
    from torch.utils.data import DataLoader

    from tpsvit.data.datasets import DEFAULT_DATA_BY_INPUT, FashionMNIST, build_dataset
    from tpsvit.measure.bench import input_size

    if isinstance(args.calib_images, bool) or args.calib_images < 1:
        raise InvalidArgumentError(f"--calib-images must be >= 1, got {args.calib_images}")
    chans, h, w = input_size(model)
    source = args.calib_data
    if source is None:
        source = args.data or DEFAULT_DATA_BY_INPUT.get((chans, h, w))
        dataset = None if source is None else build_dataset(source, train=True, img_size=h, in_chans=chans,
                                                            model=model, limit=args.calib_images)
        if not isinstance(dataset, FashionMNIST):
            raise InvalidArgumentError("--schedule auto on ImageFolder data needs --calib-data DIR, an ImageFolder "
                                       "tree of training images (never the test images)")
    else:
        dataset = build_dataset(source, train=False, img_size=h, in_chans=chans, model=model, limit=args.calib_images)
    if isinstance(dataset, FashionMNIST):
        return dataset.tensors(), f"{len(dataset)} training images"
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers), f"{len(dataset)} from {source}"


def auto_schedules(args: argparse.Namespace, base, variants: list[Variant]) -> tuple[list[Variant], list]:
    """Replace each budget row's schedule by the best one :func:`tpsvit.plan` finds on calibration images."""
    from tpsvit.measure.budget import schedule_gmacs

    budget_rows = [v for v in variants if v.budget and v.method is not None]
    if not budget_rows:
        raise InvalidArgumentError("--schedule auto chooses the schedule of the budget rows; add --budget or --gmacs")
    calib, what = load_calibration(args, base)
    budget = args.budget if args.budget is not None else args.gmacs / schedule_gmacs(base, img_size=args.img_size)
    out, schedules = [], []
    for variant in variants:
        if variant not in budget_rows:
            out.append(variant)
            continue
        chosen, schedule = auto_variant(base, variant, budget, calib, what, args.batch_size, args.img_size)
        out.append(chosen)
        if schedule is not None:
            schedules.append((chosen, schedule))
    return out, schedules


def auto_variant(base, variant: Variant, budget: float, calib, what: str, batch_size: int, img_size=None):
    """``variant`` with the schedule :func:`tpsvit.plan` picks for ``budget`` (printed), and that schedule; a learned
    method without its trained predictors keeps its fixed schedule (schedule None)."""
    from tpsvit.measure.plan import plan

    try:
        schedule = plan(base, variant.method, budget, data=calib, batch_size=batch_size, img_size=img_size,
                        options=dict(variant.options))
    except InvalidArgumentError as err:
        if not get_method(variant.method).learned:
            raise
        print(f"auto schedule: {variant.method} keeps the fixed schedule ({err})")
        return variant, None
    every_block = schedule.r is not None and schedule.locations == tuple(range(len(base.blocks)))
    chosen = dataclasses.replace(variant, keep_rate=schedule.keep_rate if schedule.r is None else None,
                                 r=schedule.r, locations=None if every_block else schedule.locations,
                                 budget=f"{variant.budget}, auto")
    fixed = schedule.fixed
    versus = "" if fixed is None else f"; fixed schedule {fixed.top1:.2f}% ({fixed.family})"
    print(f"auto schedule {schedule}{versus} [{what}]")
    return chosen, schedule


def _shipped_data(data: str | None) -> str:
    """The embedded dataset whose shipped base model ``--data`` picks when no model is given (the default one for
    anything else)."""
    from tpsvit.data.datasets import embedded_name
    from tpsvit.io.assets import DEFAULT_DATA, DEMO_MODELS

    name = embedded_name(data) if data is not None else None
    return name if name in DEMO_MODELS else DEFAULT_DATA


def _schedule_of(variant: Variant, schedules: list) -> str:
    for chosen, schedule in schedules:
        if chosen == variant:
            return f"auto: {schedule.best.family}"
    return "fixed" if variant.budget else ""
