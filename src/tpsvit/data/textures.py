"""Fashion-MNIST among textures: the cluttered testbed with clutter from another domain than the garments.

On cluttered Fashion-MNIST (:mod:`tpsvit.data.cluttered`) the clutter is cut from other garments, so a clutter token
often looks like a garment token and the TPS squeeze mixes the two (``benchmarks/squeeze_hosts.py``). In natural
images most of the background is unlike the object (sky, grass, a wall). Here the canvas, the garment's placement and
the number and size of the clutter pieces are exactly those of :class:`~tpsvit.data.cluttered.ClutterSpec`, but each
clutter piece is a procedural texture: stripes, a checkerboard, a dot lattice, noise blobs or rings, at a random
period (2.5-8 pixels), orientation, phase, duty and brightness, sinusoidal or hard-edged, as if cut from an endless
textured surface. Textures are periodic or isotropic patterns at frequencies that garment silhouettes do not have,
they need no data set (no scikit-learn here, so no bundled 8x8 digits, which would also be shapes like the objects),
and every parameter is drawn from the composition's generator, so the fixed splits and the per-step training views
stay deterministic exactly as for the garment clutter.

Patterns are computed in float64 and quantised to 8 grey levels before scaling, so a last-bit difference in a
platform's sin/cos cannot move a pixel in practice; a piece is never (almost) blank: one with fewer than
``piece**2 / 8`` lit pixels is replaced by soft stripes of its own period, orientation and phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpsvit.data.cluttered import ClutterSpec

TEXTURE_KINDS = ("stripes", "checkers", "dots", "blobs", "rings")
PERIOD_RANGE = (2.5, 8.0)  # pixels per cycle
BRIGHTNESS_RANGE = (96, 255)  # the brightest grey level of a piece
LEVELS = 8  # grey levels of a pattern before scaling (quantised: platform-independent pixels)
NOISE_GRID = 4  # noise blobs: a NOISE_GRID x NOISE_GRID random grid, bilinearly upsampled to the piece


@dataclass(frozen=True)
class TextureSpec(ClutterSpec):
    """:class:`ClutterSpec` whose clutter pieces are procedural textures (``kinds``, a subset of
    :data:`TEXTURE_KINDS`) instead of crops of other garments; same canvas, piece count and piece size."""

    kinds: tuple[str, ...] = TEXTURE_KINDS

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in TEXTURE_KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"texture kinds {list(self.kinds)}: need at least one of {', '.join(TEXTURE_KINDS)}")

    def clutter_pieces(self, pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` uint8 texture pieces (n, piece, piece); ``pool`` is not used (the clutter is not cut from it)."""
        return texture_pieces(n, self.piece, gen, self.kinds)


def texture_pieces(n: int, size: int, gen: torch.Generator, kinds=TEXTURE_KINDS) -> torch.Tensor:
    """``n`` random procedural texture pieces, uint8 (n, size, size), every parameter drawn from ``gen``.

    Per piece: a kind from ``kinds``; a period in :data:`PERIOD_RANGE` pixels; an orientation in [0, pi); two phases;
    a ring centre within a piece's side of the piece; a duty in [0.3, 0.7] (the lit fraction of hard-edged patterns);
    hard-edged or sinusoidal (probability 0.5 each); a brightness in :data:`BRIGHTNESS_RANGE`.
    """
    f64 = torch.float64
    kind_index = torch.tensor([TEXTURE_KINDS.index(k) for k in kinds])[torch.randint(0, len(kinds), (n,),
                                                                                     generator=gen)]
    theta = torch.rand(n, generator=gen, dtype=f64) * math.pi
    low, high = PERIOD_RANGE
    period = low + torch.rand(n, generator=gen, dtype=f64) * (high - low)
    phase = torch.rand(n, 2, generator=gen, dtype=f64) * (2 * math.pi)
    centre = torch.rand(n, 2, generator=gen, dtype=f64) * (3 * size) - size
    duty = 0.3 + 0.4 * torch.rand(n, generator=gen, dtype=f64)
    hard = torch.rand(n, generator=gen) < 0.5
    noise = torch.rand(n, 1, NOISE_GRID, NOISE_GRID, generator=gen, dtype=f64)
    bright = torch.randint(BRIGHTNESS_RANGE[0], BRIGHTNESS_RANGE[1] + 1, (n,), generator=gen).to(f64)

    coords = torch.arange(size, dtype=f64) + 0.5
    y, x = coords[None, :, None], coords[None, None, :]
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u = (x * cos + y * sin) / period[:, None, None]  # cycles along the orientation
    v = (-x * sin + y * cos) / period[:, None, None]
    a, b = phase[:, 0, None, None], phase[:, 1, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * u + a)
    checkers = 0.5 + 0.5 * torch.sin(2 * math.pi * u + a) * torch.sin(2 * math.pi * v + b)
    du = torch.frac(u + a / (2 * math.pi) + 8) - 0.5  # offset to the nearest lattice point, in cycles
    dv = torch.frac(v + b / (2 * math.pi) + 8) - 0.5
    dots = (1 - (du * du + dv * dv).sqrt() / 0.5).clamp(0, 1)
    blobs = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    span = blobs.amax(dim=(1, 2), keepdim=True) - blobs.amin(dim=(1, 2), keepdim=True)
    blobs = (blobs - blobs.amin(dim=(1, 2), keepdim=True)) / span.clamp_min(1e-6)
    radius = ((x - centre[:, 0, None, None]) ** 2 + (y - centre[:, 1, None, None]) ** 2).sqrt()
    rings = 0.5 + 0.5 * torch.sin(2 * math.pi * radius / period[:, None, None] + a)

    patterns = torch.stack([stripes, checkers, dots, blobs, rings], dim=1)  # (n, kinds, size, size)
    w = patterns[torch.arange(n), kind_index]
    w = torch.where(hard[:, None, None], (w >= 1 - duty[:, None, None]).to(f64), w)
    pieces = _to_uint8(w, bright)
    faint = (pieces > 0).sum(dim=(1, 2)) < max(1, size * size // 8)
    if bool(faint.any()):
        pieces = torch.where(faint[:, None, None], _to_uint8(stripes, bright), pieces)
    return pieces


def _to_uint8(w: torch.Tensor, bright: torch.Tensor) -> torch.Tensor:
    """Patterns in [0, 1] (n, s, s) -> uint8, quantised to :data:`LEVELS` levels, the top one at ``bright``."""
    level = torch.round(w.clamp(0, 1) * (LEVELS - 1))
    return torch.round(level * bright[:, None, None] / (LEVELS - 1)).to(torch.uint8)
