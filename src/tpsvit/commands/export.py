"""Export a patched model to ONNX (patch recorded in the file's metadata) and check it once in onnxruntime.

    tpsvit export --method etps --keep-rate 0.7 --onnx model.onnx                      # the shipped demo model
    tpsvit export --model deit_small_patch16_224 --method etps --budget 0.35 --onnx deit_s.onnx --dynamic-batch

The input size is the model's (or --img-size) and is fixed in the file, as is the patch; with --dynamic-batch the
batch dimension is free. Needs ``pip install 'tps-vit[export]'``.
"""

from __future__ import annotations

import argparse
import json

from tpsvit.commands.options import add_model_arguments
from tpsvit.core.methods import METHODS
from tpsvit.errors import InvalidArgumentError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_model=None, default_text="the shipped demo checkpoint")
    group = parser.add_argument_group("the patch (default: a checkpoint's own patch, else etps at keep 0.7)")
    group.add_argument("--method", choices=[*METHODS, "none"],
                       help=f"token-reduction method: {', '.join(METHODS)}, or none (export the unpatched model)")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--keep-rate", nargs="+", type=float, metavar="RATE",
                        help="keep rate in (0, 1], one for every location or one per location")
    amount.add_argument("--r", type=int, metavar="R", help="ToMe: tokens merged in every block")
    amount.add_argument("--budget", type=float, metavar="FRACTION",
                        help="fraction of the unpatched GMACs (e.g. 0.35); the keep rate (ToMe: r) is solved for it")
    group.add_argument("--locations", nargs="+", type=int, metavar="BLOCK",
                       help="0-based blocks where tokens are reduced (default: 3 6 9, or the checkpoint's)")
    out = parser.add_argument_group("output")
    out.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    out.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="batch of the example input, fixed in the file unless --dynamic-batch (default: 1)")
    out.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    out.add_argument("--atol", type=float, default=1e-3,
                     help="largest allowed difference of onnxruntime's logits to PyTorch's (default: 1e-3)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")


def choose_variant(args: argparse.Namespace, base):
    """The one patch the options ask for (a :class:`~tpsvit.budget.Variant`), via the flops/bench machinery."""
    from tpsvit.commands.flops import variants_from_args

    if args.method == "none":
        if args.keep_rate or args.r is not None or args.budget is not None or args.locations:
            raise InvalidArgumentError("--method none exports the unpatched model; drop --keep-rate/--r/--budget/"
                                       "--locations")
        return variants_from_args(_namespace(args, methods=None, keep_rates=[]), base)[0]
    if args.r is not None and args.method not in (None, "tome"):
        raise InvalidArgumentError(f"--r is ToMe's; use --method tome or --keep-rate with {args.method}")
    method = args.method or ("tome" if args.r is not None else None)
    keep_rates = None
    if args.keep_rate:
        keep_rates = [args.keep_rate[0] if len(args.keep_rate) == 1 else tuple(args.keep_rate)]
    ns = _namespace(args, methods=[method] if method else None, keep_rates=keep_rates)
    return variants_from_args(ns, base)[-1]


def _namespace(args, methods, keep_rates):
    return argparse.Namespace(methods=methods, keep_rates=keep_rates, r=[args.r] if args.r is not None else None,
                              locations=args.locations, budget=args.budget, gmacs=None, img_size=args.img_size)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from tpsvit.commands.flops import load_base_model, make_variant
    from tpsvit.io.export import check_writable, export_onnx, require_export_dependencies
    from tpsvit.io.loading import checkpoint_metadata

    require_export_dependencies()  # before loading anything
    check_writable(Path(args.onnx))
    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.model is None and args.checkpoint is None:
        from tpsvit.io.assets import demo_checkpoint

        args.checkpoint = str(demo_checkpoint())  # exports need no data: the default testbed's model
    base = load_base_model(args, default_model=None).eval()
    meta = checkpoint_metadata(args.checkpoint) if args.checkpoint else {}
    name = args.model or meta.get("model") or "model"
    variant = choose_variant(args, base)
    model = make_variant(base, variant).eval()
    extra = {"variant": variant.label}
    if args.checkpoint:
        extra["checkpoint"] = args.checkpoint
    result = export_onnx(model, args.onnx, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                         img_size=args.img_size, model_name=name, metadata=extra, atol=args.atol)
    shape = "x".join(map(str, result["input_shape"]))
    print(f"wrote {result['path']}: {name} {variant.label}, input {shape}")
    print(f"patch (ONNX metadata tpsvit.patch): {json.dumps(json.loads(result['metadata']['tpsvit.patch']))}")
    print(f"onnxruntime vs PyTorch logits, batch {result['check_batch_size']}: max |difference| "
          f"{result['max_abs_diff']:.3g} (allowed {args.atol:g})")
    return 0
