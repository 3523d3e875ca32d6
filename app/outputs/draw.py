"""How points are drawn wherever an image shows them: ``points.png``, the drag animation, the editor
in the browser and the bench report. One palette, one marker size rule.

Handles are red, targets blue, an arrow runs from the (current) handle to its target, and a current
or final handle is a high-contrast marker: a yellow ring between black rings, around a black dot (a
green ring alone disappears on foliage and on noise). Points are [x, y] pixels of the image they are drawn on.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: marker colours (RGB)
HANDLE, TARGET, CURRENT, ARROW, OUTLINE = (230, 40, 40), (40, 90, 230), (255, 221, 0), (255, 255, 255), (255, 255, 255)
EDGE = (0, 0, 0)  # the dark rings and dot of the current/final-handle marker


def marker_radius(size: tuple[int, int]) -> int:
    """Marker radius in px for an image of ``size``: visible on a thumbnail, small on a photo."""
    return max(3, round(min(size) / 60))


def draw_points(image: Image.Image, handles: Sequence, targets: Sequence, *, current: Sequence | None = None,
                numbered: bool = False, label: str = "", mask: np.ndarray | None = None) -> Image.Image:
    """A copy of ``image`` with the pairs drawn on it.

    ``targets`` may be one shorter than ``handles`` (a handle still waiting for its target);
    ``current``: current or final handles (yellow/black markers, arrows start there); ``numbered``: pair
    numbers beside the handles; ``label``: text in the top-left corner; ``mask``: (H, W) bool,
    editable region, the rest is dimmed."""
    im = image.convert("RGB")
    if mask is not None:
        arr = np.asarray(im).astype(np.float32)
        arr[~mask] *= 0.45
        im = Image.fromarray(arr.astype(np.uint8))
    else:
        im = im.copy()
    d = ImageDraw.Draw(im)
    r = marker_radius(im.size)
    ring = max(1, r // 2)
    font = _font(max(10, 3 * r)) if numbered else None
    for c in current if current is not None else ():  # under the dots: a handle that has not moved stays visible
        draw_marker(d, c, r)
    for i, h in enumerate(handles):
        if i < len(targets):
            t = targets[i]
            _arrow(d, current[i] if current is not None else h, t, ring, 3 * r)
            d.ellipse([t[0] - r, t[1] - r, t[0] + r, t[1] + r], fill=TARGET, outline=OUTLINE)
        d.ellipse([h[0] - r, h[1] - r, h[0] + r, h[1] + r], fill=HANDLE, outline=OUTLINE)
        if numbered:
            d.text((h[0] + r + 1, h[1] - 3 * r), str(i + 1), fill=(255, 255, 255), font=font,
                   stroke_width=max(1, r // 3), stroke_fill=(0, 0, 0))
    if label:
        box = d.textbbox((3, 2), label)
        d.rectangle([0, 0, box[2] + 3, box[3] + 2], fill=(0, 0, 0))
        d.text((3, 2), label, fill=(255, 255, 255))
    return im


def _marker_widths(r: int) -> tuple[int, int]:
    w = max(2, r // 2)
    return w, r + 2 * w  # ring width, outer radius


def marker_ring_radius(r: int) -> int:
    """The radius of the middle of the marker's yellow ring, for marker radius ``r``."""
    w, outer = _marker_widths(r)
    return outer - w - w // 2


def draw_marker(d: ImageDraw.ImageDraw, xy: Sequence[float], r: int) -> None:
    """The current/final-handle marker at ``xy``: black, yellow, black concentric rings, black dot."""
    x, y = xy[0], xy[1]
    w, outer = _marker_widths(r)
    for radius, width, colour in ((outer, w, EDGE), (outer - w, w, CURRENT), (outer - 2 * w, max(1, w // 2), EDGE)):
        d.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)
    c = max(1, r // 3)
    d.ellipse([x - c, y - c, x + c, y + c], fill=EDGE)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _arrow(d: ImageDraw.ImageDraw, a: Sequence[float], b: Sequence[float], width: int, head: float) -> None:
    d.line([tuple(a), tuple(b)], fill=ARROW, width=width)
    v = np.subtract(b, a).astype(float)
    n = float(np.hypot(*v))
    if n < 1e-6:
        return
    u, perp = v / n, np.array([-v[1], v[0]]) / n
    base = np.asarray(b, float) - u * min(head, n)
    d.polygon([tuple(b), tuple(base + perp * head / 2), tuple(base - perp * head / 2)], fill=ARROW)
