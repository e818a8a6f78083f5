"""Where do pruned tokens go on the cluttered testbed? Host census of the TPS squeeze at the first reduction.

On cluttered Fashion-MNIST the clutter is made of crops of *other garments*, so a pruned clutter token can look much
like the garment's own tokens. This counts, for the shipped base model patched with etps at a GMACs budget (blocks
3/6/9, off-the-shelf), what the tokens pruned at block 3 are (garment / clutter only / empty, from the pixels each
8x8 patch covers) and what their hosts are, on training images composed with a fixed seed (never the test set).

    python benchmarks/squeeze_hosts.py [--budget 0.5] [--images 2048] [--threads 1] [--json PATH]
    python benchmarks/squeeze_hosts.py --data fashion-mnist-textures   # clutter from procedural textures instead
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import tpsvit
from tpsvit.data.cluttered import token_kinds
from tpsvit.data.datasets import FashionMNIST, embedded_dataset, normalize_uint8
from tpsvit.io.assets import demo_checkpoint
from tpsvit.io.loading import load_model
from tpsvit.measure.budget import solve_keep_rate

KINDS = ("garment", "clutter", "empty")
SEED = 31337  # training images, composed once with this seed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the unpatched GMACs")
    p.add_argument("--images", type=int, default=2048, help="training images (the first ones)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="save the census here")
    p.add_argument("--data", choices=["fashion-mnist-cluttered", "fashion-mnist-textures"],
                   default="fashion-mnist-cluttered", help="the testbed (its shipped base model)")
    p.add_argument("--checkpoint", help="another base model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(checkpoint=args.checkpoint or demo_checkpoint(None, args.data)).eval()
    spec = embedded_dataset(args.data).default_spec()
    rate = solve_keep_rate(model, "etps", budget=args.budget, locations=(3, 6, 9))
    tpsvit.patch(model, "etps", keep_rate=rate, locations=(3, 6, 9))
    images, kinds = token_kinds(FashionMNIST(train=True).images, SEED, spec, args.images)
    counts = torch.zeros(3, 3, dtype=torch.long)  # pruned kind x host kind
    kept = torch.zeros(3, dtype=torch.long)
    with torch.inference_mode(), tpsvit.tracing(model) as trace:
        for start in range(0, len(images), 256):
            model(normalize_uint8(images[start:start + 256]))
            step, batch_kinds = trace.locations[0], kinds[start:start + 256]  # block 3: positions = grid cells
            entering = batch_kinds.gather(1, step.positions)
            pruned_kind = entering.gather(1, step.pruned)
            host_kind = entering.gather(1, step.kept).gather(1, step.host)
            counts += torch.bincount(pruned_kind.flatten() * 3 + host_kind.flatten(), minlength=9).reshape(3, 3)
            kept += torch.bincount(entering.gather(1, step.kept).flatten(), minlength=3)
    entering_total = torch.bincount(kinds.flatten(), minlength=3)
    print(f"etps keep {rate:.3f} at blocks 3/6/9 ({args.budget:.0%} of the GMACs), {args.data} base model, "
          f"first {args.images} training images (composed with seed {SEED}), block 3, {args.threads} thread(s)")
    print(f"{'tokens':>10} {'entering':>9} {'kept':>7} {'pruned':>7}   hosts of the pruned: " +
          "  ".join(f"{k:>8}" for k in KINDS))
    report = {"data": args.data, "keep_rate": rate, "budget": args.budget, "images": args.images, "rows": {}}
    for i, kind in enumerate(KINDS):
        pruned = int(counts[i].sum())
        shares = [float(c) / max(pruned, 1) for c in counts[i]]
        print(f"{kind:>10} {int(entering_total[i]) / args.images:9.1f} {int(kept[i]) / args.images:7.1f} "
              f"{pruned / args.images:7.1f}   " + "  ".join(f"{s:8.1%}" for s in shares))
        report["rows"][kind] = {"entering_per_image": int(entering_total[i]) / args.images,
                                "kept_per_image": int(kept[i]) / args.images, "pruned_per_image": pruned / args.images,
                                "host_shares": dict(zip(KINDS, shares, strict=True))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"saved {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
