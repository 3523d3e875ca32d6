"""The closed-form drag warp (docs/method.md, "Instant drag"): a pure function of tensors.

Every drag pulls the latent around its handle towards its target: a position p of the editable
region moves by w(p) (q - h), with w = 1 at the handle falling linearly to 0 at ``falloff`` drag
lengths from it. Used by the ``warp`` schedule (the whole edit) and by AlDD's ``warp_start`` (the
coarse move that the optimisation then refines).
"""

from __future__ import annotations

from typing import Any

import torch

#: the warp's defaults (the ``warp`` schedule's Params and AlDD's ``warp_start`` use them): each position
#: follows its nearest handle's drag, revealed positions get fresh noise (LazyDrag's two fixes), and the
#: pull reaches twice the drag length
COMBINE, FILL, FALLOFF = "nearest", "noise", 2.0

#: the feature grid (where points live) is this many times the latent grid on each side
GRID_PER_LATENT = 4


def warp_latent(z: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, *,
                falloff: float = FALLOFF, combine: str = COMBINE, fill: str = "nearest",
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


def apply_warp(ctx: Any, *, falloff: float = FALLOFF, combine: str = COMBINE, fill: str = FILL) -> torch.Tensor:
    """Warp ``ctx.z_start`` (1, 4, h, w) by the context's points and mask; the handles ``ctx.points``
    are set to where the warp put them. Returns the warped latent (not yet denoised at its timestep)."""
    pts, z = ctx.points, ctx.z_start.detach()  # (1, 4, h, w) the inverted latent
    h, w = z.shape[-2:]
    hi = torch.tensor([h - 1, w - 1], dtype=torch.float32, device=z.device)
    handles = (pts.handles0 / GRID_PER_LATENT).clamp(min=torch.zeros_like(hi), max=hi)  # (N, 2) latent (row, col)
    targets = (pts.targets / GRID_PER_LATENT).clamp(min=torch.zeros_like(hi), max=hi)
    noise = torch.randn_like(z) * z.std() if fill == "noise" else None  # at the level of this latent
    with torch.no_grad():
        z, _ = warp_latent(z, handles, targets, ctx.mask, falloff=falloff, combine=combine, fill=fill, noise=noise)
    moved = warped_points(handles, targets, (h, w), falloff=falloff, combine=combine)  # (N, 2) latent
    top = pts.targets.new_tensor([GRID_PER_LATENT * h - 1, GRID_PER_LATENT * w - 1])
    pts.handles = (moved * GRID_PER_LATENT).clamp(max=top)  # (N, 2) on the feature grid
    return z
