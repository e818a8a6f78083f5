"""The models shipped inside the package for the demo (trained by ``tpsvit train`` on a CPU).

Three embedded datasets, each with its base mini-DeiT: ``fashion-mnist-cluttered`` (the default; 56x56 canvases,
8x8 patches) and ``fashion-mnist`` (28x28, 4x4 patches), both with short fine-tunes of the learned methods'
predictors, and ``fashion-mnist-textures`` (the cluttered canvases with procedural-texture clutter; base model only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tpsvit.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_DATA = "fashion-mnist-cluttered"


@dataclass(frozen=True)
class DemoModels:
    """The shipped checkpoints of one dataset: the base model and the fine-tuned learned methods."""

    base: str
    finetuned: dict = field(default_factory=dict)  # method -> file
    recipe: str = ""  # the recipe that trained the base model


DEMO_MODELS = {
    "fashion-mnist-cluttered": DemoModels(
        "mini_deit_cluttered.safetensors",
        {"dtps": "mini_deit_cluttered_dtps.safetensors", "dynamicvit": "mini_deit_cluttered_dynamicvit.safetensors"},
        "cluttered-scratch"),
    "fashion-mnist": DemoModels(
        "mini_deit_fmnist.safetensors",
        {"dtps": "mini_deit_fmnist_dtps.safetensors", "dynamicvit": "mini_deit_fmnist_dynamicvit.safetensors"},
        "fmnist-scratch"),
    "fashion-mnist-textures": DemoModels("mini_deit_textures.safetensors", {}, "textures-scratch"),
}
FINETUNED = tuple(DEMO_MODELS[DEFAULT_DATA].finetuned)  # methods with shipped fine-tuned checkpoints


def demo_checkpoint(method: str | None = None, data: str = DEFAULT_DATA) -> Path:
    """Path of the shipped base model for ``data``, or of its fine-tuned checkpoint for ``method`` (dtps,
    dynamicvit). ``data`` may be any name of an embedded dataset (``fmnist-textures``, ``textures``, ...)."""
    from tpsvit.data.datasets import embedded_name

    models = DEMO_MODELS.get(embedded_name(data) or data)
    if models is None:
        raise CheckpointError(f"no shipped models for data {data!r}; shipped: {', '.join(DEMO_MODELS)}")
    name = models.base if method is None else models.finetuned.get(method)
    if name is None:
        raise CheckpointError(f"no shipped fine-tuned checkpoint for {method!r} on {data}; shipped: "
                              f"{', '.join(models.finetuned) or 'none'}")
    path = ASSETS / name
    if not path.is_file():
        raise CheckpointError(
            f"the shipped model {name} is missing from {ASSETS}; train one with "
            f"`tpsvit train --recipe {models.recipe} --out runs/mini-deit` and pass --checkpoint"
        )
    return path


def load_demo_model(method: str | None = None, data: str = DEFAULT_DATA) -> nn.Module:
    """The shipped mini-DeiT for ``data`` (eval mode); for dtps/dynamicvit, the fine-tuned model with its patch and
    predictors."""
    from tpsvit.io.loading import load_model

    return load_model(checkpoint=demo_checkpoint(method, data)).eval()
