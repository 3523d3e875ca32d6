"""Single-step drag (DragDiffusion; docs/method.md, "DragDiffusion, the baseline").

All optimisation happens on the latent of one timestep (t=681 after inverting 70 %), tracking on
fresh features before every gradient step; denoising then starts at that same timestep with mutual
self-attention.
"""

from __future__ import annotations

import attrs
from attrs.validators import ge, gt, le

from gooddrag.core.engine import DragContext, Outcome, make_optimizer
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p


class SingleStep:
    """Optimise the latent of one timestep for a fixed number of steps (DragDiffusion)."""

    name = "single-step"

    @attrs.frozen(kw_only=True)
    class Params:
        num_inference_steps: int = p(50, "DDIM steps of the whole sampler", ge(1))
        inversion_strength: float = p(0.7, "fraction of steps inverted (0.7 -> drag at t=681)", gt(0), le(1), finite)
        steps: int = p(80, "Adam steps on the latent (210 for DragDiffusion*)", ge(1))
        lr: float = p(0.01, "Adam learning rate on the latent (at most 10: larger only overflows)", gt(0), le(10), finite)
        reach_distance: float = p(2.0, "done when every handle is this close to its target, in feature-grid px (2 image px each)", ge(0), finite)
        loss_threshold: float = p(0.0, "stop when the loss falls below this (0 = off)", ge(0), finite)

    def __init__(self, params: "SingleStep.Params"):
        self.params = params

    def drag_indices(self, start: int, num_steps: int) -> list[int]:
        return [start]

    def drag_passes(self, start: int, num_steps: int) -> tuple[int, int, int]:
        """At most (forwards, forward+backwards, next index): one gradient step per Adam step."""
        return 0, self.params.steps, start

    def run(self, ctx: DragContext) -> Outcome:
        P, pts, ev = self.params, ctx.points, ctx.events
        k = ctx.start_index
        t = ctx.timesteps[k]
        z = ctx.z_start.detach().clone().requires_grad_(True)  # (1, 4, h, w) fp32
        opt = make_optimizer(z, P.lr)
        ref_vectors = ctx.reference.vectors(t, pts.handles0)  # (N, C)
        reason, done = "schedule_end", 0
        for step in range(P.steps):
            eps, feats = ctx.forward(z, t, for_loss=True)
            if step > 0:
                pts.handles = ctx.tracker.track(ref_vectors, feats.detach(), pts.handles)
                ev.tracked(t, step, pts.handles)
            if pts.reached(P.reach_distance):
                reason = "reached"
                break
            parts = ctx.loss(ctx, z, t, feats, eps)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            ev.step(t, step, step, parts)
            ctx.preview(t, step, z)
            done += 1
            if P.loss_threshold > 0 and float(parts.total.detach()) < P.loss_threshold:
                reason = "loss_threshold"
                break
        ctx.check_finite(z.detach(), t)
        ev.stopped(t, reason)
        return Outcome(z.detach(), k, reason, done, done)


@hookimpl
def gooddrag_register_schedules():
    return [SingleStep]
