"""Patch and window operations on the feature grid, shared by losses and trackers. ``feats`` is a
(1, C, H, W) tensor or a :class:`FeatureMap` (the same map, computed only where read).

Points are (row, col) float tensors of shape (N, 2) on the feature grid. Every crop clamps its
indices to the map (docs/method.md, "Image borders"): a patch hanging over the border repeats the edge, so handles near
the border work, and results are identical to unclamped crops wherever those stay inside.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F


class FeatureMap:
    """A backbone's low-resolution features (1, C, h, w) seen as their bilinear upsampling
    (``align_corners=False``) to the feature grid (1, C, H, W), computed only where it is read.

    Losses and trackers read a few 9x9 patches and windows of a 640-channel 256x256 map; building
    that map, and back-propagating through it, at every step is most of the memory traffic of a
    drag step. Evaluating the same separable bilinear formula only at the read positions gives the
    same values (up to float rounding) and sends the gradient straight to the low-resolution map.
    """

    def __init__(self, lowres: torch.Tensor, size: tuple[int, int]):
        self.lowres = lowres  # (1, C, h, w)
        self.size = (int(size[0]), int(size[1]))  # (H, W) of the feature grid

    @property
    def shape(self) -> torch.Size:
        return torch.Size((1, self.lowres.shape[1], *self.size))

    @property
    def device(self) -> torch.device:
        return self.lowres.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lowres.dtype

    def detach(self) -> "FeatureMap":
        return FeatureMap(self.lowres.detach(), self.size)

    def float(self) -> "FeatureMap":
        return FeatureMap(self.lowres.float(), self.size)

    def dense(self) -> torch.Tensor:
        """The whole upsampled map (1, C, H, W), as ``F.interpolate`` computes it."""
        return F.interpolate(self.lowres, size=self.size, mode="bilinear", align_corners=False)

    def gather(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Values at integer grid ``rows`` (N, k) x ``cols`` (N, k) -> (N, C, k, k)."""
        (r0, r1, wr), (c0, c1, wc) = (_source(rows, self.size[0], self.lowres.shape[2]),
                                      _source(cols, self.size[1], self.lowres.shape[3]))
        x = self.lowres[0]
        wr, wc = wr[:, None, :, None].to(x.dtype), wc[:, None, None, :].to(x.dtype)  # (N, 1, k, 1), (N, 1, 1, k)
        top = _gather(x, r0, c0) * (1 - wc) + _gather(x, r0, c1) * wc
        bottom = _gather(x, r1, c0) * (1 - wc) + _gather(x, r1, c1) * wc
        return top * (1 - wr) + bottom * wr


def _source(index: torch.Tensor, out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower/upper source indices and the upper weight of output ``index`` under bilinear
    upsampling with align_corners=False (the source position is clamped at 0, as torch does)."""
    scale = in_size / out_size
    src = ((index.to(torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, src - lo


Features = Union[torch.Tensor, FeatureMap]

# Upper bounds of the losses' parameters: beyond them a value can only overflow or allocate absurdly
# (the feature grid is a few hundred px; a step or weight of 1e308 gives inf, not a stronger drag).
MAX_STEP, MAX_LAM, MAX_PATCH_RADIUS = 1e4, 1e6, 64


def _offsets(radius: int, device: torch.device) -> torch.Tensor:
    return torch.arange(-radius, radius + 1, device=device)


def crop_patches(feats: Features, centers: torch.Tensor, radius: int) -> torch.Tensor:
    """Integer (2r+1)^2 crops of ``feats`` (1, C, H, W) around integer ``centers`` (N, 2).

    Returns (N, C, 2r+1, 2r+1).
    """
    _, _, h, w = feats.shape
    off = _offsets(radius, feats.device)
    c = centers.round().long()
    rows = (c[:, 0:1] + off).clamp(0, h - 1)  # (N, k)
    cols = (c[:, 1:2] + off).clamp(0, w - 1)  # (N, k)
    return read(feats, rows, cols)


def read(feats: Features, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``feats`` (1, C, H, W) tensor or FeatureMap at integer rows (N, k) x cols (N, k) -> (N, C, k, k)."""
    return feats.gather(rows, cols) if isinstance(feats, FeatureMap) else _gather(feats[0], rows, cols)


def _gather(fmap: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fmap (C, H, W), rows (N, k), cols (N, k) long -> (N, C, k, k) with out[n, :, i, j] = fmap[:, rows[n,i], cols[n,j]]."""
    n, k = rows.shape
    flat = fmap.flatten(1)  # (C, H*W)
    idx = rows[:, :, None] * fmap.shape[2] + cols[:, None, :]  # (N, k, k)
    out = flat[:, idx.reshape(-1)]  # (C, N*k*k)
    return out.reshape(fmap.shape[0], n, k, k).transpose(0, 1)


def sample_patches(feats: Features, centers: torch.Tensor, radius: int) -> torch.Tensor:
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
    top = read(feats, r0, c0) * (1 - fc) + read(feats, r0, c1) * fc
    bottom = read(feats, r1, c0) * (1 - fc) + read(feats, r1, c1) * fc
    return top * (1 - fr) + bottom * fr


def point_vectors(feats: Features, points: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, C) of ``feats`` (1, C, H, W) at integer ``points`` (N, 2)."""
    return crop_patches(feats, points, 0)[:, :, 0, 0]


def window_argmin(feats: Features, ref_vectors: torch.Tensor, centers: torch.Tensor, radius: int,
                  metric: str = "l1") -> torch.Tensor:
    """For each centre, the position in its (2r+1)^2 window (clamped to the map) whose feature is
    nearest to its reference vector. feats (1, C, H, W), ref_vectors (N, C), centers (N, 2) ->
    (N, 2) integer-valued positions, same dtype as ``centers``."""
    _, _, h, w = feats.shape
    off = _offsets(radius, feats.device)
    c = centers.round().long()
    rows = (c[:, 0:1] + off).clamp(0, h - 1)  # (N, k)
    cols = (c[:, 1:2] + off).clamp(0, w - 1)
    win = read(feats, rows, cols)  # (N, C, k, k)
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
