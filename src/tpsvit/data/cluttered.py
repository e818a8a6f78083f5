"""Cluttered Fashion-MNIST: each garment at a random spot of a larger black canvas, among crops of other garments.

On plain Fashion-MNIST the garment fills the image and its silhouette (which the "background" tokens encode) is the
signal, so there are no unimportant tokens for a pruning method to find. Here the 28x28 garment covers about a
quarter of a 56x56 canvas and a few 8x8 crops of other garments are scattered around it as clutter, so most of the
49 tokens (8x8 patches) really are unimportant, as on ImageNet. Images are combined with a pixel-wise maximum.

The test split is composed once from a fixed seed (the same images on every machine, whatever ``limit``); training
images are composed on the fly per batch (:meth:`ClutterSpec.compose` with the batch's generator), so every epoch
sees new placements and clutter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GARMENT = 28
TEST_SEED = 20260
TRAIN_VIEW_SEED = 20261  # the fixed composition of the training split, for calibration and eval on train images


@dataclass(frozen=True)
class ClutterSpec:
    """Canvas side, number of clutter pieces per image and their side (pixels)."""

    canvas: int = 56
    pieces: int = 6
    piece: int = 8

    def compose(self, garments: torch.Tensor, pool: torch.Tensor, gen: torch.Generator,
                flip: bool = False) -> torch.Tensor:
        """uint8 garments (B, 28, 28) -> uint8 canvases (B, canvas, canvas); see :meth:`compose_layers`."""
        return self.compose_layers(garments, pool, gen, flip)[0]

    def compose_layers(self, garments: torch.Tensor, pool: torch.Tensor, gen: torch.Generator,
                       flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 garments (B, 28, 28) -> (canvases, the garments alone on their canvases), both uint8
        (B, canvas, canvas); the second gives the garment's own pixels (segmentation labels).

        Each garment lands at a uniformly random position (flipped horizontally with probability 0.5 when
        ``flip``); then ``pieces`` clutter pieces per image (:meth:`clutter_pieces`: here a random ``piece`` x
        ``piece`` crop from the central part of a random image of ``pool``) are placed uniformly at random.
        """
        b = garments.shape[0]
        out = torch.zeros(b, self.canvas, self.canvas, dtype=torch.uint8)
        if flip:
            flipped = torch.rand(b, generator=gen) < 0.5
            garments = torch.where(flipped[:, None, None], garments.flip(-1), garments)
        _paste(out, garments, gen)
        alone = out.clone()
        if self.pieces:
            crops = self.clutter_pieces(pool, b * self.pieces, gen)
            for k in range(self.pieces):
                _paste(out, crops[k::self.pieces], gen)
        return out, alone

    def clutter_pieces(self, pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` uint8 clutter pieces (n, piece, piece): random crops from the central part of random images of
        ``pool`` (other garments). Subclasses draw clutter from another domain (:mod:`tpsvit.data.textures`)."""
        source = torch.randint(0, len(pool), (n,), generator=gen)
        low, high = 2, GARMENT - self.piece - 2  # skip the empty border of the 28x28 images
        top = torch.randint(low, high + 1, (n,), generator=gen)
        left = torch.randint(low, high + 1, (n,), generator=gen)
        return pool[source[:, None, None], _span(top, self.piece)[:, :, None], _span(left, self.piece)[:, None, :]]


def _span(start: torch.Tensor, size: int) -> torch.Tensor:
    return start[:, None] + torch.arange(size)


def _paste(canvas: torch.Tensor, pieces: torch.Tensor, gen: torch.Generator) -> None:
    """Max-combine square ``pieces`` (B, s, s) into ``canvas`` (B, S, S) at uniformly random positions, in place."""
    b, s = pieces.shape[0], pieces.shape[-1]
    room = canvas.shape[-1] - s + 1
    top = torch.randint(0, room, (b,), generator=gen)
    left = torch.randint(0, room, (b,), generator=gen)
    index = (torch.arange(b)[:, None, None], _span(top, s)[:, :, None], _span(left, s)[:, None, :])
    canvas[index] = torch.maximum(canvas[index], pieces)


def compose_fixed(garments: torch.Tensor, seed: int, spec: ClutterSpec, chunk: int = 4096) -> torch.Tensor:
    """A deterministic cluttered version of a whole split (clutter drawn from the split itself)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([spec.compose(garments[i:i + chunk], garments, gen) for i in range(0, len(garments), chunk)])



def compose_fixed_layers(garments: torch.Tensor, seed: int, spec: ClutterSpec,
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compose_fixed` and, from the same draws, each canvas's garment alone (B, canvas, canvas)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [spec.compose_layers(garments[i:i + chunk], garments, gen) for i in range(0, len(garments), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def token_kinds(garments: torch.Tensor, seed: int, spec: ClutterSpec, count: int,
                patch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` garments composed as one batch from ``seed`` (for ``count`` = 4096, or the whole of a
    shorter split, the first chunk of ``compose_fixed(garments, seed, spec)``) and, per image, the kind of each
    ``patch`` x ``patch`` token: 0 the garment touches it, 1 only clutter does, 2 empty ((B, tokens)).

    The garment's own pixels come from composing the same batch without clutter: :meth:`ClutterSpec.compose` draws
    the garment positions first, so they are the same.
    """
    if not 0 < count <= 4096:
        raise ValueError(f"count must be in 1..4096 (the first chunk of the fixed composition), got {count}")
    full = spec.compose(garments[:count], garments, torch.Generator().manual_seed(seed))
    alone = replace(spec, pieces=0).compose(garments[:count], garments, torch.Generator().manual_seed(seed))

    def touched(images: torch.Tensor) -> torch.Tensor:
        side = images.shape[-1] // patch
        cells = images.unfold(1, patch, patch).unfold(2, patch, patch).reshape(len(images), side * side, -1)
        return cells.amax(-1) > 0

    garment, anything = touched(alone), touched(full)
    kinds = torch.full(garment.shape, 2)
    kinds[anything & ~garment] = 1
    kinds[garment] = 0
    return full, kinds
