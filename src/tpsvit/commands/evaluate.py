"""Top-1/top-5 accuracy, GMACs and images/s of the unpatched and patched model on a labelled dataset.

Data: Fashion-MNIST (``--data fashion-mnist`` or a folder of its IDX files; the default for 28x28 grey models) or an
ImageFolder tree (ImageNet val layout). Every variant is evaluated in the same pass over the data; images/s is the
forward time measured during that pass. Writes ``results.csv``, ``results.json`` and ``accuracy_vs_gmacs.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tpsvit.bench import environment, format_environment, input_size
from tpsvit.budget import Variant
from tpsvit.commands.flops import (
    add_model_arguments,
    add_variant_arguments,
    load_base_model,
    make_variant,
    variants_from_args,
)
from tpsvit.data import FashionMNIST, build_dataset, num_classes_of
from tpsvit.errors import DatasetError
from tpsvit.evaluation import evaluate_many, format_table, plot_accuracy_vs_gmacs, write_csv, write_json
from tpsvit.flops import gmacs
from tpsvit.loading import checkpoint_metadata
from tpsvit.methods import get_method
from tpsvit.patch import PREDICTORS, is_patched

COLUMNS = [
    ("name", "method", ""),
    ("amount", "keep / r", ""),
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
                       help="'fashion-mnist', a folder of Fashion-MNIST IDX files, or an ImageFolder tree "
                            "root/<class>/<image> (default: fashion-mnist for 28x28 grey models)")
    group.add_argument("--split", choices=["test", "train"], default="test", help="Fashion-MNIST split (default: test)")
    group.add_argument("--limit", type=int, metavar="N", help="evaluate N images only (a deterministic subset)")
    group.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="ImageFolder loader processes (default: up to 4)")
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
    chans, h, w = input_size(model)
    data = args.data
    if data is None:
        if (chans, h, w) != (1, 28, 28):
            raise DatasetError(f"this model takes {chans}x{h}x{w} images; pass --data with an ImageFolder tree "
                               "(root/<class>/<image>) or 'fashion-mnist'")
        data = "fashion-mnist"
    dataset = build_dataset(data, train=args.split == "train", img_size=h, in_chans=chans, model=model,
                            limit=args.limit)
    classes = num_classes_of(dataset)
    if isinstance(dataset, FashionMNIST):
        return dataset.tensors(), f"Fashion-MNIST {args.split} ({dataset.root})", classes
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=torch.cuda.is_available())
    return loader, f"ImageFolder {data}", classes


def run(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint
    if args.model is None and checkpoint is None:
        from tpsvit.assets import demo_checkpoint

        checkpoint = args.checkpoint = str(demo_checkpoint())
    base = load_base_model(args, default_model=None)  # reads and checks the checkpoint first
    meta = checkpoint_metadata(checkpoint) if checkpoint else {}
    data, description, classes = load_data(args, base)
    model_classes = getattr(base, "num_classes", classes)
    if classes > model_classes:
        raise DatasetError(f"{description} has {classes} classes but the model predicts {model_classes}; "
                           "use a model or checkpoint trained for this dataset")
    variants = variants_from_args(args, base)
    models = {v.label: make_variant(base, v) for v in variants}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, args.amp)
    name = meta.get("model") or args.model
    source = f"{name} from {checkpoint}" if checkpoint else f"{name} ({'pretrained' if args.pretrained else 'random'})"
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
        })
    print(format_table(rows, COLUMNS))
    count = rows[0]["count"]
    print(f"{count} images; images/s = forward passes during evaluation, batch {args.batch_size}")
    if args.out:
        out = Path(args.out)
        report = {"model": name, "checkpoint": checkpoint, "data": description, "split": args.split,
                  "limit": args.limit, "count": count, "batch_size": args.batch_size, "environment": env,
                  "provenance": {k: v for k, v in meta.items() if k not in ("model_kwargs",)}, "rows": rows}
        paths = [
            write_csv(rows, out / "results.csv"),
            write_json(report, out / "results.json"),
            plot_accuracy_vs_gmacs(rows, out / "accuracy_vs_gmacs.png", title=f"{name}, {description.split(' (')[0]}"),
        ]
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
