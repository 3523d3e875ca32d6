"""AlDD: Alternating Drag and Denoising (GoodDrag; docs/method.md, section 3).

Instead of one large drag at a single timestep, the drag is spread over the first ``drag_timesteps``
denoising steps: at each of them the latent is optimised for B drags of J Adam steps, the handles
are tracked after every drag, and then the timestep is denoised. Small per-step perturbations are
corrected by the following denoising, so the image does not collapse.
"""

from __future__ import annotations

import attrs
import torch
from attrs.validators import ge, gt, le

from gooddrag.core.engine import DragContext, Outcome, make_optimizer
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p
from gooddrag.core.warp import apply_warp


class AlDD:
    """Alternating Drag and Denoising over the first timesteps after inversion (GoodDrag)."""

    name = "aldd"

    @attrs.frozen(kw_only=True)
    class Params:
        num_inference_steps: int = p(50, "DDIM steps of the whole sampler", ge(1))
        inversion_strength: float = p(0.75, "fraction of steps inverted (0.75 -> start at t=741)", gt(0), le(1), finite)
        drag_timesteps: int = p(7, "how many denoising timesteps drag, from the first after inversion", ge(1))
        drags_per_timestep: int = p(10, "drags B per timestep, each followed by tracking", ge(1))
        steps_per_drag: int = p(3, "Adam steps J per drag", ge(1))
        lr: float = p(0.02, "Adam learning rate on the latent (at most 10: larger only overflows)", gt(0), le(10), finite)
        reach_distance: float = p(2.0, "done when every handle is this close to its target, in feature-grid px (2 image px each)", ge(0), finite)
        patience: int = p(10, "stop after this many drags in a row with no point moving (0 = never)", ge(0))
        loss_threshold: float = p(0.0, "stop when the loss falls below this (0 = off, as the public code)", ge(0), finite)
        fresh_tracking: bool = p(False, "track on a fresh forward pass, not on the last gradient step's (one step stale, as the official code)")
        warp_start: bool = p(False, "start from the closed-form warp of the inverted latent (the warp schedule's move): the drags refine it")

    def __init__(self, params: "AlDD.Params"):
        self.params = params

    def drag_indices(self, start: int, num_steps: int) -> list[int]:
        return list(range(start, min(start + self.params.drag_timesteps, num_steps)))

    def drag_passes(self, start: int, num_steps: int) -> tuple[int, int, int]:
        """At most (forwards, forward+backwards, next index): per drag timestep a tracking pass and a
        denoising pass (plus one per drag with fresh tracking) and B x J gradient steps."""
        P, k = self.params, len(self.drag_indices(start, num_steps))
        return k * (2 + (P.drags_per_timestep if P.fresh_tracking else 0)), \
            k * P.drags_per_timestep * P.steps_per_drag, start + k

    def run(self, ctx: DragContext) -> Outcome:
        P, pts, ev = self.params, ctx.points, ctx.events
        z = apply_warp(ctx) if P.warp_start else ctx.z_start  # warped: handles start where the warp put them
        stalled = 0  # consecutive post-drag tracking events in which no point moved (never reset between timesteps, as the official code)
        reason, drags, steps = "schedule_end", 0, 0
        indices = self.drag_indices(ctx.start_index, len(ctx.timesteps))
        for k in range(indices[0], indices[-1] + 1):
            t = ctx.timesteps[k]
            if k not in indices:  # a subclass may drag on some timesteps only: just denoise the others
                z = ctx.denoise(z, t)
                continue
            z = z.detach().clone().requires_grad_(True)  # (1, 4, h, w) fp32
            opt = make_optimizer(z, P.lr)
            ref_vectors = ctx.reference.vectors(t, pts.handles0)  # (N, C)
            pts.handles = ctx.tracker.track(ref_vectors, ctx.tracking_features(z, t), pts.handles)
            ev.tracked(t, 0, pts.handles)
            stop = None
            for b in range(P.drags_per_timestep):
                stop = self._stop(pts, stalled)  # points move only when tracked: one check per drag
                if stop:
                    break
                for _ in range(P.steps_per_drag):
                    eps, feats = ctx.forward(z, t, for_loss=True)
                    parts = ctx.loss(ctx, z, t, feats, eps)
                    opt.zero_grad(set_to_none=True)
                    parts.total.backward()
                    opt.step()
                    ev.step(t, b, steps, parts)
                    steps += 1
                    if P.loss_threshold > 0 and float(parts.total.detach()) < P.loss_threshold:
                        stop = "loss_threshold"
                        break
                if P.fresh_tracking:
                    with torch.no_grad():
                        _, feats = ctx.forward(z, t)
                moved = ctx.tracker.track(ref_vectors, feats.detach(), pts.handles)
                stalled = 0 if bool((moved != pts.handles).any()) else stalled + 1
                pts.handles = moved
                drags += 1
                ev.tracked(t, b + 1, pts.handles)
                ctx.preview(t, b, z)
                if stop:
                    break
            z = ctx.denoise(z, t)
            ctx.check_finite(z, t)
            if stop:
                reason = stop
                ev.stopped(t, reason)
                return Outcome(z, k + 1, reason, drags, steps)
        ev.stopped(ctx.timesteps[indices[-1]], reason)
        return Outcome(z, indices[-1] + 1, reason, drags, steps)

    def _stop(self, pts, stalled: int) -> str | None:
        if pts.reached(self.params.reach_distance):
            return "reached"
        if self.params.patience and stalled >= self.params.patience:
            return "patience"
        return None


@hookimpl
def gooddrag_register_schedules():
    return [AlDD]
