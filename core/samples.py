"""The benchmark sample contract shared by dataset and metric plugins."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
from PIL import Image

from gooddrag.core.inputs import Pair


@attrs.frozen(kw_only=True)
class Sample:
    """One benchmark item. Points are image pixels [x, y] of ``image``."""

    id: str  # unique within the dataset, e.g. "cat_2" or "animals/JH_2023-09-14-1820-16"
    group: str  # Drag100 content group / DragBench category
    image: Image.Image  # RGB original
    mask: np.ndarray | None  # (H, W) bool, True = editable
    pairs: tuple[Pair, ...]  # ((hx, hy), (tx, ty)), ...
    prompt: str = ""
    path: Path | None = None  # the sample's folder


@attrs.frozen(kw_only=True)
class MalformedSample:
    """A sample that could not be read: ``bench`` and ``score`` record it as failed with ``error``
    and go on with the others, instead of one bad file stopping the whole run."""

    id: str
    group: str
    error: str  # one line, naming the sample and the culprit
    path: Path | None = None
    pairs: tuple[Pair, ...] = ()
