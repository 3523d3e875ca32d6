"""Information-preserving supervision with a squared-L2 patch distance instead of L1."""

import attrs
from attrs.validators import ge

from gooddrag.core.engine import LossParts
from gooddrag.core.geometry import crop_patches, motion_steps, sample_patches
from gooddrag.core.params import finite, p


class L2InfoPreserving:
    """Pull F(z) at p + d towards the reference patch at the original handle, in mean squared error."""

    name = "l2-info-preserving"

    @attrs.frozen(kw_only=True)
    class Params:
        patch_radius: int = p(4, "patch radius", ge(0))
        max_step: float = p(4.0, "largest step", ge(0), finite)
        lam: float = p(0.2, "mask term weight", ge(0), finite)

    def __init__(self, params):
        self.params = params

    def __call__(self, ctx, z, t, feats, eps):
        P, points = self.params, ctx.points
        step, dist = motion_steps(points.handles, points.targets, P.max_step)
        target = crop_patches(ctx.reference.features(t), points.handles0, P.patch_radius).float()
        moving = sample_patches(feats, points.handles + step, P.patch_radius).float()
        motion = (((target - moving) ** 2).mean(dim=(1, 2, 3)) * (dist >= 2.0)).sum()
        preserve = ctx.preservation(z, eps, t) if P.lam else z.new_zeros(())
        return LossParts(motion + P.lam * preserve, motion, preserve)
