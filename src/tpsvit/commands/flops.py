"""GMACs per image of a ViT (timm or transformers), unpatched and under each method (analytic, optional
flop-counter check).

Also home of the model loading and variant helpers shared by ``tpsvit bench``, ``tpsvit eval``, ``tpsvit export`` and
``tpsvit demo`` (their options are in :mod:`tpsvit.commands.options`). torch is imported by the functions that use it,
so that building the parser (``--help``) does not import it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import TYPE_CHECKING

from tpsvit.commands.options import (
    DEFAULT_MODEL,
    add_model_arguments,
    add_threads_argument,
    add_variant_arguments,
    apply_threads,
    squeeze_options_of,
)
from tpsvit.core.config import DEFAULT_LOCATIONS
from tpsvit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from tpsvit.measure.budget import Variant


# --------------------------------------------------------------------------------------------- shared helpers


def load_base_model(args: argparse.Namespace, meta: bool = False, default_model: str | None = DEFAULT_MODEL):
    """The model the options name. ``meta=True`` builds a weightless model on the meta device when no weights are
    asked for (enough for GMACs)."""
    import torch

    from tpsvit.io.hf_loading import is_hf_source
    from tpsvit.io.loading import create_model, load_model

    if args.img_size is not None and (isinstance(args.img_size, bool) or args.img_size < 1):
        raise InvalidArgumentError(f"--img-size {args.img_size} must be a side in pixels >= 1")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    name = args.model or (None if args.checkpoint else default_model)
    if meta and args.checkpoint is None and not args.pretrained and not is_hf_source(name):
        with torch.device("meta"):
            return _check_grid(create_model(name, **kwargs), args.img_size)
    return _check_grid(load_model(name, args.checkpoint, args.pretrained, **kwargs), args.img_size)


def _check_grid(model, img_size):
    """``model``, or an :class:`InvalidArgumentError` when ``--img-size`` leaves it no patch token."""
    from tpsvit.errors import UnsupportedModelError
    from tpsvit.families import family_of

    try:
        grid = family_of(model).grid_size(model)
    except UnsupportedModelError:
        return model  # the command that uses it says why
    if img_size is not None and grid is not None and min(grid) < 1:
        raise InvalidArgumentError(f"--img-size {img_size} is smaller than one patch of this model; give a larger side")
    return model


def variants_from_args(args: argparse.Namespace, base) -> list[Variant]:
    """Unpatched, then each method x keep rate, ToMe at each r, and each method at the budget.

    Without --methods a patched checkpoint is compared at its own patch (keep rates or ToMe's r, locations and squeeze
    options as recorded); otherwise etps at keep 0.7.
    """
    from tpsvit.measure.budget import Variant, plan_variants
    from tpsvit.patch import is_patched

    own = base.tps if is_patched(base) else None
    asked = args.methods or args.keep_rates is not None or args.r or args.locations or args.budget is not None \
        or args.gmacs is not None or squeeze_options_of(args)
    if own is not None and not asked:
        return [Variant(), own_variant(own)]
    methods = args.methods or ([own.method] if own else ["etps"])
    locations = tuple(args.locations) if args.locations else (own.locations if own else DEFAULT_LOCATIONS)
    keep_rates = args.keep_rates
    if keep_rates is None:
        keep_rates = [] if args.r or args.budget is not None or args.gmacs is not None else [0.7]
    return plan_variants(base, methods, keep_rates, args.r or (), locations, args.budget, args.gmacs, args.img_size,
                         options=squeeze_options_of(args))


def own_variant(config) -> Variant:
    """The :class:`Variant` that re-applies a recorded patch (``model.tps``) as it is."""
    from tpsvit.measure.budget import Variant
    from tpsvit.measure.calibrate import PAPER

    def one_or_all(values):
        return values[0] if len(set(values)) == 1 else tuple(values)

    defaults = {**PAPER, "fuse": "sum"}  # the paper's squeeze and the release's EViT fuse
    options = tuple((k, getattr(config, k)) for k, v in defaults.items() if getattr(config, k) != v)
    if config.r is not None:
        every_block = config.locations == tuple(range(config.depth))
        return Variant(config.method, r=one_or_all(config.r), locations=None if every_block else config.locations,
                       options=options)
    return Variant(config.method, keep_rate=one_or_all(config.keep_rate), locations=config.locations,
                   scorer=config.scorer if config.scorer == "random" else "default", options=options)


def with_scorer(variants: list[Variant], scorer: str) -> list[Variant]:
    """``scorer="random"``: every variant that has a scorer to replace gets random scores (ToMe and the unpatched
    model stay as they are, as reference rows)."""
    if scorer == "default":
        return variants
    return [v if v.method in (None, "tome") else dataclasses.replace(v, scorer=scorer) for v in variants]


def make_variant(base, variant: Variant):
    """A copy of ``base`` patched (or unpatched) as ``variant``; predictors of the same locations are kept."""
    return variant.apply(copy.deepcopy(base))


# ---------------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_variant_arguments(parser)
    parser.add_argument("--per-block", action="store_true", help="print the per-block breakdown of each variant")
    parser.add_argument("--check", action="store_true",
                        help="also count with torch.utils.flop_counter on a random-weight forward pass")
    parser.add_argument("--json", metavar="PATH", help="save the table (and breakdowns) as JSON")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tpsvit.measure.evaluation import format_table, write_json
    from tpsvit.measure.flops import counted_gmacs, format_breakdown, gmacs, gmacs_per_block

    apply_threads(args)
    base = load_base_model(args, meta=not args.check)
    variants = variants_from_args(args, base)
    rows, full = [], None
    for variant in variants:
        model = make_variant(base, variant)
        value = gmacs(model, args.img_size)
        full = value if variant.method is None else full
        breakdown = gmacs_per_block(model, args.img_size)
        row = {**variant.as_dict(), "amount": variant.amount, "gmacs": value,
               "tokens_out": breakdown["blocks"][-1]["tokens_mlp"], "breakdown": breakdown}
        if args.check:
            row["counted_gmacs"] = counted_gmacs(model, args.img_size)
            row["difference_pct"] = 100 * (value - row["counted_gmacs"]) / row["counted_gmacs"]
        rows.append(row)
        if args.per_block:
            print(f"\n{variant.label}\n{format_breakdown(breakdown)}")
    for row in rows:
        row["fraction"] = row["gmacs"] / full if full else None
    columns = [("label", "variant", ""), ("amount", "keep / r", ""), ("tokens_out", "tokens out", "d"),
               ("gmacs", "GMACs", ".3f"), ("fraction", "of unpatched", ".1%")]
    if args.check:
        columns += [("counted_gmacs", "flop counter", ".3f"), ("difference_pct", "diff %", "+.2f")]
    name = args.model or (args.checkpoint and f"checkpoint {args.checkpoint}") or DEFAULT_MODEL
    print(f"{name}: analytic GMACs per image (multiply-accumulates)")
    print(format_table(rows, columns))
    if args.json:
        write_json({"model": name, "img_size": args.img_size, "rows": rows}, args.json)
        print(f"saved {args.json}")
    return 0
