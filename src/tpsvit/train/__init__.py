"""Fine-tuning and training: the paper's recipe for dTPS / eTPS (and the baselines), CPU to many GPUs via torchrun.

>>> from tpsvit.train import train
>>> results = train({"recipe": "fmnist-scratch", "epochs": 1, "out": "runs/try"})

``lr`` in a recipe is for the recipe's global batch and is never rescaled automatically (see
:mod:`tpsvit.train.recipe`).
"""

from tpsvit.train.recipe import TrainConfig, load_recipe, recipe_names, resolve, valid_keys


def __getattr__(name: str):
    # the engine (torch, timm) is imported on first use, so that `tpsvit train --help` stays fast
    if name == "train":
        from tpsvit.train.engine import train

        return train
    raise AttributeError(f"module 'tpsvit.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "load_recipe", "recipe_names", "resolve", "train", "valid_keys"]
