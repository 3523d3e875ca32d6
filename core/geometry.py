"""Patch and window operations on the feature grid, shared by losses and trackers.

Points are (row, col) float tensors of shape (N, 2) on the feature grid. Every crop clamps its
indices to the map (SPEC Q3): a patch hanging over the border repeats the edge, so handles near
the border work, and results are identical to unclamped crops wherever those stay inside.
"""

from __future__ import annotations

import torch

# Upper bounds of the losses' parameters: beyond them a value can only overflow or allocate absurdly
# (the feature grid is a few hundred px; a step or weight of 1e308 gives inf, not a stronger drag).
MAX_STEP, MAX_LAM, MAX_PATCH_RADIUS = 1e4, 1e6, 64


def _offsets(radius: int, device: torch.device) -> torch.Tensor:
    return torch.arange(-radius, radius + 1, device=device)


def crop_patches(feats: torch.Tensor, centers: torch.Tensor, radius: int) -> torch.Tensor:
    """Integer (2r+1)^2 crops of ``feats`` (1, C, H, W) around integer ``centers`` (N, 2).

    Returns (N, C, 2r+1, 2r+1).
    """
    _, _, h, w = feats.shape
    off = _offsets(radius, feats.device)
    c = centers.round().long()
    rows = (c[:, 0:1] + off).clamp(0, h - 1)  # (N, k)
    cols = (c[:, 1:2] + off).clamp(0, w - 1)  # (N, k)
    return _gather(feats[0], rows, cols)


def _gather(fmap: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fmap (C, H, W), rows (N, k), cols (N, k) long -> (N, C, k, k) with out[n, :, i, j] = fmap[:, rows[n,i], cols[n,j]]."""
    n, k = rows.shape
    flat = fmap.flatten(1)  # (C, H*W)
    idx = rows[:, :, None] * fmap.shape[2] + cols[:, None, :]  # (N, k, k)
    out = flat[:, idx.reshape(-1)]  # (C, N*k*k)
    return out.reshape(fmap.shape[0], n, k, k).transpose(0, 1)


def sample_patches(feats: torch.Tensor, centers: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear (2r+1)^2 patches of ``feats`` (1, C, H, W) around real-valued ``centers`` (N, 2).

    Every sample in a patch shares the centre's fractional offset, so the patch is the weighted sum
    of four integer crops (top-left, top-right, bottom-left, bottom-right). Returns (N, C, k, k).
    """
    _, _, h, w = feats.shape
    off = _offsets(radius, feats.device)
    base = centers.floor()
    frac = centers - base  # (N, 2)
    r0 = base[:, 0:1].long() + off  # (N, k)
    c0 = base[:, 1:2].long() + off
    r1, c1 = (r0 + 1).clamp(0, h - 1), (c0 + 1).clamp(0, w - 1)
    r0, c0 = r0.clamp(0, h - 1), c0.clamp(0, w - 1)
    fr = frac[:, 0].view(-1, 1, 1, 1).to(feats.dtype)
    fc = frac[:, 1].view(-1, 1, 1, 1).to(feats.dtype)
    fmap = feats[0]
    top = _gather(fmap, r0, c0) * (1 - fc) + _gather(fmap, r0, c1) * fc
    bottom = _gather(fmap, r1, c0) * (1 - fc) + _gather(fmap, r1, c1) * fc
    return top * (1 - fr) + bottom * fr


def point_vectors(feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, C) of ``feats`` (1, C, H, W) at integer ``points`` (N, 2)."""
    return crop_patches(feats, points, 0)[:, :, 0, 0]


def window_argmin(feats: torch.Tensor, ref_vectors: torch.Tensor, centers: torch.Tensor, radius: int,
                  metric: str = "l1") -> torch.Tensor:
    """For each centre, the position in its (2r+1)^2 window (clamped to the map) whose feature is
    nearest to its reference vector. feats (1, C, H, W), ref_vectors (N, C), centers (N, 2) ->
    (N, 2) integer-valued positions, same dtype as ``centers``."""
    _, _, h, w = feats.shape
    off = _offsets(radius, feats.device)
    c = centers.round().long()
    rows = (c[:, 0:1] + off).clamp(0, h - 1)  # (N, k)
    cols = (c[:, 1:2] + off).clamp(0, w - 1)
    win = _gather(feats[0], rows, cols)  # (N, C, k, k)
    diff = win - ref_vectors[:, :, None, None].to(win.dtype)
    dist = diff.abs().sum(1) if metric == "l1" else diff.pow(2).sum(1)  # (N, k, k)
    k = rows.shape[1]
    best = dist.flatten(1).argmin(1)  # (N,) row-major first minimum
    bi, bj = best // k, best % k
    ar = torch.arange(len(c), device=feats.device)
    return torch.stack([rows[ar, bi], cols[ar, bj]], 1).to(centers.dtype)


def motion_steps(handles: torch.Tensor, targets: torch.Tensor, max_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step d_i = unit(q_i - p_i) * min(max_step, |q_i - p_i|) and the distances |q_i - p_i|."""
    delta = targets - handles  # (N, 2)
    dist = delta.norm(dim=1)  # (N,)
    unit = delta / dist.clamp_min(1e-8)[:, None]
    return unit * dist.clamp(max=max_step)[:, None], dist
