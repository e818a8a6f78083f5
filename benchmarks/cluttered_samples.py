"""Picture of the cluttered Fashion-MNIST testbed: the first test images with their labels and the 8x8 token grid.

    python benchmarks/cluttered_samples.py --out docs/images/cluttered_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tpsvit.data import FASHION_MNIST_CLASSES, ClutteredFashionMNIST  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", default="docs/images/cluttered_samples.png")
    args = p.parse_args(argv)
    data = ClutteredFashionMNIST(train=False, limit=args.count)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
