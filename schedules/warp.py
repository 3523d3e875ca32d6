"""Instant drag: one closed-form warp of the inverted latent, no optimisation (docs/method.md, "Instant drag").

After DDIM inversion to the first timestep, every drag pulls the latent around its handle towards its
target: a position p of the editable region moves by w(p) * (q - h), with w = 1 at the handle and
falling linearly to 0 at ``falloff`` drag lengths from it, so the content between handle and target
is compressed in front of the handle and stretched behind it (FastDrag's idea). Positions the move
leaves empty are filled from their nearest source neighbour, or with fresh noise at the latent's own
level (LazyDrag); with several drags each position follows the drag of its nearest handle (LazyDrag),
or a blend of all of them. The engine then denoises from that same timestep with mutual
self-attention on the unedited trajectory, which keeps the identity.

No LoRA, no loss, no tracker, no gradients and no reference trajectory: ``needs`` is empty, so the
engine builds none of them. An edit costs the inversion and the finish, nothing else. The warp
itself is the pure tensor function ``gooddrag.core.warp.warp_latent`` (shared with AlDD's
``warp_start``, which makes it the coarse first move of an optimised drag).
"""

from __future__ import annotations

import attrs
from attrs.validators import ge, gt, in_, le

from gooddrag.core.engine import DragContext, Outcome
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p
from gooddrag.core.warp import COMBINE, FALLOFF, FILL, apply_warp


class Warp:
    """Instant drag: one closed-form warp of the inverted latent, then the mutual-attention finish."""

    name = "warp"
    #: what the engine must build for this schedule: nothing (no LoRA, loss, tracker, reference)
    needs = frozenset()

    @attrs.frozen(kw_only=True)
    class Params:
        num_inference_steps: int = p(20, "DDIM steps of the whole sampler (the inversion and the finish are 70 % of them)", ge(1))
        inversion_strength: float = p(0.7, "fraction of steps inverted; the warp happens there (0.7 of 20 -> t=651)", gt(0), le(1), finite)
        combine: str = p(COMBINE, "several drags: each position follows its nearest handle's drag, or a blend of all", in_(("nearest", "blend")))
        fill: str = p(FILL, "revealed positions: nearest source neighbour, or fresh noise at the latent's level", in_(("nearest", "noise")))
        falloff: float = p(FALLOFF, "reach of the pull in drag lengths: w = 1 - distance / (falloff * |q - h|); >= 1 keeps content in front of the handle in order", gt(0), finite)

    def __init__(self, params: "Warp.Params"):
        self.params = params

    def drag_indices(self, start: int, num_steps: int) -> list[int]:
        return [start]

    def drag_passes(self, start: int, num_steps: int) -> tuple[int, int, int]:
        """(forwards, forward+backwards, next index): the warp makes no UNet pass."""
        return 0, 0, start

    def run(self, ctx: DragContext) -> Outcome:
        P = self.params
        k = ctx.start_index
        t = ctx.timesteps[k]
        z = apply_warp(ctx, falloff=P.falloff, combine=P.combine, fill=P.fill)  # (1, 4, h, w) at t
        ctx.events.tracked(t, 0, ctx.points.handles)
        ctx.check_finite(z, t)
        ctx.events.stopped(t, "warped")
        return Outcome(z, k, "warped", drags=1, steps=0)


@hookimpl
def gooddrag_register_schedules():
    return [Warp]
