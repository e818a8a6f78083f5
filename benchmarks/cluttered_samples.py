"""Picture of the cluttered Fashion-MNIST testbed: the first test images with their labels and the 8x8 token grid.

Also prints how many of the 49 tokens the garment touches, how many only clutter, how many are empty (over the
first 4,096 test images: the first chunk of the fixed composition, whose garment positions a garment-only composition
with the same seed reproduces).

    python benchmarks/cluttered_samples.py --out docs/images/cluttered_samples.png
    python benchmarks/cluttered_samples.py --data fashion-mnist-textures --out docs/images/textures_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tpsvit.data.cluttered import TEST_SEED, ClutterSpec, token_kinds  # noqa: E402
from tpsvit.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST, embedded_dataset  # noqa: E402


def token_census(count: int = 4096, patch: int = 8, spec=None) -> dict:
    """Mean tokens per test image touched by the garment, by clutter only, and empty."""
    _, kinds = token_kinds(FashionMNIST(train=False).images, TEST_SEED, spec or ClutterSpec(), count, patch)
    per_image = [float((kinds == kind).sum(1).float().mean()) for kind in range(3)]
    return {"tokens": kinds.shape[1], "garment": per_image[0], "clutter_only": per_image[1], "empty": per_image[2]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", default="docs/images/cluttered_samples.png")
    p.add_argument("--data", choices=["fashion-mnist-cluttered", "fashion-mnist-textures"],
                   default="fashion-mnist-cluttered")
    args = p.parse_args(argv)
    data = embedded_dataset(args.data)(train=False, limit=args.count)
    side = data.spec.canvas
    fig, axes = plt.subplots(1, args.count, figsize=(1.6 * args.count, 1.9))
    for ax, image, label in zip(axes, data.images, data.labels, strict=True):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
        for k in range(8, side, 8):  # the 8x8 patches the model sees as tokens
            ax.axhline(k - 0.5, color="tab:blue", lw=0.3, alpha=0.6)
            ax.axvline(k - 0.5, color="tab:blue", lw=0.3, alpha=0.6)
        ax.set_title(FASHION_MNIST_CLASSES[int(label)], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    census = token_census(spec=data.spec)
    print(f"tokens per test image (of {census['tokens']}): garment {census['garment']:.1f}, clutter only "
          f"{census['clutter_only']:.1f}, empty {census['empty']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
