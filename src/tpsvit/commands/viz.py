"""Draw token maps: which tokens a patched model kept at each location and which host each pruned token went into.

Inputs are image files, folders of images, or dataset samples (``--data fashion-mnist --index 0 5 7``); without any,
four Fashion-MNIST test images. The model is a timm name and/or a ``--checkpoint`` (default: the shipped demo model);
its patch is the one recorded in the checkpoint unless ``--method/--keep-rate/--locations`` say otherwise (else eTPS,
keep rate 0.7 at blocks 3, 6, 9).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tpsvit.core.methods import METHODS
from tpsvit.errors import CheckpointError, DatasetError, InvalidArgumentError

if TYPE_CHECKING:
    from torch import nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PATCH = {"method": "etps", "keep_rate": 0.7, "locations": (3, 6, 9)}
DEFAULT_SAMPLES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tpsvit viz``."""
    parser.add_argument("inputs", nargs="*", metavar="IMAGE",
                        help="image files or folders of images (searched recursively)")
    data = parser.add_argument_group("dataset samples")
    data.add_argument("--data", help="'fashion-mnist', 'fashion-mnist-cluttered', 'fashion-mnist-textures', a folder "
                                     "of Fashion-MNIST IDX files or an ImageFolder tree (default without IMAGE: "
                                     f"the embedded dataset of the model's input size, {DEFAULT_SAMPLES} samples)")
    data.add_argument("--split", choices=("test", "train"), default="test", help="dataset split (default: test)")
    pick = data.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, nargs="+", metavar="I", help="sample indices to draw")
    pick.add_argument("--samples", type=int, metavar="N", help=f"draw the first N samples (default {DEFAULT_SAMPLES})")
    model = parser.add_argument_group("model (default: the shipped Fashion-MNIST demo model)")
    model.add_argument("--model", help="timm model name, e.g. deit_small_patch16_224")
    model.add_argument("--checkpoint", help="tpsvit safetensors checkpoint or weights file")
    model.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights for --model")
    patch = parser.add_argument_group("patch (default: the checkpoint's, else etps 0.7 at blocks 3 6 9)")
    patch.add_argument("--method", choices=tuple(METHODS), help="token-reduction method")
    patch.add_argument("--keep-rate", type=float, nargs="+", metavar="R", help="keep rate, one or one per location")
    patch.add_argument("--locations", type=int, nargs="+", metavar="B", help="0-based blocks where tokens are reduced")
    patch.add_argument("--r", type=int, nargs="+", metavar="R", help="ToMe: tokens merged per location")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="tpsvit-viz", help="folder for the PNG files (default: ./tpsvit-viz)")
    out.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100)")
    out.add_argument("--panel-size", type=float, default=None, help="inches per panel (default: by grid size)")
    out.add_argument("--links", action=argparse.BooleanOptionalAction, default=None,
                     help="join each pruned patch to its host by a line (default: only on grids of <= 64 tokens)")


def run(args: argparse.Namespace) -> int:
    """Load and patch the model, preprocess the inputs, write one PNG per image."""
    from tpsvit.viz import visualize

    if args.dpi < 10 or (args.panel_size is not None and args.panel_size <= 0.5):
        raise InvalidArgumentError("--dpi must be >= 10 and --panel-size > 0.5 inches")
    paths = collect_images(args.inputs)  # cheap checks first, before the model is built
    model = load_patched_model(args)
    sources = []
    if paths:
        sources.append(image_files(paths, model))
    if args.data is not None or not args.inputs:
        sources.append(dataset_samples(args.data or _default_data(model), args.split, args.index, args.samples, model))
    written = []
    for source in sources:
        written += visualize(model, source.pop("images"), args.out, panel_size=args.panel_size, dpi=args.dpi,
                             links=args.links, **source)
    for path in written:
        print(path)
    print(f"wrote {len(written)} token map(s) for {model.tps} to {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------- model


def load_patched_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model/--checkpoint`` (or the shipped demo model), patched as the flags say, in eval mode."""
    from tpsvit.io.hf_loading import is_hf_source
    from tpsvit.io.loading import load_model

    name, checkpoint = args.model, args.checkpoint
    if name is None and checkpoint is None:
        checkpoint = _demo_checkpoint(args.method, args.data)
    model = load_model(name, checkpoint, pretrained=args.pretrained).eval()
    _patch_as_asked(model, args)
    if name is not None and checkpoint is None and not args.pretrained and not is_hf_source(name):
        print(f"note: {name} has random weights; pass --pretrained or --checkpoint for meaningful choices",
              file=sys.stderr)
    return model


def _patch_as_asked(model: nn.Module, args: argparse.Namespace) -> None:
    """Keep the checkpoint's patch unless a patch flag is given; fill the flags not given from it or the defaults."""
    from tpsvit.io.loading import patch_spec
    from tpsvit.patch import patch

    recorded = patch_spec(model)
    if recorded is not None and args.method is None and args.keep_rate is None and args.locations is None \
            and args.r is None:
        return
    spec = recorded or DEFAULT_PATCH
    method = args.method or spec["method"]
    locations = args.locations if args.locations is not None else spec["locations"]
    r = args.r if args.r is not None else (spec.get("r") if method == spec["method"] else None)
    keep_rate = args.keep_rate if args.keep_rate is not None else spec.get("keep_rate") or DEFAULT_PATCH["keep_rate"]
    if args.keep_rate is not None:
        r = None
    keep_rate, r = _single(keep_rate), _single(r)
    had_predictors = recorded is not None and METHODS[recorded["method"]].learned
    patch(model, method, keep_rate=keep_rate, locations=tuple(locations), r=r)
    if model.tps.spec.learned and not had_predictors:
        print(f"note: {method}'s predictors are untrained (random); fine-tune with `tpsvit train` for meaningful "
              "choices", file=sys.stderr)


def _single(values):
    """One value for every location when a list holds one value (so it fits other --locations too)."""
    return values[0] if isinstance(values, (list, tuple)) and len(set(values)) == 1 else values


def _demo_checkpoint(method: str | None, data: str | None = None) -> Path:
    """The shipped model for ``data`` (an embedded dataset's name; else the default testbed's), fine-tuned for
    ``method`` when one is shipped."""
    from tpsvit.data.datasets import embedded_name
    from tpsvit.io.assets import DEFAULT_DATA, DEMO_MODELS, demo_checkpoint

    name = embedded_name(data) if data is not None else None
    name = name if name in DEMO_MODELS else DEFAULT_DATA
    try:
        return demo_checkpoint(method if method in DEMO_MODELS[name].finetuned else None, name)
    except CheckpointError:
        raise InvalidArgumentError(
            "no model given and the shipped demo model is missing from tpsvit/assets; pass --model NAME (timm) "
            "or --checkpoint FILE"
        ) from None


# --------------------------------------------------------------------------------------------------- inputs


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files as given and the images in folders (recursively, sorted); missing paths are errors."""
    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InvalidArgumentError(f"folder {item!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise InvalidArgumentError(f"input {item!r} does not exist; give image files or folders, or --data")
    return paths


def image_files(paths: list[Path], model: nn.Module) -> dict:
    """Image files -> ``visualize`` keyword arguments (images preprocessed with the model's timm data config)."""
    import timm.data
    import torch

    from tpsvit.viz import model_data_config

    cfg = model_data_config(model)
    transform = timm.data.create_transform(**cfg)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    images = torch.stack([transform(_open(path, mode)) for path in paths])
    return {"images": images, "names": _unique([p.stem for p in paths]), "mean": cfg["mean"], "std": cfg["std"]}


def _open(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {str(path)!r} ({type(err).__name__}); give a PNG/JPEG file") from None


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _default_data(model: nn.Module) -> str:
    from tpsvit.data.datasets import DEFAULT_DATA_BY_INPUT
    from tpsvit.viz import model_data_config

    return DEFAULT_DATA_BY_INPUT.get(tuple(model_data_config(model)["input_size"]), "fashion-mnist")


def dataset_samples(data: str, split: str, index: list[int] | None, samples: int | None, model: nn.Module) -> dict:
    """Samples of a dataset -> ``visualize`` keyword arguments (names, true labels, class names, mean/std)."""
    import torch

    from tpsvit.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST, build_dataset
    from tpsvit.viz import model_data_config

    cfg = model_data_config(model)
    chans, height, width = cfg["input_size"]
    if height != width:
        raise InvalidArgumentError(f"--data needs a model with square inputs, this one takes {height}x{width}")
    if samples is not None and samples < 1:
        raise InvalidArgumentError(f"--samples {samples} must be >= 1")
    limit = None if index is not None else (samples or DEFAULT_SAMPLES)
    dataset = build_dataset(data, train=split == "train", img_size=height, in_chans=chans, model=model, limit=limit)
    if isinstance(dataset, FashionMNIST):
        mean, std = (FASHION_MNIST_MEAN,) * chans, (FASHION_MNIST_STD,) * chans
    elif chans == 1:  # read as greyscale with one mean/std, as data.grey_imagefolder_transform does
        mean, std = (sum(cfg["mean"]) / len(cfg["mean"]),), (sum(cfg["std"]) / len(cfg["std"]),)
    else:
        mean, std = cfg["mean"], cfg["std"]
    index = list(range(len(dataset))) if index is None else index
    for i in index:
        if not 0 <= i < len(dataset):
            raise InvalidArgumentError(f"--index {i} is outside the {split} split (0..{len(dataset) - 1})")
    items = [dataset[i] for i in index]
    classes = list(dataset.classes)
    from tpsvit.families import family_of

    same_classes = family_of(model).num_classes(model) == len(classes)
    labels = [label if same_classes else classes[label] for _, label in items]
    prefix = f"{dataset.slug}_{split}" if isinstance(dataset, FashionMNIST) else Path(data).name
    return {
        "images": torch.stack([image for image, _ in items]),
        "names": [f"{prefix}_{i}" for i in index],
        "labels": labels,
        "class_names": classes if same_classes else None,
        "mean": mean,
        "std": std,
    }
