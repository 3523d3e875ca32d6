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

from gooddrag.core.capture import GradientStep
from gooddrag.core.engine import DragContext, Outcome, diverged
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
        step = GradientStep(ctx, P.lr)  # the latent (1, 4, h, w) fp32 and Adam live in its buffers
        # device flags not read yet: [moved at the last drag, latent finite after the last denoising];
        # the host reads them with the next stop check, in the one sync of that drag
        pending: list[torch.Tensor] = []
        pending_t = None
        for k in range(indices[0], indices[-1] + 1):
            t = ctx.timesteps[k]
            if k not in indices:  # a subclass may drag on some timesteps only: just denoise the others
                z = ctx.denoise(z, t)
                continue
            step.start(z)  # a fresh Adam on this timestep's latent
            ref_vectors = ctx.reference.vectors(t, pts.handles0)  # (N, C)
            pts.handles = ctx.tracker.track(ref_vectors, ctx.tracking_features(step.z, t), pts.handles)
            ev.tracked(t, 0, pts.handles)
            flags = self._read(pts, pending)  # the one host sync before this timestep's first drag
            stalled = self._account(flags, stalled, pending_t)
            pending, stop = [], None
            for b in range(P.drags_per_timestep):
                stop = self._stop(flags[0], stalled)  # points move only when tracked: one check per drag
                if stop:
                    break
                for _ in range(P.steps_per_drag):
                    parts, feats = step(t)
                    ev.step(t, b, steps, parts)
                    steps += 1
                    if P.loss_threshold > 0 and float(parts.total) < P.loss_threshold:
                        stop = "loss_threshold"
                        break
                if P.fresh_tracking:
                    with torch.no_grad():
                        _, feats = ctx.forward(step.z, t)
                moved = ctx.tracker.track(ref_vectors, feats, pts.handles)
                moved_any = (moved != pts.handles).any()
                pts.handles = moved
                drags += 1
                ev.tracked(t, b + 1, pts.handles)
                ctx.preview(t, b, step.z)
                if stop:
                    break
                if b + 1 < P.drags_per_timestep:  # read now: the next drag of this timestep checks it
                    flags = self._read(pts, [moved_any])
                    stalled = self._account(flags, stalled, None)
                else:  # the last drag of the timestep: read with the next timestep's first check
                    pending = [moved_any]
            z = ctx.denoise(step.z, t)
            finite = torch.isfinite(z).all()
            if stop:
                reason = stop
                ev.stopped(t, reason)
                return Outcome(z, k + 1, reason, drags, steps, finite=(finite, t))
            pending, pending_t = pending + [finite], t
        ev.stopped(ctx.timesteps[indices[-1]], reason)
        return Outcome(z, indices[-1] + 1, reason, drags, steps, finite=(pending[-1], pending_t) if pending else None)

    def _read(self, pts, pending: list[torch.Tensor]) -> list[bool]:
        """[handles all within reach, *pending flags] in one host read."""
        reached = (pts.distances() < self.params.reach_distance).all()
        return torch.stack([reached, *pending]).tolist()

    def _account(self, flags: list[bool], stalled: int, finite_t: int | None) -> int:
        """Apply the flags read with the reached check: the stalled count, the last denoising's finiteness."""
        rest = flags[1:]
        if finite_t is not None:
            if not rest[-1]:
                raise diverged(finite_t)
            rest = rest[:-1]
        for moved in rest:
            stalled = 0 if moved else stalled + 1
        return stalled

    def _stop(self, reached: bool, stalled: int) -> str | None:
        if reached:
            return "reached"
        if self.params.patience and stalled >= self.params.patience:
            return "patience"
        return None


@hookimpl
def gooddrag_register_schedules():
    return [AlDD]
