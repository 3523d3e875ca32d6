"""Drag100 (GoodDrag benchmark) reader.

Layout, one folder per sample::

    <root>/<sample>/original.jpg   RGB input
    <root>/<sample>/mask.png       grayscale, 255 = editable (> 127 counts as editable)
    <root>/<sample>/points.json    {"points": [[x, y], ...]}: handle, target, handle, target, ...

Other files (image_with_points.jpg, meta.json, a top-level index.json) are optional. The sample id
is the folder name. There is no prompt. The group is the content group derived from the folder name
(``cat_2`` -> class ``cat`` -> ``animal``; ``generated_5_snow_leopard`` -> ``snow_leopard`` ->
``animal``) with the mapping below; an unknown class falls back to ``index.json``'s
``content_group`` when the file is there, else to ``other``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import attrs
import numpy as np

from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.samples import Sample
from gooddrag.plugins.datasets import (bad, check_mask, check_pairs, guarded, pairs_from_flat, read_image,
                                       read_json, subfolders)

IMAGE_NAMES = ("original.jpg", "original.png", "original.jpeg")
MARKERS = IMAGE_NAMES + ("points.json", "mask.png")

#: content class (folder name without the index) -> content group, as in the data README.
GROUPS: dict[str, str] = {
    **{c: "animal" for c in (
        "antelopes", "bird", "capybara", "cat", "deer", "dog", "dolphin", "dragon", "eagle", "elephant", "fox",
        "frog", "giraffe", "hamster", "horse", "hummingbird", "jellyfish", "kangaroo", "lion", "mantaray",
        "meerkat", "owl", "panda", "parrot", "peacock", "penguin", "rabbit", "raccoon", "seahorse", "seaturtle",
        "snow_leopard", "squirrel", "tiger", "leopard")},
    "art": "art",
    **{c: "object" for c in ("boat", "car", "clock", "drink", "furniture", "guitar", "chess")},
    "face": "human", "human": "human",
    "lighthouse": "landscape", "nature": "landscape",
    "plants": "plant",
}


def content_class(folder_name: str) -> str:
    """``cat_2`` -> ``cat``; ``generated_5_snow_leopard`` -> ``snow_leopard``."""
    m = re.fullmatch(r"generated_\d+_(.+)", folder_name)
    if m:
        return m.group(1)
    return re.sub(r"_\d+$", "", folder_name)


def _index_groups(root: Path) -> dict[str, str]:
    try:
        rows = json.loads((root / "index.json").read_text())
        return {str(r["sample"]): str(r["content_group"]) for r in rows if r.get("content_group")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


class Drag100:
    """Drag100: <sample>/original.jpg, mask.png (255 = editable), points.json; group from the name."""

    name = "drag100"

    @attrs.frozen(kw_only=True)
    class Params:
        pass

    def __init__(self, params: "Drag100.Params | None" = None):
        self.params = params or Drag100.Params()

    @staticmethod
    def detect(folder: Path) -> bool:
        """True when some sub-folder has an original image and points.json."""
        folder = Path(folder)
        if not folder.is_dir():
            return False
        return any((d / "points.json").is_file() and any((d / n).is_file() for n in IMAGE_NAMES)
                   for d in subfolders(folder))

    def samples(self, folder: Path) -> Iterator[Sample]:
        folder = Path(folder)
        index = None
        for d in subfolders(folder):
            if not any((d / n).exists() for n in MARKERS):
                continue  # not a sample folder
            if index is None:
                index = _index_groups(folder)
            yield guarded(d.name, GROUPS.get(content_class(d.name)) or index.get(d.name) or "other", d,
                          lambda: self.load(d, index))

    @staticmethod
    def load(d: Path, index: dict[str, str] | None = None) -> Sample:
        sid = d.name
        originals = [n for n in IMAGE_NAMES if (d / n).is_file()]
        if len(originals) > 1:
            raise bad(sid, f"has {' and '.join(originals)}: which one is the input is ambiguous; keep one")
        image_path = d / originals[0] if originals else d / IMAGE_NAMES[0]
        image = read_image(image_path, sid)
        data = read_json(d / "points.json", sid)
        flat = data.get("points") if isinstance(data, dict) else None
        if flat is None:
            raise bad(sid, 'points.json has no "points" list ({"points": [[x, y], ...]})')
        pairs = pairs_from_flat(flat, sid, "points.json")
        check_pairs(pairs, image.size, sid)
        mask_img = read_image(d / "mask.png", sid, mode="L")
        mask = check_mask(np.asarray(mask_img) > 127, image.size, sid, "mask.png")
        cls = content_class(sid)
        group = GROUPS.get(cls) or (index or {}).get(sid) or "other"
        return Sample(id=sid, group=group, image=image, mask=mask, pairs=pairs, prompt="", path=d)


@hookimpl
def gooddrag_register_datasets():
    return [Drag100]
