"""Information-preserving motion supervision (GoodDrag; docs/method.md, section 4).

The target patch of every handle is the *reference* feature patch at the *original* handle, at the
same timestep. It never drifts, however many drag steps pass, which is what keeps the dragged
content's identity (the paper's answer to feature drift). Plus an L1 term that keeps the region
outside the mask on the unedited trajectory.
"""

from __future__ import annotations

import attrs
import torch
from attrs.validators import ge, le

from gooddrag.core.engine import DragContext, LossParts
from gooddrag.core.geometry import MAX_LAM, MAX_PATCH_RADIUS, MAX_STEP, Patches, crop_patches, motion_steps
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p


class InfoPreserving:
    """Pull the features one step past each handle towards the unedited patch at its original handle (GoodDrag).

    The target patch never changes, so the dragged content keeps its identity over many steps."""

    name = "info-preserving"

    @attrs.frozen(kw_only=True)
    class Params:
        patch_radius: int = p(4, "patches are (2r+1)^2 feature-grid px: 9x9", ge(0), le(MAX_PATCH_RADIUS))
        max_step: float = p(4.0, "each step moves the patch towards the target by at most this many feature-grid px",
                            ge(0), le(MAX_STEP), finite)
        skip_distance: float = p(2.0, "pairs closer than this to their target add no motion term", ge(0), finite)
        lam: float = p(0.2, "weight of the mask-preservation term (0.1 in the benchmark preset)", ge(0), le(MAX_LAM), finite)

    #: reads features only through gooddrag.core.geometry, so it can be given a FeatureMap
    reads_patches = True

    def uses_eps(self, ctx: DragContext) -> bool:
        """eps only enters through the mask-preservation term."""
        return self.params.lam > 0 and ctx.mask is not None

    def __init__(self, params: "InfoPreserving.Params"):
        self.params = params
        self.weight = float((2 * params.patch_radius) ** 2)  # 64 for r1=4: the public code's weight
        self._target: tuple[torch.Tensor, torch.Tensor] | None = None  # (F0_t, its patches at p_i0)
        self._drag: tuple[torch.Tensor, Patches, torch.Tensor] | None = None  # (handles, moved patches, weights)

    def prepare(self, ctx: DragContext, t: int) -> None:
        """What stays fixed for a whole drag, worked out once per drag (the handles move only when
        tracked): the motion steps, where the moved patches lie, which pairs count; and once per
        timestep the reference patches at the original handles."""
        P, points = self.params, ctx.points
        ref = ctx.reference.features(t)  # (1, C, H/2, W/2), the same object for the whole timestep
        if self._target is None or self._target[0] is not ref:
            self._target = (ref, crop_patches(ref, points.handles0, P.patch_radius).float())
        step, dist = motion_steps(points.handles, points.targets, P.max_step)  # (N, 2), (N,)
        moved = Patches(ref, points.handles + step, P.patch_radius, bilinear=True)
        self._drag = (points.handles, moved, self.weight * (dist >= P.skip_distance))  # weights (N,)

    def __call__(self, ctx: DragContext, z: torch.Tensor, t: int, feats: torch.Tensor,
                 eps: torch.Tensor | None) -> LossParts:
        P = self.params
        if not torch.compiler.is_compiling() and (  # a captured step is prepared by its caller
                self._drag is None or self._drag[0] is not ctx.points.handles
                or self._target[0] is not ctx.reference.features(t)):
            self.prepare(ctx, t)
        _, moved, weights = self._drag
        target = self._target[1]  # (N, C, k, k) reference patches at the original handles
        moving = moved.read(feats).float()  # (N, C, k, k)
        motion = ((target - moving).abs().mean(dim=(1, 2, 3)) * weights).sum()
        preserve = ctx.preservation(z, eps, t) if P.lam else z.new_zeros(())
        return LossParts(motion + P.lam * preserve, motion, preserve)


@hookimpl
def gooddrag_register_losses():
    return [InfoPreserving]
