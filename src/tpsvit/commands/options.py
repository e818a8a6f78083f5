"""Model and comparison options shared by ``tpsvit flops``, ``tpsvit bench``, ``tpsvit eval`` and ``tpsvit export``.

Only argparse and torch-free modules here: building a command's parser (``--help``, a bad option) must not import
torch or timm. What the options load and compare is in :mod:`tpsvit.commands.flops`.
"""

from __future__ import annotations

import argparse

from tpsvit.core.methods import METHODS

DEFAULT_MODEL = "deit_small_patch16_224"


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL,
                        default_text: str | None = None) -> None:
    """--model, --checkpoint, --pretrained, --img-size."""
    group = parser.add_argument_group("model")
    default = f" (default: {default_text or default_model})" if default_text or default_model else ""
    group.add_argument("--model", metavar="NAME",
                       help=f"timm model name, hf:ORG/NAME or a transformers save_pretrained folder{default}")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="weights: a tpsvit safetensors checkpoint (rebuilds its model and patch) or a torch file")
    group.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs internet)")
    group.add_argument("--img-size", type=int, metavar="PX", help="input side (default: the model's)")


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """--methods, --keep-rates, --r, --locations, --budget / --gmacs."""
    group = parser.add_argument_group("what to compare with the unpatched model")
    group.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                       help=f"token-reduction methods: {', '.join(METHODS)} (default: the checkpoint's own, else etps)")
    group.add_argument("--keep-rates", nargs="+", type=float, metavar="RATE",
                       help="keep rates, each applied at every location (default: 0.7 unless --r/--budget/--gmacs)")
    group.add_argument("--r", nargs="+", type=int, metavar="R", help="ToMe: tokens merged in every block (e.g. 13)")
    group.add_argument("--locations", nargs="+", type=int, metavar="BLOCK",
                       help="0-based blocks where tokens are reduced (default: 3 6 9)")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, metavar="FRACTION",
                        help="also run each method at this fraction of the unpatched GMACs (e.g. 0.35); the keep "
                             "rate (ToMe: r) is solved analytically")
    budget.add_argument("--gmacs", type=float, metavar="G", help="also run each method at this many GMACs (e.g. 1.6)")
    squeeze = parser.add_argument_group("squeeze options of etps / dtps (beyond the paper unless noted; `tpsvit "
                                        "calibrate` chooses them on training images)")
    squeeze.add_argument("--temperature", type=float, metavar="T",
                         help="similarity temperature of the squeeze (the paper's: 1)")
    squeeze.add_argument("--squeeze-floor", type=float, metavar="TAU",
                         help="a pruned token whose best host has cosine < TAU is not squeezed (default: off)")
    squeeze.add_argument("--squeeze-floor-action", choices=("drop", "fuse"),
                         help="what a token below the floor does: drop it (default) or fuse the ones below into "
                              "one extra token (EViT's rule)")
    squeeze.add_argument("--squeeze-weighting", choices=("similarity", "importance"),
                         help="donor weights: similarity (the paper) or importance (x n * the donor's importance "
                              "share)")


def squeeze_options_of(args: argparse.Namespace) -> dict:
    """The squeeze keywords of :func:`tpsvit.patch` given on the command line ({} when none is)."""
    names = ("temperature", "squeeze_floor", "squeeze_floor_action", "squeeze_weighting")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
