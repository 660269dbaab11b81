"""Draw a ShapesWorld scene with PIL: a patterned grey background and flat shapes in grid cells."""

from __future__ import annotations

import io
import math
from functools import lru_cache

from PIL import Image, ImageColor, ImageDraw

from nsft_ray.world.scene import POSITIONS, Scene

__all__ = ["render", "to_png", "render_png", "PALETTE"]

# Saturated object colours; backgrounds stay grey so no background is mistaken for an object colour.
PALETTE = {
    "red": (225, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 0),
    "purple": (140, 40, 190),
    "orange": (255, 135, 0),
}
# Radius of a shape as a share of its cell side.
SIZE_SCALE = {"small": 0.22, "medium": 0.32, "large": 0.42}
OUTLINE = (20, 20, 20)  # a dark rim keeps yellow and orange legible on light backgrounds


def _plain(s: int) -> Image.Image:
    return Image.new("RGB", (s, s), (200, 200, 200))


def _striped(s: int) -> Image.Image:
    img = Image.new("RGB", (s, s), (240, 240, 240))
    d = ImageDraw.Draw(img)
    step = max(4, s // 12)
    for k in range(-s, s, step):  # diagonal stripes, unlike any shape edge
        d.line([(k, 0), (k + s, s)], fill=(150, 150, 150), width=max(1, step // 3))
    return img


def _dotted(s: int) -> Image.Image:
    img = Image.new("RGB", (s, s), (240, 240, 240))
    d = ImageDraw.Draw(img)
    step = max(4, s // 12)
    for y in range(step // 2, s, step):
        for x in range(step // 2, s, step):
            d.rectangle([x, y, x + max(0, step // 4 - 1), y + max(0, step // 4 - 1)],
                        fill=(90, 90, 90))
    return img


def _checkered(s: int) -> Image.Image:
    img = Image.new("RGB", (s, s), (225, 225, 225))
    d = ImageDraw.Draw(img)
    step = max(4, s // 8)
    for y in range(0, s, step):
        for x in range(0, s, step):
            if (x // step + y // step) % 2:
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=(130, 130, 130))
    return img


BACKGROUNDS = {"plain": _plain, "striped": _striped, "dotted": _dotted, "checkered": _checkered}


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=OUTLINE)


def _square(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
    h = r * 0.88  # about the circle's area
    d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=OUTLINE)


def _triangle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
    pts = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    d.polygon(pts, fill=fill, outline=OUTLINE)


def _star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple) -> None:
    pts = []
    for k in range(10):
        rad = r * 1.08 if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    d.polygon(pts, fill=fill, outline=OUTLINE)


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"cannot draw {what} {name!r}; known: {', '.join(table)}")
    return table[name]


@lru_cache(maxsize=64)
def _background(style: str, size: int) -> Image.Image:
    return _lookup(BACKGROUNDS, style, "background")(size)


@lru_cache(maxsize=64)
def _rgb(color: str) -> tuple[int, int, int]:
    if color in PALETTE:
        return PALETTE[color]
    try:  # a colour added in the config: any name PIL knows ("pink", "brown", ...)
        return ImageColor.getrgb(color)[:3]
    except ValueError:
        raise ValueError(f"cannot draw color {color!r}; known: {', '.join(PALETTE)} "
                         "or a CSS colour name") from None


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a size x size RGB image."""
    img = _background(scene.background, size).copy()
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene.objects:
        row, col = divmod(POSITIONS.index(o.position), 3)
        r = cell * _lookup(SIZE_SCALE, o.size, "size")
        _lookup(SHAPES, o.shape, "shape")(d, (col + 0.5) * cell, (row + 0.5) * cell, r,
                                          _rgb(o.color))
    return img


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_png(scene: Scene, size: int = 64) -> bytes:
    return to_png(render(scene, size))
