"""Token maps: which patch tokens a patched model kept at each location, and which host each pruned one went into.

Each host's group (the host and every patch squeezed / merged into it, followed through earlier locations) gets one
colour over the image: kept tokens are outlined, pruned patches are tinted with their host's colour and joined to it by
a line, dropped patches (DynamicViT) are grey and EViT's fused token is hatched black.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor, nn

from tpsvit.core.trace import Trace
from tpsvit.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from tpsvit.errors import InvalidArgumentError, UnsupportedModelError
from tpsvit.families import family_of, logits_of
from tpsvit.measure.bench import input_size
from tpsvit.patch import is_patched, tracing

DROPPED = -1  # token_groups: the patch's token was dropped (DynamicViT)
FUSED = -2  # token_groups: the patch's token went into EViT's fused token (which has no grid cell)

# Host colours, most distinct first (tab10 without grey, then three more).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b",
           "#393b79", "#e7ba52", "#7b4173")
FUSED_COLOR = "#111111"
DROPPED_GREY = 0.82
PRUNED_TINT = 0.55  # share of the host's colour in a pruned patch
MAX_LINKED_TOKENS = 64  # host links are drawn by default up to this many grid tokens
HEADER_IN, FOOTER_IN = 0.55, 0.45  # sum is 1 inch  # inches above the panels (title) and below them (legend)
METHOD_NAMES = {"etps": "eTPS", "dtps": "dTPS", "evit": "EViT", "dynamicvit": "DynamicViT", "tome": "ToMe"}
VERBS = {"squeeze": "squeezed into", "merge": "merged into", "fuse_one": "fused", "drop": "dropped"}


def token_groups(trace: Trace, upto: int, num_patches: int | None = None) -> Tensor:
    """(B, num_patches): for each original patch, the grid cell of the token it belongs to after ``upto`` locations.

    A patch whose token survived is its own cell; a pruned patch gets its host's cell (hosts followed through all
    earlier locations); :data:`DROPPED` (-1) marks a dropped patch, :data:`FUSED` (-2) one inside EViT's fused token.
    ``upto=0`` (or an empty trace, e.g. keep rate 1) gives every patch its own cell; then ``num_patches`` is needed.
    """
    if upto == 0 or not trace.locations:
        if num_patches is None:
            raise ValueError("num_patches is needed when nothing was reduced")
        batch = trace.locations[0].kept.shape[0] if trace.locations else 1
        return torch.arange(num_patches).expand(batch, -1)
    step = trace.locations[upto - 1]
    assign = trace.assignment(upto=upto)
    cells = step.positions.gather(1, step.kept).masked_fill(step.positions.gather(1, step.kept) < 0, FUSED)
    extra = step.num_out - cells.shape[1]
    if extra:
        cells = torch.cat([cells, cells.new_full((cells.shape[0], extra), FUSED)], dim=1)
    return torch.where(assign >= 0, cells.gather(1, assign.clamp(min=0)), DROPPED)


def model_data_config(model: nn.Module) -> dict:
    """timm's data config (input_size, mean, std, interpolation, crop) for the input size ``model`` really takes.

    The input size comes from the patch embedding (models built with another ``img_size`` than their pretrained
    config). Grey models without a 1-channel mean/std in their pretrained config get Fashion-MNIST's statistics.
    """
    import timm.data

    in_chans, height, width = input_size(model)
    cfg = timm.data.resolve_data_config({"input_size": (in_chans, height, width)}, model=model)
    if len(cfg["mean"]) != in_chans:
        if in_chans == 1:
            cfg["mean"], cfg["std"] = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
        else:
            cfg["mean"], cfg["std"] = (cfg["mean"][0],) * in_chans, (cfg["std"][0],) * in_chans
    return cfg


def _make_folder(out: Path) -> None:
    """``out`` and its parents created; a file in the way or no permission is an :class:`InvalidArgumentError`."""
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"cannot write token maps into {str(out)!r}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidArgumentError(f"cannot create the folder {str(out)!r}: {err.strerror or err}") from None


def visualize(
    model: nn.Module,
    images: Tensor,
    out_dir: str | os.PathLike | None = None,
    *,
    names: Sequence[str] | None = None,
    labels: Sequence[int | str] | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    denormalize: Callable[[Tensor], Tensor] | None = None,
    panel_size: float | None = None,
    dpi: int = 100,
    max_columns: int = 5,
    batch_size: int = 16,
    links: bool | None = None,
) -> list[Path] | list[Figure]:
    """Draw one token map per image: the input, then one panel per reduction location of the patched ``model``.

    Args:
        model: a model patched with :func:`tpsvit.patch` (run in eval mode here, then put back in its mode).
        images: (B, C, H, W) or (C, H, W), normalised as the model expects.
        out_dir: write ``<name>_<method>.png`` files there and return their paths; None returns the figures.
        names: one name per image for titles and file names (default ``image_000``, ...).
        labels: true classes (indices into ``class_names``, or names), shown beside the prediction.
        class_names: names of the model's classes (default: ImageNet-1k names for 1000-class models, else indices).
        mean, std: the normalisation to undo for display (default: the model's timm data config).
        denormalize: instead of mean/std, a function from normalised (B, C, H, W) images to [0, 1] images.
        panel_size: inches per panel (default 2.5, or 3.5 for grids over 8x8); dpi: pixels per inch. Each PNG is
            ``cols * panel_size`` by ``rows * panel_size + 1`` inches, cols = min(locations + 1, max_columns),
            rows = ceil((locations + 1) / cols).

    Returns:
        The written paths, or the matplotlib figures when ``out_dir`` is None.
        batch_size: images run through the model at once.
        links: join each pruned patch to its host by a line (default: only on grids of at most 64 tokens, where
            the lines stay readable; on larger grids the host colours alone tell where a patch went).
    """
    if not is_patched(model):
        raise UnsupportedModelError("the model is not patched; call tpsvit.patch(model, method, ...) first")
    images = _check_images(images, model)
    if names is not None and len(names) != len(images):
        raise InvalidArgumentError(f"got {len(names)} names for {len(images)} images; give one name per image")
    if labels is not None and len(labels) != len(images):
        raise InvalidArgumentError(f"got {len(labels)} labels for {len(images)} images; give one label per image")
    names = list(names) if names is not None else [f"image_{i:03d}" for i in range(len(images))]
    display = _display_images(images, model, mean, std, denormalize)
    grid = family_of(model).grid_size(model)
    if panel_size is None:
        panel_size = 2.5 if max(grid) <= 8 else 3.5
    if links is None:
        links = grid[0] * grid[1] <= MAX_LINKED_TOKENS
    class_names = class_names if class_names is not None else _default_class_names(model)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _make_folder(out)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        probs, trace = _run(model, chunk)
        panels = _panel_groups(model, trace, grid[0] * grid[1])
        for i in range(len(chunk)):
            b = start + i
            title = _title(model, names[b], probs[i], None if labels is None else labels[b], class_names)
            fig = _draw(display[b], [(label, groups[i].numpy()) for label, groups in panels], grid,
                        model.tps.spec.reducer, title, panel_size, dpi, max_columns, links)
            if out is None:
                results.append(fig)
            else:
                path = out / f"{_safe(names[b])}_{model.tps.method}.png"
                fig.savefig(path, dpi=dpi)
                results.append(path)
    return results


# ----------------------------------------------------------------------------------------------- model side


def _check_images(images, model: nn.Module) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() not in (3, 4) or not images.is_floating_point():
        raise InvalidArgumentError("images must be a float tensor (B, C, H, W) or (C, H, W), normalised for the model")
    images = images if images.dim() == 4 else images.unsqueeze(0)
    expected = tuple(model_data_config(model)["input_size"])
    if tuple(images.shape[1:]) != expected:
        raise InvalidArgumentError(
            f"images are {'x'.join(map(str, images.shape[1:]))} (C x H x W) but the model takes "
            f"{'x'.join(map(str, expected))}; preprocess them with the model's data config"
        )
    return images


def _run(model: nn.Module, images: Tensor) -> tuple[Tensor, Trace]:
    was_training = model.training
    model.eval()  # the trace is recorded on the gather path
    try:
        param = next(model.parameters())
        with torch.inference_mode(), tracing(model) as trace:
            logits = logits_of(model(images.to(param.device, param.dtype)))
    finally:
        model.train(was_training)
    return logits.float().softmax(dim=-1).cpu(), trace


def _panel_groups(model: nn.Module, trace: Trace, num_patches: int) -> list[tuple[str, Tensor]]:
    """(panel title, (B, num_patches) token groups) for each configured location."""
    steps = [step.block for step in trace.locations]
    panels, tokens = [], num_patches
    for block in model.tps.locations:
        upto = sum(1 for b in steps if b <= block)
        if upto and trace.locations[upto - 1].block == block:
            tokens = trace.locations[upto - 1].num_out
        groups = token_groups(trace, upto, num_patches).cpu()
        panels.append((f"block {block}: {tokens} of {num_patches} tokens", groups))
    return panels


def _default_class_names(model: nn.Module) -> list[str] | None:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    labels = getattr(getattr(model, "config", None), "id2label", None) or {}  # transformers classifiers
    if labels and any(str(name) != f"LABEL_{index}" for index, name in labels.items()):
        return [str(labels[i]).split(",")[0] for i in range(len(labels))]

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def _display_images(images: Tensor, model: nn.Module, mean, std, denormalize) -> np.ndarray:
    """(B, H, W, 3) float numpy images in [0, 1] for display."""
    x = images.detach().float().cpu()
    if denormalize is not None:
        x = denormalize(x)
    else:
        cfg = model_data_config(model)
        mean = torch.tensor(cfg["mean"] if mean is None else mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(cfg["std"] if std is None else std, dtype=torch.float32).reshape(-1, 1, 1)
        if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
            raise InvalidArgumentError(f"mean/std need 1 or {x.shape[1]} values (one per channel)")
        x = x * std + mean
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def _title(model: nn.Module, name: str, probs: Tensor, label: int | str | None, class_names) -> str:
    def cls(i: int | str) -> str:
        if isinstance(i, str):
            return i
        i = int(i)
        return class_names[i] if class_names is not None and 0 <= i < len(class_names) else f"class {i}"

    cfg = model.tps
    if cfg.keep_rate is not None:
        rates = sorted(set(cfg.keep_rate))
        amount = f"keep rate {_fmt(cfg.keep_rate[0])}" if len(rates) == 1 else \
            f"keep rates {', '.join(_fmt(r) for r in cfg.keep_rate)}"
    else:
        amount = f"r = {cfg.r[0]}" if len(set(cfg.r)) == 1 else f"r = {', '.join(map(str, cfg.r))}"
    line1 = f"{name} · {METHOD_NAMES.get(cfg.method, cfg.method)}, {amount} at blocks {_blocks(cfg.locations)}"
    top = int(probs.argmax())
    share = float(probs[top])
    line2 = f"predicted: {cls(top)} ({share:.0%})" if share >= 0.01 else f"predicted: {cls(top)} (<1%)"
    if label is not None:
        line2 += f" · true: {cls(label)}"
    return f"{line1}\n{line2}"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _blocks(locations: Sequence[int]) -> str:
    locs = list(locations)
    if len(locs) > 3 and locs == list(range(locs[0], locs[-1] + 1)):
        return f"{locs[0]}–{locs[-1]}"
    return ", ".join(map(str, locs))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "image"


# ----------------------------------------------------------------------------------------------- drawing


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])


_PALETTE_RGB = np.stack([_rgb(c) for c in PALETTE])


def host_colours(panel_groups: Sequence[np.ndarray], num_patches: int) -> np.ndarray:
    """(num_patches, 3) RGB colour of each grid cell as a host, the same in every panel of one image.

    Hosts are ranked by the largest group they hold in any panel; the largest groups get the palette's colours, the
    rest colours of their own spread around the hue circle (golden-angle steps), so no two hosts share a colour.
    """
    largest = np.zeros(num_patches, dtype=np.int64)
    for groups in panel_groups:
        largest = np.maximum(largest, np.bincount(groups[groups >= 0], minlength=num_patches))
    order = np.argsort(-largest, kind="stable")
    colours = np.empty((num_patches, 3))
    colours[order] = _palette(num_patches)
    return colours


def _palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours: :data:`PALETTE`, then golden-angle hues at alternating saturation and value."""
    from matplotlib.colors import hsv_to_rgb

    extra = max(0, n - len(PALETTE))
    k = np.arange(extra)
    hsv = np.stack([(0.13 + k * 0.381966) % 1.0, np.where(k % 2, 0.55, 0.9), np.where(k % 3 == 1, 0.7, 0.95)], 1)
    return np.concatenate([_PALETTE_RGB, hsv_to_rgb(hsv).reshape(-1, 3)])[:n]


def _compose(image: np.ndarray, groups: np.ndarray, grid: tuple[int, int], colours: np.ndarray) -> np.ndarray:
    """The panel's pixels: kept patches as they are, pruned ones tinted with their host's colour, dropped grey."""
    height, width = image.shape[:2]
    cell = (np.arange(height)[:, None] * grid[0] // height) * grid[1] + np.arange(width)[None, :] * grid[1] // width
    group = groups[cell]  # (H, W) host cell of each pixel
    grey = image.mean(axis=-1, keepdims=True)
    faded = 0.55 + 0.45 * grey  # the image stays faintly visible under the tint
    tint = np.where((group >= 0)[..., None], colours[np.clip(group, 0, None)], _rgb(FUSED_COLOR))
    out = np.where((group != cell)[..., None], (1 - PRUNED_TINT) * faded + PRUNED_TINT * tint, image)
    out = np.where((group == DROPPED)[..., None], 0.25 * grey + 0.75 * DROPPED_GREY, out)
    return out.clip(0, 1)


def _draw(image: np.ndarray, panels: list[tuple[str, np.ndarray]], grid: tuple[int, int], reducer: str, title: str,
          panel_size: float, dpi: int, max_columns: int, links: bool = True) -> Figure:
    n_panels = 1 + len(panels)
    cols = max(1, min(n_panels, max_columns))
    rows = math.ceil(n_panels / cols)
    width, height = cols * panel_size, rows * panel_size + HEADER_IN + FOOTER_IN
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=9)
    colours = host_colours([groups for _, groups in panels], grid[0] * grid[1])
    interpolation = "nearest" if image.shape[0] <= 64 else "antialiased"
    side = panel_size - 0.3  # room for the panel title
    for i in range(n_panels):
        row, col = divmod(i, cols)
        left = (col * panel_size + (panel_size - side) / 2) / width
        bottom = (height - HEADER_IN - (row + 1) * panel_size + 0.05) / height
        ax = fig.add_axes((left, bottom, side / width, side / height))
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.imshow(image, interpolation=interpolation)
            ax.set_title("input", fontsize=8)
            continue
        label, groups = panels[i - 1]
        ax.imshow(_compose(image, groups, grid, colours), interpolation=interpolation)
        _outline_and_link(ax, groups, grid, image.shape[:2], colours, side * dpi, links)
        ax.set_title(label, fontsize=8)
    fig.legend(handles=_legend(reducer), loc="lower center", ncol=4, frameon=False, fontsize=7,
               bbox_to_anchor=(0.5, 0.0), handlelength=1.4, columnspacing=1.2)
    return fig


def _outline_and_link(ax, groups: np.ndarray, grid: tuple[int, int], size: tuple[int, int], colours: np.ndarray,
                      panel_px: float, links: bool = True) -> None:
    """Outline kept tokens (hosts in their colour), join each pruned patch to its host, hatch EViT's fused group."""
    ph, pw = size[0] / grid[0], size[1] / grid[1]
    cells = np.arange(len(groups))
    rows, cols = np.divmod(cells, grid[1])
    centres = np.stack([(cols + 0.5) * pw - 0.5, (rows + 0.5) * ph - 0.5], axis=1)
    cell_px = panel_px / max(grid)
    width = float(np.clip(cell_px / 20, 0.4, 1.5))  # points, thinner on fine grids
    kept = groups == cells
    hosts = np.zeros(len(groups), dtype=bool)
    hosts[groups[(groups >= 0) & ~kept]] = True
    moved = cells[(groups >= 0) & ~kept]
    if links and len(moved):
        segments = np.stack([centres[moved], centres[groups[moved]]], axis=1)
        ax.add_collection(LineCollection(segments, colors=colours[groups[moved]], linewidths=width * 0.6, alpha=0.7))
    inset = 0.06
    halo = [patheffects.withStroke(linewidth=width * 1.4, foreground="#333333")]  # white outlines show on white too
    for cell in cells[kept]:
        ax.add_patch(Rectangle((cols[cell] * pw - 0.5 + inset * pw, rows[cell] * ph - 0.5 + inset * ph),
                               (1 - 2 * inset) * pw, (1 - 2 * inset) * ph, fill=False,
                               edgecolor=colours[cell] if hosts[cell] else "white",
                               linewidth=width * (1.6 if hosts[cell] else 0.6),
                               path_effects=None if hosts[cell] else halo))
    host_cells = cells[hosts]
    ax.scatter(centres[host_cells, 0], centres[host_cells, 1], s=(width * 3.5) ** 2, c=colours[host_cells],
               edgecolors="white", linewidths=width * 0.5, zorder=3)
    for cell in cells[groups == FUSED]:
        ax.add_patch(Rectangle((cols[cell] * pw - 0.5, rows[cell] * ph - 0.5), pw, ph, fill=False, hatch="////",
                               edgecolor="white", linewidth=0))
    ax.set_xlim(-0.5, size[1] - 0.5)
    ax.set_ylim(size[0] - 0.5, -0.5)


def _legend(reducer: str) -> list:
    from matplotlib.lines import Line2D

    handles = [Patch(facecolor="#555555", edgecolor="white", linewidth=1.0, label="kept token (outlined)")]
    if reducer in ("squeeze", "merge"):
        tint = (1 - PRUNED_TINT) * 0.9 + PRUNED_TINT * _PALETTE_RGB[0]
        handles += [
            Line2D([], [], marker="o", color=PALETTE[0], markeredgecolor="white", linewidth=0,
                   label=f"host: a kept token others were {VERBS[reducer]}"),
            Patch(facecolor=tint, edgecolor="none", label=f"pruned: {VERBS[reducer]} the host of its colour"),
        ]
    if reducer == "fuse_one":
        handles.append(Patch(facecolor=FUSED_COLOR, edgecolor="white", hatch="////",
                             label="pruned: fused into EViT's extra token"))
    if reducer == "drop":
        handles.append(Patch(facecolor=str(DROPPED_GREY), edgecolor="none", label="pruned: dropped"))
    return handles
