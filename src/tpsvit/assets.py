"""The models shipped inside the package for the Fashion-MNIST demo (trained by ``tpsvit train`` on a CPU)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tpsvit.errors import CheckpointError

ASSETS = Path(__file__).parent / "assets"
BASE = "mini_deit_fmnist.safetensors"
# Methods whose predictors must be trained: fine-tuned checkpoints shipped next to the base model.
FINETUNED = {"dtps": "mini_deit_fmnist_dtps.safetensors", "dynamicvit": "mini_deit_fmnist_dynamicvit.safetensors"}


def demo_checkpoint(method: str | None = None) -> Path:
    """Path of the shipped base model, or of the fine-tuned checkpoint for ``method`` (dtps, dynamicvit)."""
    name = BASE if method is None else FINETUNED.get(method)
    if name is None:
        raise CheckpointError(f"no shipped fine-tuned checkpoint for {method!r}; shipped: {', '.join(FINETUNED)}")
    path = ASSETS / name
    if not path.is_file():
        raise CheckpointError(
            f"the shipped model {name} is missing from {ASSETS}; train one with "
            "`tpsvit train --recipe fmnist-scratch --out runs/mini-deit` and pass --checkpoint"
        )
    return path


def load_demo_model(method: str | None = None) -> nn.Module:
    """The shipped mini-DeiT (eval mode); for dtps/dynamicvit, the fine-tuned model with its patch and predictors."""
    from tpsvit.loading import load_model

    return load_model(checkpoint=demo_checkpoint(method)).eval()
