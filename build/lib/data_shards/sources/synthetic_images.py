"""Procedural product pictures for the synthetic source (private helper of ``synthetic.py``).

One picture shows one item: a filled shape (the item's *shape*) in the item's *colour*, with
a surface *pattern* drawn on it in a lighter/darker shade of the same colour, on a light,
nearly neutral background. Size, position, rotation, background tint, the colour's exact
value, the pattern's period/angle/phase and a little sensor noise vary per item, so no two
pictures are the same while the three attributes stay recognisable.

Everything random comes from a numpy ``Generator`` seeded with ``(seed, item index)``; the
JPEG quality is fixed by the caller, so the same arguments give byte-identical JPEG files
(with the same Pillow/libjpeg build).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

# Keep these in the same order as the name tables in synthetic.py.
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
PATTERNS = ("solid", "striped", "dotted", "checked")
# Well separated sRGB values; the name is what the title says, the value is what the picture shows.
COLOURS = {
    "Red": (214, 39, 40),
    "Orange": (245, 133, 24),
    "Yellow": (240, 214, 38),
    "Green": (44, 160, 64),
    "Blue": (36, 92, 214),
    "Purple": (128, 60, 180),
    "Pink": (240, 110, 180),
    "Black": (32, 32, 32),
}
COLOUR_VALUES = np.array(list(COLOURS.values()), dtype=np.float64)

# Stream tag so image randomness never overlaps the catalogue/history streams.
_IMAGE_STREAM = 3


def _shade(rgb: np.ndarray) -> tuple[int, int, int]:
    """The pattern colour: the same hue, lighter for dark colours and darker for light ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance < 150:
        out = rgb * 0.6 + 255 * 0.4
    else:
        out = rgb * 0.65
    return tuple(int(v) for v in np.clip(out, 0, 255))


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float,
             inner: float | None = None, x_scale: float = 1.0) -> list[tuple[float, float]]:
    points = []
    count = sides * 2 if inner is not None else sides
    for k in range(count):
        angle = rotation - math.pi / 2 + 2 * math.pi * k / count
        r = radius if inner is None or k % 2 == 0 else radius * inner
        points.append((cx + r * math.cos(angle) * x_scale, cy + r * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, cx: float, cy: float, r: float,
                rotation: float) -> None:
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        # Vertices at 45 deg so the square stands upright; the rotation jitter is small enough
        # (+-12 deg) that it never looks like the diamond.
        draw.polygon(_polygon(cx, cy, r * 1.05, 4, rotation + math.pi / 4), fill=255)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3, rotation), fill=255)
    elif name == "diamond":
        # A tall rhombus (narrower than high), never confused with a rotated square.
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, rotation * 0.3, x_scale=0.62), fill=255)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rotation), fill=255)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, rotation, inner=0.48), fill=255)
    else:  # pragma: no cover - guarded by the attribute tables
        raise ValueError(f"unknown shape index {shape}")


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: int, size: int, shade: tuple[int, int, int],
                  rng: np.random.Generator) -> None:
    name = PATTERNS[pattern]
    if name == "solid":
        return
    period = size / rng.uniform(6.0, 8.0)
    phase = rng.uniform(0, period)
    if name == "dotted":
        radius = max(1.0, period * 0.2)
        steps = int(size / period) + 2
        for i in range(steps):
            for j in range(steps):
                x = phase + i * period - period
                y = phase + j * period - period + (period / 2 if i % 2 else 0)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=shade)
        return
    width = max(1, int(round(period * 0.3)))
    angles = [rng.uniform(-0.9, 0.9)]
    if name == "checked":
        width = max(1, int(round(period * 0.18)))
        angles = [angles[0] * 0.2, angles[0] * 0.2 + math.pi / 2]
    diagonal = size * 1.5
    c = size / 2
    for angle in angles:
        dx, dy = math.cos(angle), math.sin(angle)  # line direction
        nx, ny = -dy, dx  # normal: lines are spaced along it
        k = -int(diagonal / period) - 1
        while k * period < diagonal:
            off = k * period + phase
            px, py = c + nx * off, c + ny * off
            ends = [(px - dx * diagonal, py - dy * diagonal), (px + dx * diagonal, py + dy * diagonal)]
            draw.line(ends, fill=shade, width=width)
            k += 1


def render_item_image(seed: int, index: int, shape: int, colour: int, pattern: int,
                      size: int, quality: int) -> bytes:
    """JPEG bytes of item ``index``'s picture; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, index])
    grey = rng.uniform(228, 250)
    background = tuple(int(v) for v in np.clip(grey + rng.uniform(-6, 6, size=3), 0, 255))
    base = COLOUR_VALUES[colour] + rng.uniform(-12, 12, size=3)
    base = np.clip(base, 0, 255)
    fill_rgb = tuple(int(v) for v in base)

    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    radius = rng.uniform(0.32, 0.40) * size
    rotation = math.radians(rng.uniform(-12, 12))

    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, radius, rotation)

    fill = Image.new("RGB", (size, size), fill_rgb)
    _draw_pattern(ImageDraw.Draw(fill), pattern, size, _shade(base), rng)

    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(fill, (0, 0), mask)

    # A little sensor noise so pictures are not flat-coloured vector art.
    pixels = np.asarray(canvas, dtype=np.int16)
    noise = rng.integers(-4, 5, size=pixels.shape, dtype=np.int16)
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality, optimize=False,
                                  progressive=False, subsampling=0)
    return out.getvalue()
