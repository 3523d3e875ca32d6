"""DAI, the Dragging Accuracy Index of GoodDrag (docs/metrics.md). Lower is better.

For each handle/target pair i and patch radius g, with images as RGB floats in [0, 1] and no
resizing (the result must have the original's size)::

    SSD_i = sum over the (2g+1)^2 patch and the 3 channels of (original[handle_i + o] - result[target_i + o])^2

    dai_<g>          = (sum_i SSD_i / N) / (2g+1)^2 / N      the official script (divides by N twice)
    dai_pairmean_<g> = (sum_i SSD_i / N) / (2g+1)^2          the per-pair mean (divides by N once)

``dai_<g>`` is the figure to compare with the paper; ``dai_pairmean_<g>`` does not shrink with the
number of pairs. Points are rounded to the nearest pixel (the datasets' points are integers).

Border rule: a patch that would cross the image border is clipped *on both sides consistently*:
only the offsets o for which both ``handle + o`` and ``target + o`` lie inside the image are
compared, and the pair's sum is divided by the number of those offsets instead of (2g+1)^2 (the
pair's mean squared difference per pixel). Where no patch crosses the border this is exactly the
official formula; the official script does not handle that case (numpy slicing misaligns).
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np
from PIL import Image

from gooddrag.core.errors import BadInputError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.metrics import mean_aggregate
from gooddrag.core.params import p
from gooddrag.core.samples import Sample


def parse_gammas(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,5,10,20"`` or ``(1, 5, 10, 20)`` -> a tuple of distinct non-negative ints."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(int(str(x).strip()) for x in items if str(x).strip() != "")
    except ValueError:
        raise ValueError(f"'gammas' must be comma-separated integers like 1,5,10,20 (got {value!r})") from None
    if not out or any(g < 0 for g in out) or len(set(out)) != len(out):
        raise ValueError(f"'gammas' must be distinct integers >= 0, e.g. 1,5,10,20 (got {value!r})")
    return out


def _valid_gammas(instance, attribute, value) -> None:
    parse_gammas(value)


def to_float_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def pair_ssd(original: np.ndarray, result: np.ndarray, handle: Sequence[float], target: Sequence[float],
             g: int) -> tuple[float, int]:
    """Sum of squared differences between the original's patch at ``handle`` and the result's patch at
    ``target`` (both [x, y]) over the offsets where both patches are inside, and that offset count."""
    h, w = original.shape[:2]
    hx, hy = (int(round(float(c))) for c in handle)
    tx, ty = (int(round(float(c))) for c in target)
    x0, x1 = max(-g, -hx, -tx), min(g, w - 1 - hx, w - 1 - tx)
    y0, y1 = max(-g, -hy, -ty), min(g, h - 1 - hy, h - 1 - ty)
    if x1 < x0 or y1 < y0:
        return 0.0, 0
    a = original[hy + y0:hy + y1 + 1, hx + x0:hx + x1 + 1]
    b = result[ty + y0:ty + y1 + 1, tx + x0:tx + x1 + 1]
    return float(np.square(a - b).sum()), (x1 - x0 + 1) * (y1 - y0 + 1)


class Dai:
    """Dragging Accuracy Index: patch SSD between original at handle and result at target (lower is better)."""

    name = "dai"
    higher_is_better = False

    @attrs.frozen(kw_only=True)
    class Params:
        gammas: str = p("1,5,10,20", "patch radii g, comma-separated: patch is (2g+1)^2", _valid_gammas)
        pairmean: bool = p(True, "also report dai_pairmean_<g> (divided by N once instead of twice)")

    def __init__(self, params: "Dai.Params | None" = None):
        self.params = params or Dai.Params()
        self.gammas = parse_gammas(self.params.gammas)

    def check(self) -> None:
        """DAI needs no weights, keys or extra packages."""

    def keys(self) -> list[str]:
        out = [f"dai_{g}" for g in self.gammas]
        if self.params.pairmean:
            out += [f"dai_pairmean_{g}" for g in self.gammas]
        return out

    def score(self, sample: Sample, result: Image.Image, final_points: list[list[float]] | None) -> dict[str, float]:
        if result.size != sample.image.size:
            raise BadInputError(
                f"sample {sample.id!r}: the result is {result.size[0]}x{result.size[1]} but the original is "
                f"{sample.image.size[0]}x{sample.image.size[1]}; DAI compares without resizing, give the result "
                "at the original's size")
        if not sample.pairs:
            raise BadInputError(f"sample {sample.id!r} has no handle/target pairs")
        original, res = to_float_rgb(sample.image), to_float_rgb(result)
        n = len(sample.pairs)
        out: dict[str, float] = {}
        pairmean: dict[str, float] = {}
        for g in self.gammas:
            total = 0.0
            for handle, target in sample.pairs:
                ssd, count = pair_ssd(original, res, handle, target, g)
                if count == 0:
                    raise BadInputError(f"sample {sample.id!r}: a patch at {handle}/{target} is empty")
                full = (2 * g + 1) ** 2
                total += ssd * full / count  # == ssd unless the patch was clipped at the border
            per_pair = total / n / (2 * g + 1) ** 2
            out[f"dai_{g}"] = per_pair / n
            pairmean[f"dai_pairmean_{g}"] = per_pair
        if self.params.pairmean:
            out.update(pairmean)
        return out

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """Mean over samples (as the official script averages per-image DAI)."""
        return mean_aggregate(rows)


@hookimpl
def gooddrag_register_metrics():
    return [Dai]

