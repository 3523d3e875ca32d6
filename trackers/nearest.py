"""Window nearest-neighbour point tracking (docs/method.md, section 5).

Each handle moves to the position in a (2r+1)^2 window around it whose current feature is closest
(L1 over channels) to the reference feature of the original handle. r=12 (25x25) for GoodDrag,
r=3 (7x7) for DragDiffusion. Windows are clamped to the feature map (see docs/method.md, "Image borders").
"""

from __future__ import annotations

import attrs
import torch
from attrs.validators import ge, in_

from gooddrag.core.geometry import window_argmin
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import p


class Nearest:
    """Move each handle to the best-matching feature in a window around it."""

    name = "nearest"

    @attrs.frozen(kw_only=True)
    class Params:
        radius: int = p(12, "search window is (2r+1)^2 feature-grid px: 25x25 (3, 7x7, for DragDiffusion)", ge(0))
        metric: str = p("l1", "feature distance: l1 (the methods') or l2", in_(("l1", "l2")))

    #: reads features only through gooddrag.core.geometry, so it can be given a FeatureMap
    reads_patches = True

    def __init__(self, params: "Nearest.Params"):
        self.params = params

    def track(self, ref_vectors: torch.Tensor, feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """ref_vectors (N, C), feats (1, C, H, W), points (N, 2) -> new points (N, 2)."""
        return window_argmin(feats, ref_vectors, points, self.params.radius, self.params.metric)


@hookimpl
def gooddrag_register_trackers():
    return [Nearest]
