"""Patch-following motion supervision (DragDiffusion; docs/method.md, "DragDiffusion, the baseline").

The target patch is the current features at the *current* handle, detached, so the supervision
follows wherever tracking put the handle (and drifts with it). Unit steps, 3x3 patches.
"""

from __future__ import annotations

import attrs
import torch
from attrs.validators import ge, le

from gooddrag.core.engine import DragContext, LossParts
from gooddrag.core.geometry import (MAX_LAM, MAX_PATCH_RADIUS, MAX_STEP, crop_patches, motion_steps,
                                    sample_patches)
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p



class PatchFollowing:
    """Pull the features one grid pixel past each handle towards the current patch at the handle (DragDiffusion)."""

    name = "patch-following"

    @attrs.frozen(kw_only=True)
    class Params:
        patch_radius: int = p(1, "patches are (2r+1)^2 feature-grid px: 3x3", ge(0), le(MAX_PATCH_RADIUS))
        max_step: float = p(1.0, "step length in feature-grid px (1: a unit step)", ge(0), le(MAX_STEP), finite)
        skip_distance: float = p(2.0, "pairs closer than this to their target add no motion term", ge(0), finite)
        lam: float = p(0.1, "weight of the mask-preservation term", ge(0), le(MAX_LAM), finite)

    #: reads features only through gooddrag.core.geometry, so it can be given a FeatureMap
    reads_patches = True

    def uses_eps(self, ctx: DragContext) -> bool:
        """eps only enters through the mask-preservation term."""
        return bool(self.params.lam) and ctx.mask is not None and not ctx.mask_is_empty

    def __init__(self, params: "PatchFollowing.Params"):
        self.params = params
        self.weight = float((2 * params.patch_radius + 1) ** 2)  # 9 for r=1

    def __call__(self, ctx: DragContext, z: torch.Tensor, t: int, feats: torch.Tensor,
                 eps: torch.Tensor | None) -> LossParts:
        P, points = self.params, ctx.points
        feats = feats.float()
        step, dist = motion_steps(points.handles, points.targets, P.max_step)  # (N, 2), (N,)
        target = crop_patches(feats.detach(), points.handles, P.patch_radius)  # (N, C, k, k)
        moving = sample_patches(feats, points.handles + step, P.patch_radius)
        terms = self.weight * (target - moving).abs().mean(dim=(1, 2, 3))  # (N,)
        motion = (terms * (dist >= P.skip_distance)).sum()
        use_mask = P.lam and not ctx.mask_is_empty  # DragDiffusion skips the term for an empty mask
        preserve = ctx.preservation(z, eps, t) if use_mask else z.new_zeros(())
        return LossParts(motion + P.lam * preserve, motion, preserve)


@hookimpl
def gooddrag_register_losses():
    return [PatchFollowing]
