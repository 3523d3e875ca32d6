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
engine builds none of them. An edit costs the inversion and the finish, nothing else.
"""

from __future__ import annotations

import attrs
import torch
from attrs.validators import ge, gt, in_, le

from gooddrag.core.engine import DragContext, Outcome
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p

#: the feature grid (where points live) is this many times the latent grid on each side
GRID_PER_LATENT = 4


def warp_latent(z: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, *,
                falloff: float = 2.0, combine: str = "nearest", fill: str = "nearest",
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the latent ``z`` (1, C, h, w) so that each handle's content lands on its target.

    ``handles``/``targets``: (N, 2) float (row, col) on the latent grid. ``mask``: (1, 1, h, w), 1 =
    editable, or None (all editable). Returns (the warped latent (1, C, h, w), the revealed positions
    (1, 1, h, w) bool). Outside the mask the result is ``z`` bit for bit. ``noise`` (1, C, h, w) is
    what ``fill="noise"`` writes into revealed positions.

    A forward warp: every editable position p is sent to round(p + v(p)); where several land on one
    position the one pulled hardest (largest weight) wins, as dragged content slides over what lies in
    front of it; content sent outside the mask or the latent is dropped; editable positions nothing
    lands on are revealed and filled."""
    _, c, h, w = z.shape
    dev = z.device
    rows, cols = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    pos = torch.stack([rows, cols], -1).reshape(-1, 2).float()  # (hw, 2)
    editable = torch.ones(h * w, dtype=torch.bool, device=dev) if mask is None else mask.reshape(-1) > 0.5  # (hw,)
    h_, q_ = handles.to(dev, torch.float32), targets.to(dev, torch.float32)  # (N, 2)
    d = q_ - h_  # (N, 2) each drag's full move
    reach = (falloff * d.norm(dim=1)).clamp_min(1.0)  # (N,) distance at which the pull is gone
    dist = torch.cdist(pos, h_)  # (hw, N)
    weight = (1 - dist / reach).clamp_min(0)  # (hw, N): 1 at the handle, 0 from `reach` on
    if combine == "nearest":  # each position follows only the drag of its nearest handle
        k = dist.argmin(1)  # (hw,)
        pull = weight.gather(1, k[:, None])  # (hw, 1)
        move = pull * d[k]  # (hw, 2)
    elif combine == "blend":  # drags weighted by their own pull: one drag alone gives w * d
        total = weight.sum(1, keepdim=True)  # (hw, 1)
        move = (weight ** 2) @ d / total.clamp_min(1e-12)  # (hw, 2)
        pull = weight.max(1, keepdim=True).values  # (hw, 1)
    else:
        raise ValueError(f"combine={combine!r}; use nearest or blend")
    pull = torch.where(editable[:, None], pull[:, :1], pull.new_full((), -1.0))[:, 0]  # (hw,) fixed content: -1
    dest = (pos + move * editable[:, None]).round().long()  # (hw, 2)
    inside = (dest[:, 0] >= 0) & (dest[:, 0] < h) & (dest[:, 1] >= 0) & (dest[:, 1] < w)
    flat = dest[:, 0].clamp(0, h - 1) * w + dest[:, 1].clamp(0, w - 1)  # (hw,)
    keep = inside & editable & editable[flat]  # content stays inside the latent and the mask
    sink = h * w  # an extra slot for dropped content
    flat = torch.where(keep, flat, flat.new_full((), sink))
    best = pos.new_full((sink + 1,), -2.0).scatter_reduce(0, flat, pull, "amax")  # (hw+1,) strongest arrival
    winner = keep & (pull == best[flat])
    source = torch.full((sink + 1,), -1, dtype=torch.long, device=dev).scatter_reduce(
        0, torch.where(winner, flat, flat.new_full((), sink)), torch.arange(h * w, device=dev), "amax")[:sink]  # (hw,)
    zf = z.reshape(c, h * w)  # (C, hw)
    moved = zf[:, source.clamp_min(0)]  # (C, hw)
    revealed = editable & (source < 0)  # (hw,) editable positions nothing landed on
    if fill == "nearest":
        filled = ~revealed  # every position that holds content after the move (fixed ones too)
        holes = revealed.nonzero()[:, 0]  # (R,) once per edit, not in a loop
        near = torch.cdist(pos[holes], pos[filled]).argmin(1)  # (R,) nearest position holding content
        moved[:, holes] = torch.where(editable, moved, zf)[:, filled][:, near]
    elif fill == "noise":
        if noise is None:
            raise ValueError("fill='noise' needs the noise tensor")
        moved = torch.where(revealed, noise.reshape(c, h * w).to(z.dtype), moved)
    else:
        raise ValueError(f"fill={fill!r}; use nearest or noise")
    out = torch.where(editable, moved, zf)  # (C, hw): outside the mask, the input itself
    return out.reshape(1, c, h, w), revealed.reshape(1, 1, h, w)


def warped_points(handles: torch.Tensor, targets: torch.Tensor, hw: tuple[int, int], *, falloff: float,
                  combine: str) -> torch.Tensor:
    """Where the warp puts each handle (N, 2), on the latent grid: its target under ``nearest``,
    close to it under ``blend`` (other drags pull too)."""
    if combine == "nearest":
        return targets.clone()
    d = targets - handles  # (N, 2)
    reach = (falloff * d.norm(dim=1)).clamp_min(1.0)  # (N,)
    weight = (1 - torch.cdist(handles, handles) / reach).clamp_min(0)  # (N, N)
    move = (weight ** 2) @ d / weight.sum(1, keepdim=True).clamp_min(1e-12)
    hi = torch.tensor([hw[0] - 1, hw[1] - 1], dtype=handles.dtype, device=handles.device)
    return (handles + move).round().clamp(min=torch.zeros_like(hi), max=hi)


class Warp:
    """Instant drag: one closed-form warp of the inverted latent, then the mutual-attention finish."""

    name = "warp"
    #: what the engine must build for this schedule: nothing (no LoRA, loss, tracker, reference)
    needs = frozenset()

    @attrs.frozen(kw_only=True)
    class Params:
        num_inference_steps: int = p(20, "DDIM steps of the whole sampler (the inversion and the finish are 70 % of them)", ge(1))
        inversion_strength: float = p(0.7, "fraction of steps inverted; the warp happens there (0.7 of 20 -> t=651)", gt(0), le(1), finite)
        combine: str = p("nearest", "several drags: each position follows its nearest handle's drag, or a blend of all", in_(("nearest", "blend")))
        fill: str = p("noise", "revealed positions: nearest source neighbour, or fresh noise at the latent's level", in_(("nearest", "noise")))
        falloff: float = p(2.0, "reach of the pull in drag lengths: w = 1 - distance / (falloff * |q - h|); >= 1 keeps content in front of the handle in order", gt(0), finite)

    def __init__(self, params: "Warp.Params"):
        self.params = params

    def drag_indices(self, start: int, num_steps: int) -> list[int]:
        return [start]

    def run(self, ctx: DragContext) -> Outcome:
        P, pts = self.params, ctx.points
        k = ctx.start_index
        t = ctx.timesteps[k]
        z = ctx.z_start.detach()  # (1, 4, h, w) the inverted latent at t
        h, w = z.shape[-2:]
        hi = torch.tensor([h - 1, w - 1], dtype=torch.float32, device=z.device)
        to_latent = lambda g: (g / GRID_PER_LATENT).clamp(min=torch.zeros_like(hi), max=hi)  # noqa: E731
        handles, targets = to_latent(pts.handles0), to_latent(pts.targets)  # (N, 2) latent (row, col)
        noise = torch.randn_like(z) * z.std() if P.fill == "noise" else None  # the level of this latent
        with torch.no_grad():
            z, _ = warp_latent(z, handles, targets, ctx.mask, falloff=P.falloff, combine=P.combine, fill=P.fill,
                               noise=noise)
        moved = warped_points(handles, targets, (h, w), falloff=P.falloff, combine=P.combine)
        pts.handles = (moved * GRID_PER_LATENT).clamp(max=pts.targets.new_tensor([GRID_PER_LATENT * h - 1,
                                                                                 GRID_PER_LATENT * w - 1]))
        ctx.events.tracked(t, 0, pts.handles)
        ctx.check_finite(z, t)
        ctx.events.stopped(t, "warped")
        return Outcome(z, k, "warped", drags=1, steps=0)


@hookimpl
def gooddrag_register_schedules():
    return [Warp]
