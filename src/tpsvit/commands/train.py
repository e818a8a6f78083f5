"""Train or fine-tune a model with a recipe (the paper's dTPS/eTPS recipes, Fashion-MNIST), on CPU, GPU or torchrun.

Learning-rate rule: the recipe's ``lr`` is for its *global* batch (``batch_size`` summed over ranks and accumulation
steps) and is used as written, never rescaled; when you change --batch-size, scale --lr yourself (linear rule:
lr x new / old). Every parameter trains at ``lr`` (the release); ``--backbone-lr-scale`` puts the backbone at
``lr x scale``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from tpsvit.commands.options import add_threads_argument
from tpsvit.errors import InvalidArgumentError

DEFAULT_RECIPE = "imagenet-dtps"

# flag destination -> config key (flags default to "not given", so only what the user types overrides the recipe)
FLAG_KEYS = {
    "out": "out", "epochs": "epochs", "seed": "seed", "model": "model", "checkpoint": "checkpoint",
    "teacher": "teacher", "pretrained": "pretrained", "method": "method", "keep_rate": "keep_rate",
    "locations": "locations", "r": "r", "budget": "budget", "data": "data", "batch_size": "batch_size",
    "accum_steps": "accum_steps", "device_batch": "device_batch", "lr": "lr", "backbone_lr_scale": "backbone_lr_scale",
    "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs", "limit": "limit", "val_limit": "val_limit",
    "steps": "steps_per_epoch", "workers": "workers", "amp": "amp", "grad_checkpointing": "grad_checkpointing",
    "device": "device", "save_every_steps": "save_every_steps", "eval_every": "eval_every", "img_size": "img_size",
    "resume": "resume", "threads": "threads", "schedule": "schedule", "calib_images": "calib_images",
    "predictor_init": "predictor_init", "predictor_loss": "predictor_loss", "task": "task",
}

EPILOG = """\
examples:
  tpsvit train --recipe fmnist-scratch --out runs/mini-deit --epochs 12 --seed 0
  tpsvit train --recipe fmnist-finetune --checkpoint runs/mini-deit/best.safetensors --method dtps --keep-rate 0.7
  tpsvit train --recipe imagenet-dtps --data /data/imagenet --set drop_path=0.0 --set warmup_epochs=3
  torchrun --nproc_per_node 8 -m tpsvit.cli train --recipe imagenet-dtps --data /data/imagenet
  tpsvit train --recipe imagenet-dtps --data /data/imagenet --device-batch 128 --grad-checkpointing
                                                      (one GPU: global batch 1024 = 128 x 8 accumulation steps)
  tpsvit train --resume --out runs/mini-deit          (continues exactly from runs/mini-deit/last.pt)
  tpsvit train --recipe cluttered-segment --threads 1  (segmentation: backbone + conv head on the restored grid)
  tpsvit train --recipe cluttered-segment --set seg_head=linear --set restore=frozen --set freeze_backbone=true

learning rate: the recipe's lr is for its global batch and is used as written (no automatic scaling).
Outputs in --out: last.pt (resumable state), best.safetensors, final.safetensors (for `tpsvit eval --checkpoint`),
metrics.csv, metrics.json, progress.json.
--task segment: the safetensors hold the backbone and the dense head (tpsvit.dense.load_segmenter reads them); the
metrics are test_miou / test_pixel_acc where classification has test_top1 / test_top5.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tpsvit train``."""
    from tpsvit.train.recipe import METHOD_NAMES, recipe_names

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (__doc__ or "").strip()
    parser.epilog = EPILOG
    S = argparse.SUPPRESS
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", default=None, metavar="NAME|FILE",
                     help=f"{', '.join(recipe_names())} or a YAML file (default: {DEFAULT_RECIPE}; with --resume: "
                          "the resumed run's config)")
    run.add_argument("--out", default=S, metavar="DIR", help="output folder (default: the recipe's)")
    run.add_argument("--epochs", type=int, default=S, metavar="N")
    run.add_argument("--seed", type=int, default=S)
    run.add_argument("--resume", action="store_true", default=S,
                     help="continue from OUT/last.pt exactly (mid-epoch too); with no last.pt it starts fresh in a "
                          "new or empty OUT (with a warning) and fails in a folder holding other files")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any recipe key (YAML value), repeatable; e.g. --set model_kwargs='{depth: 4}'")
    run.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    run.add_argument("--list-keys", action="store_true", help="list every config key with its default and exit")
    run.add_argument("--task", choices=("classify", "segment"), default=S,
                     help="classify, or segment: per-pixel labels of the cluttered testbed, a dense head (config "
                          "keys seg_head: linear|conv, restore: host|frozen|zeros, freeze_backbone: true|false, "
                          "via --set) on the restored patch grid, per-pixel cross-entropy, mIoU")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=S, metavar="NAME",
                       help="timm model name, or a transformers classifier: hf:ORG/NAME or a save_pretrained folder")
    model.add_argument("--checkpoint", default=S, metavar="FILE",
                       help="starting weights (tpsvit safetensors, torch); 'shipped': the base model shipped for the "
                            "recipe's embedded dataset (else the mini-DeiT's); 'shipped:DATA': the one shipped for "
                            "DATA (a warm start from another testbed)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=S,
                       help="start from timm's pretrained weights")
    model.add_argument("--teacher", default=S, metavar="auto|none|FILE",
                       help="distillation teacher: auto = the starting model unpatched and frozen")
    model.add_argument("--img-size", type=int, default=S, metavar="PX")
    reduce = parser.add_argument_group("token reduction")
    reduce.add_argument("--method", choices=METHOD_NAMES, default=S)
    reduce.add_argument("--keep-rate", type=float, nargs="+", default=S, metavar="RATE",
                        help="per location, relative to the patch tokens alive there (one value or one per location)")
    reduce.add_argument("--locations", type=int, nargs="+", default=S, metavar="BLOCK", help="0-based blocks")
    reduce.add_argument("--r", type=int, default=S, help="ToMe: tokens merged per location")
    if importlib.util.find_spec("tpsvit.measure.budget") is not None:
        reduce.add_argument("--budget", type=float, default=S, metavar="FRACTION",
                            help="fraction of the unpatched GMACs; the keep rate is solved to meet it")
    reduce.add_argument("--schedule", choices=("fixed", "auto"), default=S,
                        help="with --budget: fixed = keep rate solved at --locations; auto = the best schedule family "
                             "at the same GMACs by top-1 on the first --calib-images training images (tpsvit.plan)")
    reduce.add_argument("--calib-images", type=int, default=S, metavar="N")
    reduce.add_argument("--predictor-init", choices=("release", "class-attention"), default=S,
                        help="dtps/dynamicvit: the release's init, or a warm start distilling class attention "
                             "(beyond the paper)")
    reduce.add_argument("--predictor-loss", choices=("gumbel", "attention-distill"), default=S,
                        help="dtps/dynamicvit: Gumbel straight-through (the paper) or class-attention ranking "
                             "distillation with top-k decisions (beyond the paper)")
    data = parser.add_argument_group("data and schedule")
    data.add_argument("--data", default=S, metavar="NAME|DIR",
                      help="fashion-mnist, fashion-mnist-cluttered, fashion-mnist-textures, a Fashion-MNIST IDX "
                           "folder, or an ImageFolder "
                           "root (with train/ val/)")
    data.add_argument("--limit", type=int, default=S, metavar="N", help="train on N images only")
    data.add_argument("--val-limit", type=int, default=S, metavar="N", help="evaluate on N images only")
    data.add_argument("--steps", type=int, default=S, metavar="N", help="at most N optimiser steps per epoch")
    data.add_argument("--batch-size", type=int, default=S, metavar="N", help="global batch (all ranks)")
    data.add_argument("--accum-steps", type=int, default=S, metavar="N", help="gradient accumulation steps")
    data.add_argument("--device-batch", type=int, default=S, metavar="N",
                      help="at most N images per device and micro-step; accumulation steps are raised automatically "
                           "to keep the global batch (and the lr); may change on --resume")
    data.add_argument("--lr", type=float, default=S, help="lr for the global batch (not rescaled)")
    data.add_argument("--backbone-lr-scale", type=float, default=S, metavar="X")
    data.add_argument("--weight-decay", type=float, default=S)
    data.add_argument("--warmup-epochs", type=float, default=S)
    data.add_argument("--workers", type=int, default=S, help="DataLoader workers per rank (ImageFolder)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N")
    add_threads_argument(engine, default=S)  # the recipe key `threads`: applied by the training loop
    engine.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=S,
                        help="autocast; auto: bf16 on GPUs of compute capability >= 8.0, fp16 with a gradient "
                             "scaler below (V100, T4), none on CPU")
    engine.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=S,
                        help="recompute every block in backward (patched blocks too): far less activation memory, "
                             "about a third more compute")
    engine.add_argument("--save-every-steps", type=int, default=S, metavar="N", help="also checkpoint every N steps")
    engine.add_argument("--eval-every", type=int, default=S, metavar="N", help="evaluate every N epochs")
    _add_recipe_defaults(parser)


def _add_recipe_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each recipe-backed option's default to its help: the recipe's value (shown for the default recipe)."""
    from tpsvit.train.recipe import TrainConfig, load_recipe

    values = {**TrainConfig().to_dict(), **load_recipe(DEFAULT_RECIPE)}
    for action in parser._actions:
        key = FLAG_KEYS.get(action.dest)
        if key is None or key == "resume" or "default" in (action.help or ""):
            continue
        value = values.get(key)
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        note = f"default: from the recipe; {DEFAULT_RECIPE}: {shown}".replace("%", "%%")
        action.help = f"{action.help} ({note})" if action.help else note


def _overrides(args: argparse.Namespace) -> dict:
    from tpsvit.train.recipe import parse_set

    values = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if hasattr(args, dest)}
    if "keep_rate" in values and len(values["keep_rate"]) == 1:
        values["keep_rate"] = values["keep_rate"][0]
    values.update(parse_set(args.set))
    return values


def build_config(args: argparse.Namespace):
    """The resolved TrainConfig for these command-line options."""
    from tpsvit.train.checkpoint import load_state
    from tpsvit.train.recipe import resolve

    overrides = _overrides(args)
    if args.recipe is None and overrides.get("resume"):
        out = overrides.get("out")
        if out is None:
            raise InvalidArgumentError("--resume without --recipe needs --out DIR of the run to continue")
        state = load_state(out)
        if state is not None:
            return resolve(dict(state["config"]), overrides)
    return resolve(args.recipe or DEFAULT_RECIPE, overrides)


def run(args: argparse.Namespace) -> int:
    """Run ``tpsvit train``."""
    from tpsvit.train import train
    from tpsvit.train.recipe import TrainConfig

    if args.list_keys:
        for key, value in TrainConfig().to_dict().items():
            print(f"{key}: {json.dumps(value)}")
        return 0
    config = build_config(args)
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    results = train(config)
    if results.get("final"):
        best, what = results.get("best_top1"), "top-1"
        if "best_miou" in results:
            best, what = results["best_miou"], "mIoU"
        summary = f"best test {what} {best:.2f}%" if best is not None else "no evaluation"
        print(f"tpsvit train: done, {summary}; final weights {results['final']}, best "
              f"{Path(results['out']) / 'best.safetensors'}", file=sys.stderr)
    return 0
