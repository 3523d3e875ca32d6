"""Built-in dataset plugins (Drag100, DragBench) and the helpers they share.

A dataset class has ``name``, a docstring, a frozen ``Params``, ``detect(folder) -> bool`` and
``samples(folder)`` yielding :class:`gooddrag.core.samples.Sample` sorted by id. A malformed sample
is yielded as a :class:`gooddrag.core.samples.MalformedSample` with its reason (see :func:`guarded`),
so one bad file does not stop a whole benchmark; ``load`` raises :class:`BadInputError` naming it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from gooddrag.core.errors import BadInputError, GoodDragWarning
from gooddrag.core.inputs import DuplicateKeyError, Pair, open_image, point_list, read_small_file, strict_json
from gooddrag.core.samples import MalformedSample, Sample


def guarded(sample_id: str, group: str, folder: Path, load: Any) -> Sample | MalformedSample:
    """``load()``, or the reason it failed as a MalformedSample (any error: a reader's bug on a
    hostile file must not stop the benchmark either)."""
    try:
        return load()
    except BadInputError as exc:
        return MalformedSample(id=sample_id, group=group, error=str(exc), path=folder)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return MalformedSample(id=sample_id, group=group, path=folder,
                               error=f"sample {sample_id!r}: unexpected {type(exc).__name__}" + (f": {msg}" if msg else ""))


def bad(sample_id: str, message: str) -> BadInputError:
    """A BadInputError that names the sample first."""
    return BadInputError(f"sample {sample_id!r}: {message}")


def read_image(path: Path, sample_id: str, mode: str = "RGB") -> Image.Image:
    """Open an image fully (no lazy reads later), as displayed (see ``open_image``), in ``mode``."""
    if not path.exists():
        raise bad(sample_id, f"{path.name} is missing ({path})")
    inside_sample(path, sample_id)
    try:
        return open_image(path, path.name).convert(mode)
    except BadInputError as exc:
        raise bad(sample_id, str(exc)) from None


def pairs_from_flat(points: Any, sample_id: str, where: str) -> tuple[Pair, ...]:
    """``[[x, y], ...]`` alternating handle, target -> pairs of float tuples, checked."""
    try:
        coords = point_list(points)
    except ValueError as exc:
        raise bad(sample_id, f"{where}: {exc}") from None
    if not coords:
        raise bad(sample_id, f"{where}: no points")
    if len(coords) % 2:
        raise bad(sample_id, f"{where}: {len(coords)} points, an odd number (handle, target, ... expected)")
    if not all(np.isfinite(c).all() for c in coords):
        raise bad(sample_id, f"{where}: a point is not finite")
    return tuple((coords[i], coords[i + 1]) for i in range(0, len(coords), 2))


def read_json(path: Path, sample_id: str, limit: int = 1 << 20) -> Any:
    """A small JSON file of a sample (regular files only: a FIFO or /dev/zero named points.json
    would hang or fill memory)."""
    if not path.exists():
        raise bad(sample_id, f"{path.name} is missing ({path})")
    inside_sample(path, sample_id)
    try:
        return strict_json(read_small_file(path, path.name, limit))
    except BadInputError as exc:
        raise bad(sample_id, str(exc)) from None
    except DuplicateKeyError as exc:
        raise bad(sample_id, f"{path.name} gives the key {str(exc)!r} twice (only one would count)") from None
    except (ValueError, RecursionError):
        raise bad(sample_id, f"{path.name} is not valid JSON") from None


def sample_file(folder: Path, name: Any, sample_id: str, what: str) -> Path:
    """``folder / name`` for a file name read from a sample's metadata: a relative path that stays
    inside the sample folder (an absolute or ``..`` path would read any file on the machine)."""
    if not isinstance(name, str) or not name:
        raise bad(sample_id, f"{what} is {name!r}, not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise bad(sample_id, f"{what} {name!r} is outside the sample folder; give a name relative to it")
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise bad(sample_id, f"{what} {name!r} leads outside the sample folder")
    return path


def check_pairs(pairs: Sequence[Pair], size: tuple[int, int], sample_id: str) -> None:
    """Every point inside the image. A handle equal to its target is kept (Drag100's plants_3 has four
    such pairs, and the official DAI counts them in N)."""
    w, h = size
    for i, pair in enumerate(pairs):
        for role, (x, y) in zip(("handle", "target"), pair):
            if not (0 <= x < w and 0 <= y < h):
                raise bad(sample_id, f"{role} {i + 1} at ({x:g}, {y:g}) is outside the {w}x{h} image")


def check_mask(mask: np.ndarray, size: tuple[int, int], sample_id: str, what: str) -> np.ndarray:
    """A (H, W) mask of the image's size -> bool (non-zero = editable)."""
    w, h = size
    if mask.ndim != 2 or mask.shape != (h, w):
        raise bad(sample_id, f"{what} has shape {tuple(mask.shape)} but the image is {h}x{w} (HxW)")
    return mask != 0


def inside_sample(path: Path, sample_id: str) -> None:
    """Refuse a sample file that is a link leading out of its sample folder: a benchmark is the
    files in its folder, and a link could read any file on the machine (or another sample's)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(path.parent)):
        raise bad(sample_id, f"{path.name} links outside its sample folder (to {real}); copy the file in")


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name. A linked folder counts only when it leads to a folder
    inside ``folder`` that is not listed already: an alias of another sample is skipped (each
    sample is scored once), and so is a link leading out of the dataset, each with one warning."""
    folder = Path(folder)
    found = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    root = os.path.realpath(folder)
    listed = {os.path.realpath(d): d for d in found if not d.is_symlink()}
    out = []
    for d in found:
        real = os.path.realpath(d)
        if d.is_symlink():
            if not Path(real).is_relative_to(root) or real == root:
                warnings.warn(f"{d} links outside the dataset folder (to {real}): skipped; copy the sample in to "
                              "use it", GoodDragWarning, stacklevel=2)
                continue
            if real in listed:
                warnings.warn(f"{d} is a link to {listed[real]}, another sample folder: skipped, so that sample is "
                              "scored once", GoodDragWarning, stacklevel=2)
                continue
            listed[real] = d
        out.append(d)
    return out
