"""Cosine-similarity window tracking: robust to feature magnitude changes during the drag."""

import attrs
import torch
from attrs.validators import ge

from gooddrag.core.geometry import crop_patches
from gooddrag.core.params import p


class CosineTracker:
    """Move each handle to the window position whose feature has the highest cosine similarity."""

    name = "cosine"

    @attrs.frozen(kw_only=True)
    class Params:
        radius: int = p(12, "search window is (2r+1)^2", ge(0))

    def __init__(self, params):
        self.params = params

    def track(self, ref_vectors: torch.Tensor, feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        r = self.params.radius
        _, _, h, w = feats.shape
        win = crop_patches(feats, points, r)  # (N, C, k, k), clamped at the border
        sim = torch.nn.functional.cosine_similarity(win, ref_vectors[:, :, None, None].to(win.dtype), dim=1)
        best = sim.flatten(1).argmax(1)  # (N,)
        k = 2 * r + 1
        offset = torch.stack([best // k, best % k], 1) - r  # (N, 2) (row, col)
        moved = points.round() + offset
        # clamp to the map with plain numbers: works on any device, no host tensors mixed in
        return torch.stack([moved[:, 0].clamp(0, h - 1), moved[:, 1].clamp(0, w - 1)], 1).to(points.dtype)
