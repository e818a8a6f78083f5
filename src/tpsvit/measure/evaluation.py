"""Accuracy of one or several models on a labelled dataset, and the tables, CSV/JSON files and plot of a comparison.

:func:`evaluate_accuracy` is the reusable loop (the demo and the training loop call it). Data is either a DataLoader
(any iterable of ``(images, labels)`` batches), a Dataset, or an in-memory ``(images, labels)`` tensor pair such as
``FashionMNIST(...).tensors()``, resized per batch to the model's input with
:func:`tpsvit.data.datasets.resize_and_expand`.
Several models are evaluated in one pass over the data (images are decoded once), which also interleaves their
forward timings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tpsvit.data.datasets import resize_and_expand
from tpsvit.errors import DatasetError, InvalidArgumentError, TPSError
from tpsvit.families import logits_of
from tpsvit.io.atomic import check_writable
from tpsvit.measure.bench import _amp_dtype, _device, device_scope, device_sync, input_size


def _batches(data, batch_size: int) -> tuple[Iterable[tuple[Tensor, Tensor]], int | None]:
    """(iterable of (images, labels) batches, number of images or None)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        return ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)), len(
            images
        )
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    size = None
    with contextlib.suppress(TypeError):
        size = len(data.dataset) if isinstance(data, DataLoader) else None
    return data, size


def _fit_input(images: Tensor, chans: int, h: int, w: int) -> Tensor:
    """Resize / repeat grey images to the model's input (in-memory tensors may be 28x28 grey)."""
    if images.shape[-3:] == (chans, h, w):
        return images
    if h != w:
        raise DatasetError(f"images {tuple(images.shape[-3:])} need resizing to a non-square input {(h, w)}")
    if images.shape[-3] not in (1, chans):
        raise DatasetError(f"images have {images.shape[-3]} channels but the model takes {chans}")
    return resize_and_expand(images, h, chans)


def _one_line(err: TPSError) -> TPSError:
    """DataLoader workers re-raise errors with a traceback in the message: keep the original one-line message."""
    text = str(err)
    if "\n" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1]
    for prefix in (f"{type(err).__module__}.{type(err).__name__}: ", f"{type(err).__name__}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return type(err)(last)


def evaluate_many(models: Mapping[str, nn.Module], data, batch_size: int = 256, device=None,
                  topk: Sequence[int] = (1, 5), amp=None, img_size=None, in_chans: int | None = None,
                  progress: bool = True, desc: str = "eval") -> dict[str, dict]:
    """Top-k accuracy of several models in one pass over ``data`` (see the module docstring for its forms).

    Models are moved to ``device`` (default: where the first one is) and run in eval mode under
    ``torch.inference_mode`` (their mode is restored). Returns, per name: ``top1``, ``top5`` (percent; top-k with
    k above the number of classes counts as k = classes), ``correct1``, ``correct5``, ``count``, ``seconds`` (forward
    time) and ``images_per_s`` (forward passes only, the first batch excluded as warm-up when there are more).
    """
    if not models:
        raise InvalidArgumentError("no models to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    first = next(iter(models.values()))
    device = _device(device, first)
    dtype = _amp_dtype(amp)
    chans, h, w = input_size(first, img_size, in_chans)
    batches, total = _batches(data, batch_size)
    modes = {name: m.training for name, m in models.items()}
    stats = {name: {"correct": dict.fromkeys(topk, 0), "count": 0, "seconds": 0.0, "timed": 0, "timed_s": 0.0}
             for name in models}
    sync = device_sync(device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    for model in models.values():
        model.to(device).eval()  # outside inference mode: moved parameters stay usable for training
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        with device_scope(device), torch.inference_mode():
            for index, (images, labels) in enumerate(batches):
                images = _fit_input(images, chans, h, w).to(device, non_blocking=True)
                labels = labels.to(device)
                for name, model in models.items():
                    sync()
                    start = time.perf_counter()
                    with autocast():
                        logits = logits_of(model(images))
                    sync()
                    elapsed = time.perf_counter() - start
                    _count(stats[name], logits, labels, topk)
                    stats[name]["seconds"] += elapsed
                    if index > 0:
                        stats[name]["timed"] += len(labels)
                        stats[name]["timed_s"] += elapsed
                bar.update(len(labels))
    except TPSError as err:
        raise _one_line(err) from None
    finally:
        bar.close()
        for name, model in models.items():
            model.train(modes[name])
    return {name: _summary(s, topk) for name, s in stats.items()}


def _count(stat: dict, logits: Tensor, labels: Tensor, topk: Sequence[int]) -> None:
    classes = logits.shape[-1]
    if len(labels) and int(labels.max()) >= classes:
        raise DatasetError(f"label {int(labels.max())} is outside the model's {classes} classes; wrong model or data?")
    ranked = logits.topk(min(max(topk), classes), dim=-1).indices
    hits = ranked == labels[:, None]
    for k in topk:
        stat["correct"][k] += int(hits[:, :k].any(dim=-1).sum())
    stat["count"] += len(labels)


def _summary(stat: dict, topk: Sequence[int]) -> dict:
    count = stat["count"]
    out = {}
    for k in topk:
        out[f"top{k}"] = 100.0 * stat["correct"][k] / count if count else math.nan
        out[f"correct{k}"] = stat["correct"][k]
    timed, timed_s = (stat["timed"], stat["timed_s"]) if stat["timed"] else (count, stat["seconds"])
    out.update(count=count, seconds=stat["seconds"], images_per_s=timed / timed_s if timed_s > 0 else math.nan)
    return out


def evaluate_accuracy(model: nn.Module, data, batch_size: int = 256, device=None, topk: Sequence[int] = (1, 5),
                      amp=None, img_size=None, in_chans: int | None = None, progress: bool = True,
                      desc: str = "eval") -> dict:
    """Top-1 / top-5 accuracy (percent) of ``model`` on ``data``: a DataLoader, a Dataset or (images, labels) tensors.

    In-memory tensors are cut into batches of ``batch_size`` and resized / channel-repeated to the model's input.
    Returns the dict of :func:`evaluate_many` for this model.
    """
    return evaluate_many({"model": model}, data, batch_size, device, topk, amp, img_size, in_chans, progress,
                         desc)["model"]


# --------------------------------------------------------------------------------------------- reporting helpers


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, title, format spec), e.g. ("top1", "top-1 %", ".2f")."""
    def cell(row, key, spec):
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec) if spec else str(value)

    table = [[title for _, title, _ in columns]] + [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(line))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _output_file(path: str | Path, example: str) -> Path:
    """``path`` checked (not a folder, its folder writable) and its missing folders created."""
    path = check_writable(path, example)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidArgumentError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    return path


def write_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Rows of dicts as CSV (columns: the union of keys, in first-seen order; lists joined by spaces).

    A folder, or a path whose folder cannot be written, is an :class:`InvalidArgumentError` naming it."""
    path = _output_file(path, "results.csv")
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})
    return path


def write_json(obj, path: str | Path) -> Path:
    """JSON with indentation (NaN written as null); bad paths as :func:`write_csv`."""
    path = _output_file(path, "results.json")

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(obj), indent=2) + "\n", encoding="utf-8")
    return path


def plot_accuracy_vs_gmacs(rows: Sequence[Mapping], path: str | Path, title: str = "", metric: str = "top1") -> Path:
    """Accuracy vs GMACs as PNG: one line per method (points sorted by GMACs), the unpatched model as a star.

    Rows need ``method`` (None for unpatched), ``gmacs`` and ``metric``; a method whose rows all have ``status``
    "untrained predictor" is drawn dashed and says so in the legend. Uses matplotlib's Agg canvas directly, so the
    global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = _output_file(path, "accuracy_vs_gmacs.png")
    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = []
    for row in rows:
        if row.get("method") and row["method"] not in methods:
            methods.append(row["method"])
    for method in methods:
        mine = [r for r in rows if r.get("method") == method and r.get(metric) is not None]
        points = sorted((r["gmacs"], r[metric]) for r in mine)
        untrained = bool(mine) and all(r.get("status") == "untrained predictor" for r in mine)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="--" if untrained else "-",
                    label=f"{method} (untrained predictor)" if untrained else method)
    for row in rows:
        if row.get("method") is None and row.get(metric) is not None:
            ax.plot([row["gmacs"]], [row[metric]], marker="*", markersize=16, linestyle="none", color="black",
                    label="unpatched")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel(f"{metric.replace('top', 'top-')} accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
