"""User input: image, handle/target points and mask, validated before any model loads.

Points arrive as image pixels ``[x, y]`` of the original image. The engine works on a resized copy
(width 512, height scaled and rounded to a multiple of 8) and places points on the feature grid
(H/2, W/2) as ``(row, col)``; results go back to the original size (docs/method.md, "Coordinates").
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from gooddrag.core.errors import BadInputError

Pair = tuple[tuple[float, float], tuple[float, float]]

#: a points file is a few hundred bytes; anything far larger is not one (and must not fill memory)
MAX_POINTS_FILE_BYTES = 1 << 20
#: the most (handle, target) pairs one edit takes: the tracker and the loss work per pair at every
#: drag step, and benchmarks use at most a dozen; 10,000 pairs ran 34 s before doing anything useful
MAX_PAIRS = 100
#: the largest image (width x height) accepted, checked from the header before decoding: the edit
#: runs 512 px wide, and a 78 KB PNG of 9000x9000 took 2.35 GB to edit. $GOODDRAG_MAX_PIXELS sets it.
MAX_PIXELS = 4096 * 4096


def max_pixels() -> int:
    """The image size limit in pixels: $GOODDRAG_MAX_PIXELS, else MAX_PIXELS (and never above
    pillow's own decompression-bomb limit)."""
    env = os.environ.get("GOODDRAG_MAX_PIXELS", "").strip()
    try:
        ours = int(env) if env else MAX_PIXELS
    except ValueError:
        raise BadInputError(f"GOODDRAG_MAX_PIXELS={env!r} is not a whole number of pixels; e.g. 16777216") from None
    pillow = Image.MAX_IMAGE_PIXELS
    return min(ours, pillow) if pillow else ours


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (json.loads would silently keep the last)."""


def strict_json(raw: str | bytes) -> Any:
    """``json.loads`` that refuses a key given twice in one object (DuplicateKeyError names it)."""
    def pairs_hook(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in items:
            if k in out:
                raise DuplicateKeyError(k)
            out[k] = v
        return out

    return json.loads(raw, object_pairs_hook=pairs_hook)


def check_regular_file(path: str | Path, what: str) -> os.stat_result:
    """Refuse what is not a regular file before opening it: a FIFO would block forever, a device
    such as /dev/zero never ends, a folder gives IsADirectoryError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInputError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise BadInputError(f"{what} {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"{what} {str(path)!r} is a folder; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{what} {str(path)!r} is not a regular file (a pipe or device); give a file")
    return st


def read_small_file(path: str | Path, what: str, limit: int = MAX_POINTS_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before and while reading)."""
    st = check_regular_file(path, what)
    if st.st_size > limit:
        raise BadInputError(f"{what} {str(path)!r} is {st.st_size} bytes, over the {limit}-byte limit")
    try:
        with open(path, "rb") as fh:
            data = fh.read(st.st_size + 1)  # read(n) reserves n bytes: the size, not the limit
    except OSError as exc:
        raise BadInputError(f"{what} {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > st.st_size:  # grew while being read
        raise BadInputError(f"{what} {str(path)!r} changed while it was read; try again")
    return data


def point_list(flat: Any) -> list[tuple[float, float]]:
    """``[[x, y], ...]`` -> float pairs. Only JSON numbers count: a string ``"12"`` is not the point
    (1, 2) and ``true`` is not 1. Raises ValueError naming the first bad entry."""
    if not isinstance(flat, (list, tuple)):
        raise ValueError("points are not a list of [x, y]")
    out = []
    for i, pt in enumerate(flat):
        if (not isinstance(pt, (list, tuple)) or len(pt) != 2
                or not all(isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))
                           for c in pt)):
            raise ValueError(f"point {i + 1} is {json.dumps(pt, default=str)[:40]}, not [x, y] with two numbers")
        out.append((float(pt[0]), float(pt[1])))
    return out


def open_image(path: str | Path, what: str = "image", notes: list[str] | None = None) -> Image.Image:
    """Open an image file fully, as it is displayed: EXIF orientation applied (points are given in
    displayed coordinates), 16-bit grayscale scaled to 8 bits (a plain convert clips it to white),
    the first frame of an animation (said in ``notes``). Refuses, in one line, what is not a regular
    file and images over pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""
    check_regular_file(path, what)
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(path) as im:
                w, h = im.size
                if limit and w * h > limit:
                    raise Image.DecompressionBombError(f"{w}x{h}")
                frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
                im.load()
                out = ImageOps.exif_transpose(im) or im.copy()
    except Image.DecompressionBombError:
        raise BadInputError(f"{what} {str(path)!r} is {_size_of(path)}, over the limit of {limit} pixels "
                            f"(a decompression bomb, or far larger than needed; GOODDRAG_MAX_PIXELS sets the "
                            f"limit); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInputError(f"{what} {str(path)!r} is not a readable image ({type(exc).__name__}); "
                            "pass a PNG/JPEG file") from None
    if frames > 1 and notes is not None:
        notes.append(f"{what} {str(path)!r} is animated ({frames} frames): frame 1 is used")
    return to_8bit(out, f"{what} {str(path)!r}")


def _size_of(path: str | Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as im:
                    return f"{im.size[0]}x{im.size[1]}"
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:
        return "too many pixels"


def to_8bit(im: Image.Image, what: str = "image") -> Image.Image:
    """16/32-bit integer grayscale (``I;16*``, ``I``) -> ``L`` by scaling 0..65535 to 0..255;
    pillow's own convert clips every value above 255 to white. Float grayscale (``F``) is read by
    its range: 0..1 (scaled by 255), else 0..255, else 0..65535 (as 16-bit); pillow's convert
    would turn 0..1 floats black. Values outside 0..65535 (or NaN) are refused, never clipped."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
            raise BadInputError(f"{what} (mode {im.mode}) has values from {lo:g} to {hi:g}; give 0..1 floats, "
                                "or 0..255 / 0..65535 integers")
        scale = 1 / 257.0 if im.mode != "F" else (255.0 if hi <= 1 else 1.0 if hi <= 255 else 1 / 257.0)
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L")
    return im


def load_image(path: str | Path, what: str = "image", notes: list[str] | None = None) -> Image.Image:
    """Open an image file fully (so later failures can't come from a lazy read); see :func:`open_image`."""
    if not Path(path).exists():
        raise BadInputError(f"{what} {str(path)!r} does not exist; pass a PNG/JPEG file")
    return open_image(path, what, notes)


def parse_points(specs: Sequence[str]) -> list[Pair]:
    """``["x,y:x,y", ...]`` (one handle:target pair per item) -> pairs."""
    pairs: list[Pair] = []
    for spec in specs:
        handle, sep, target = spec.partition(":")
        if not sep:
            raise BadInputError(f"--points {spec!r}: write a pair as HX,HY:TX,TY, e.g. --points 120,80:160,80")
        pairs.append((_xy(handle, spec), _xy(target, spec)))
    return pairs


def _xy(text: str, spec: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ValueError
    except ValueError:
        raise BadInputError(f"--points {spec!r}: {text!r} is not X,Y; write a pair as HX,HY:TX,TY") from None
    return x, y


def load_points_file(path: str | Path) -> list[Pair]:
    """GoodDrag/Drag100 format ``{"points": [[x, y], ...]}``: handle, target, handle, target, ..."""
    raw = read_small_file(path, "points file")
    try:
        data = strict_json(raw)
        flat = data["points"] if isinstance(data, dict) else data
    except DuplicateKeyError as exc:
        raise BadInputError(f"points file {str(path)!r} gives the key {str(exc)!r} twice (only one would count); "
                            "keep one") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BadInputError(f"points file {str(path)!r} is not {{\"points\": [[x, y], ...]}} "
                            "(handle, target, handle, target, ...)") from None
    try:
        coords = point_list(flat)
    except ValueError as exc:
        raise BadInputError(f"points file {str(path)!r}: {exc}; write {{\"points\": [[x, y], ...]}}") from None
    if not all(np.isfinite(c).all() for c in coords):
        raise BadInputError(f"points file {str(path)!r}: a point is not finite")
    if len(coords) % 2:
        raise BadInputError(f"points file {str(path)!r} has {len(coords)} points, an odd number; "
                            "give handle, target pairs")
    return [(coords[i], coords[i + 1]) for i in range(0, len(coords), 2)]


def as_pairs(points: Any) -> list[Pair]:
    """The API's ``points`` as float pairs: a list or tuple of ``(handle_xy, target_xy)``, or an
    array/tensor of shape (N, 2, 2). Anything else (a generator, a flat list, a dict, a string,
    complex or bool coordinates) is a one-line BadInputError naming ``points``."""
    fix = "give points as [((hx, hy), (tx, ty)), ...] or an array of shape (N, 2, 2)"
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    if isinstance(points, np.ndarray):
        if points.dtype.kind not in "iuf":
            raise BadInputError(f"points is an array of {points.dtype}; {fix} of real numbers")
        if points.ndim != 3 or points.shape[1:] != (2, 2):
            raise BadInputError(f"points has shape {points.shape}; {fix}")
        points = points.tolist()
    if not isinstance(points, (list, tuple)):
        raise BadInputError(f"points is a {type(points).__name__}; {fix}")
    pairs: list[Pair] = []
    for i, pair in enumerate(points):
        pair = _plain(pair)
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadInputError(f"points[{i}] is {_show(pair)}, not a (handle, target) pair; {fix}")
        try:
            handle, target = point_list([_plain(q) for q in pair])
        except ValueError:
            flat = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in pair)
            raise BadInputError(f"points[{i}] is {_show(pair)}, not a pair of [x, y] points with real numbers"
                                + (" (a flat list of points? pair them)" if flat else "") + f"; {fix}") from None
        if not all(np.isfinite(c) for c in (*handle, *target)):
            raise BadInputError(f"points[{i}] is {_show(pair)}: a coordinate is not finite; {fix}")
        pairs.append((handle, target))
    return pairs


def _plain(value: Any) -> Any:
    """An array or tensor as nested lists (of Python numbers); anything else as it is."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return value.tolist() if isinstance(value, np.ndarray) else value


def _show(value: Any) -> str:
    return repr(value)[:40]


def validate_points(pairs: Sequence[Pair], size: tuple[int, int]) -> None:
    """Non-empty, inside the image, handle != target."""
    w, h = size
    if not pairs:
        raise BadInputError("no points given; give at least one (handle, target) pair")
    if len(pairs) > MAX_PAIRS:
        raise BadInputError(f"{len(pairs)} point pairs given, over the limit of {MAX_PAIRS}; drag fewer points "
                            "per edit (split it into several edits)")
    for i, pair in enumerate(pairs):
        for role, (x, y) in zip(("handle", "target"), pair):
            if not (0 <= x < w and 0 <= y < h):
                raise BadInputError(f"{role} {i + 1} at ({x:g}, {y:g}) is outside the {w}x{h} image; "
                                    f"use 0 <= x < {w}, 0 <= y < {h}")
        if tuple(pair[0]) == tuple(pair[1]):
            raise BadInputError(f"pair {i + 1}: handle equals target at {pair[0]}; move the target")


def duplicate_pairs(pairs: Sequence[Pair]) -> list[str]:
    """Pairs that fight each other, one note each: a pair given twice, one handle dragged to two
    targets, and A->B with B->A (each pair's motion term pulls the same content two ways)."""
    notes = []
    seen: dict[tuple, int] = {}
    handles: dict[tuple, int] = {}
    for i, (h, t) in enumerate(pairs, 1):
        h, t = tuple(h), tuple(t)
        if (h, t) in seen:
            notes.append(f"pair {i} repeats pair {seen[(h, t)]} ({_xy_text(h)} -> {_xy_text(t)}); give it once")
            continue
        if h in handles:
            notes.append(f"pairs {handles[h]} and {i} drag the same handle {_xy_text(h)} to two targets; only one "
                         "target can be reached, so give each handle once")
        if (t, h) in seen:
            notes.append(f"pairs {seen[(t, h)]} and {i} swap {_xy_text(h)} and {_xy_text(t)} (A->B with B->A); "
                         "they pull the same content both ways")
        seen[(h, t)] = i
        handles.setdefault(h, i)
    return notes


def _xy_text(p: tuple) -> str:
    return f"({p[0]:g}, {p[1]:g})"


def working_size(size: tuple[int, int], width: int = 512) -> tuple[int, int]:
    """Width 512, height int(512*h/w) rounded to a multiple of 8 (at least 8)."""
    if width < 16 or width % 8:
        raise BadInputError(f"width {width}: the working width must be a multiple of 8, at least 16")
    w, h = size
    hh = int(width * h / w)
    return width, max(8, int(round(hh / 8)) * 8)


@attrs.frozen
class EditInput:
    """A validated edit request in both coordinate systems."""

    image: Image.Image  # original RGB
    pairs: tuple[Pair, ...]  # original image pixels
    mask: np.ndarray | None  # (H0, W0) bool, True = editable; None = everything editable
    work_size: tuple[int, int]  # (W, H)
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def image_tensor(self) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1], bilinear-resized to the working size."""
        im = self.image.resize(self.work_size, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        return x.permute(2, 0, 1)[None]

    def latent_mask(self) -> torch.Tensor | None:
        """(1, 1, H/8, W/8) float, 1 = editable (nearest resizes)."""
        if self.mask is None:
            return None
        m = Image.fromarray(self.mask.astype(np.uint8) * 255).resize(self.work_size, Image.NEAREST)
        t = torch.from_numpy(np.asarray(m) > 127).float()[None, None]
        w, h = self.work_size
        return F.interpolate(t, size=(h // 8, w // 8), mode="nearest")

    def grid_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Handles and targets as (N, 2) (row, col) on the (H/2, W/2) grid, round-half-even."""
        (w0, h0), (w, h) = self.size, self.work_size
        xy = torch.tensor([c for pair in self.pairs for c in pair], dtype=torch.float64)  # (2N, 2) [x, y]
        rows = torch.round(xy[:, 1] * (h / h0) * (h // 2) / h)
        cols = torch.round(xy[:, 0] * (w / w0) * (w // 2) / w)
        rc = torch.stack([rows, cols], 1).float()
        return rc[0::2], rc[1::2]

    def to_image_px(self, grid: torch.Tensor) -> list[list[int]]:
        """(N, 2) (row, col) grid points -> [[x, y], ...] in original image pixels."""
        (w0, h0), (w, h) = self.size, self.work_size
        out = []
        for row, col in grid.detach().cpu().tolist():
            x = round(col * w / (w // 2))
            y = round(row * h / (h // 2))
            out.append([int(round(x * w0 / w)), int(round(y * h0 / h))])
        return out


def prepare_input(image: Any, pairs: Sequence[Pair], mask: Any = None, *, width: int = 512,
                  what: str = "image") -> EditInput:
    """Validate everything about the request (no model involved)."""
    notes: list[str] = []
    img = load_image(image, what, notes) if isinstance(image, (str, Path)) else image
    if not isinstance(img, Image.Image):
        raise BadInputError("image must be a file path or a PIL image")
    limit = max_pixels()
    if img.size[0] * img.size[1] > limit:
        raise BadInputError(f"{what} is {img.size[0]}x{img.size[1]}, over the limit of {limit} pixels "
                            "(GOODDRAG_MAX_PIXELS sets it); downscale it")
    img = to_8bit(img, what).convert("RGB")
    pairs = as_pairs(pairs)
    validate_points(pairs, img.size)
    notes += duplicate_pairs(pairs)
    arr = None
    if mask is None:
        notes.append("no mask given: the whole image is editable (mask term off)")
    else:
        m = load_image(mask, "mask", notes) if isinstance(mask, (str, Path)) else mask
        if isinstance(m, Image.Image):
            m = to_8bit(m, "mask")
            if m.size != img.size:
                raise BadInputError(f"mask is {m.size[0]}x{m.size[1]} but the image is {img.size[0]}x{img.size[1]}; "
                                    "give a mask of the image's size (white = editable)")
            arr = np.asarray(m.convert("L")) > 127
        else:
            arr = np.asarray(m).astype(bool)
            if arr.shape != (img.size[1], img.size[0]):
                raise BadInputError(f"mask has shape {arr.shape} but the image is {img.size[1]}x{img.size[0]} (HxW)")
        if not arr.any():
            notes.append("mask has no editable (white) pixel: the whole image is kept on the unedited trajectory")
        else:
            notes += _points_outside_mask(pairs, arr)
    inp = EditInput(img, tuple((tuple(h), tuple(t)) for h, t in pairs), arr, working_size(img.size, width), ())
    handles, targets = inp.grid_points()
    for i in range(len(pairs)):
        if bool((handles[i] == targets[i]).all()):
            ww, wh = inp.work_size
            notes.append(f"pair {i + 1}: handle and target fall in the same feature cell at the {ww}x{wh} working "
                         f"size (the image is {img.size[0]}x{img.size[1]}), so it cannot move; use a larger "
                         "working width or points further apart")
    return attrs.evolve(inp, warnings=tuple(notes))


def _points_outside_mask(pairs: Sequence[Pair], mask: np.ndarray) -> list[str]:
    """A handle or target outside the editable region cannot move cleanly: the loss holds that area
    to the input, so the content either stays or tears. One note per such point."""
    notes = []
    for i, pair in enumerate(pairs):
        for role, (x, y) in zip(("handle", "target"), pair):
            if not mask[int(y), int(x)]:
                notes.append(f"{role} {i + 1} at ({x:g}, {y:g}) is outside the editable mask, where the image is held "
                             f"to the input, so the content cannot move there cleanly; widen the mask to cover it")
    return notes
