"""Patch and window operations on the feature grid, shared by losses and trackers. ``feats`` is a
(1, C, H, W) tensor or a :class:`FeatureMap` (the same map, computed only where read).

Points are (row, col) float tensors of shape (N, 2) on the feature grid. Every crop clamps its
indices to the map (docs/method.md, "Image borders"): a patch hanging over the border repeats the edge, so handles near
the border work, and results are identical to unclamped crops wherever those stay inside.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _offsets(radius: int, device: torch.device) -> torch.Tensor:
    """-r..r as a long tensor on ``device``, made once per (radius, device) (never written to)."""
    return torch.arange(-radius, radius + 1, device=device)


class Patches:
    """Where (2r+1)^2 patches around N centres lie on a feature grid, worked out once and then read
    from any map of that grid (``read``) in one gather.

    Everything that depends only on the centres (indices, clamping, bilinear weights) is computed
    here, so a loss builds it once per drag and each gradient step only gathers and combines.
    ``bilinear``: the patches sit at real-valued centres (every sample shares the centre's
    fractional offset); otherwise the centres are rounded to integers (crops).

    Dense maps (1, C, H, W): one gather of the (k+1)^2 integer block, then the four shifted
    k x k crops weighted as before (the same arithmetic, bit for bit). FeatureMaps: one gather of
    the m x m low-resolution block that holds every source pixel of the patch, and two small
    matmuls with the combined upsampling-and-offset weights (equal up to float rounding).
    """

    def __init__(self, like: "Features", centers: torch.Tensor, radius: int, bilinear: bool):
        _, _, h, w = like.shape
        self.n, self.k, self.bilinear = int(centers.shape[0]), 2 * radius + 1, bilinear
        # -r..r (crops) or -r..r+1 (bilinear: the k rows and the row below the last)
        off = _offsets(radius + 1, like.device)[1:] if bilinear else _offsets(radius, like.device)
        if bilinear:
            base = centers.floor()
            frac = (centers - base).to(torch.float64 if like.dtype == torch.float64 else torch.float32)  # (N, 2)
            first = base.long()
        else:
            first, frac = centers.round().long(), None
        #: grid rows/cols of the patch (N, k), clamped: what a crop reads (window_argmin maps back with them)
        self.rows = (first[:, 0:1] + off[: self.k]).clamp(0, h - 1)
        self.cols = (first[:, 1:2] + off[: self.k]).clamp(0, w - 1)
        if isinstance(like, FeatureMap):
            self._lazy(like, first, off, frac)
        else:
            rows = (first[:, 0:1] + off).clamp(0, h - 1)  # (N, k+1) bilinear, (N, k) crops
            cols = (first[:, 1:2] + off).clamp(0, w - 1)
            self.size = (rows.shape[1], cols.shape[1])
            self.index = (rows[:, :, None] * w + cols[:, None, :]).reshape(-1)  # (N * k' * k')
            if bilinear:
                self.fr = frac[:, 0].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
                self.fc = frac[:, 1].view(-1, 1, 1, 1)

    def _lazy(self, fm: "FeatureMap", first: torch.Tensor, off: torch.Tensor, frac: torch.Tensor | None) -> None:
        (H, W), (h, w) = fm.size, fm.lowres.shape[2:]
        wdtype = torch.float64 if fm.dtype == torch.float64 else torch.float32
        rows_lo, self.wr = _axis_weights(first[:, 0], off, None if frac is None else frac[:, 0], self.k, H, h, wdtype)
        cols_lo, self.wc = _axis_weights(first[:, 1], off, None if frac is None else frac[:, 1], self.k, W, w, wdtype)
        self.size = (rows_lo.shape[1], cols_lo.shape[1])  # (m, m') low-resolution block
        self.index = (rows_lo[:, :, None] * w + cols_lo[:, None, :]).reshape(-1)  # (N * m * m')
        self.wct = self.wc.transpose(1, 2)[:, None]  # (N, 1, m', k)
        self.wr4 = self.wr[:, None]  # (N, 1, k, m)

    def read(self, feats: "Features") -> torch.Tensor:
        """The patches of ``feats`` (a map of the grid these patches were made for) -> (N, C, k, k);
        FeatureMaps in the weights' dtype (fp32, or fp64), dense maps in their own."""
        if isinstance(feats, FeatureMap):
            x = feats.lowres[0]  # (C, h, w)
            block = x.flatten(1).index_select(1, self.index).view(x.shape[0], self.n, *self.size)  # (C, N, m, m')
            block = block.transpose(0, 1).to(self.wr.dtype)  # (N, C, m, m'): only the block changes dtype
            return self.wr4 @ block @ self.wct  # (N, 1, k, m) @ (N, C, m, m') @ (N, 1, m', k)
        x = feats[0]
        c = x.shape[0]
        block = x.flatten(1).index_select(1, self.index).view(c, self.n, *self.size).transpose(0, 1)
        if not self.bilinear:
            return block  # (N, C, k, k)
        k = self.k
        fr, fc = self.fr.to(x.dtype), self.fc.to(x.dtype)
        top = block[:, :, :k, :k] * (1 - fc) + block[:, :, :k, 1:] * fc
        bottom = block[:, :, 1:, :k] * (1 - fc) + block[:, :, 1:, 1:] * fc
        return top * (1 - fr) + bottom * fr


def _axis_weights(first: torch.Tensor, off: torch.Tensor, frac: torch.Tensor | None, k: int, out_size: int,
                  in_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: the low-resolution indices (N, m) of the block that holds every source of
    the patch, and the weights (N, k, m) that give each patch sample from them: the sample's
    offset between grid rows g0 = first + off and g1 = g0 + 1 (clamped), each bilinearly upsampled
    from its two sources (align_corners=False)."""
    g0 = (first[:, None] + off[:k]).clamp(0, out_size - 1)  # (N, k)
    lo0, hi0, w0 = _source(g0, out_size, in_size)
    f = (torch.zeros_like(first, dtype=dtype) if frac is None else frac.to(dtype))[:, None]  # (N, 1)
    w0 = w0.to(dtype)
    if frac is None:
        src = torch.stack([lo0, hi0], -1)  # (N, k, 2)
        wt = torch.stack([1 - w0, w0], -1)
    else:
        g1 = (first[:, None] + off[1:k + 1]).clamp(0, out_size - 1)
        lo1, hi1, w1 = _source(g1, out_size, in_size)
        w1 = w1.to(dtype)
        src = torch.stack([lo0, hi0, lo1, hi1], -1)  # (N, k, 4)
        wt = torch.stack([(1 - f) * (1 - w0), (1 - f) * w0, f * (1 - w1), f * w1], -1)
    m = min(in_size, (k * in_size) // out_size + 3)  # sources of k+1 consecutive grid rows span at most this many
    start = lo0[:, 0].clamp(max=in_size - m)  # (N,) the sources grow with the grid index
    ar = torch.arange(m, device=first.device)
    onehot = (src - start[:, None, None])[..., None] == ar  # (N, k, 2|4, m)
    return start[:, None] + ar, (wt[..., None] * onehot).sum(2)


def crop_patches(feats: Features, centers: torch.Tensor, radius: int) -> torch.Tensor:
    """Integer (2r+1)^2 crops of ``feats`` (1, C, H, W) around integer ``centers`` (N, 2).

    Returns (N, C, 2r+1, 2r+1).
    """
    return Patches(feats, centers, radius, bilinear=False).read(feats)


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
    return Patches(feats, centers, radius, bilinear=True).read(feats)


def point_vectors(feats: Features, points: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, C) of ``feats`` (1, C, H, W) at integer ``points`` (N, 2)."""
    return crop_patches(feats, points, 0)[:, :, 0, 0]


def window_argmin(feats: Features, ref_vectors: torch.Tensor, centers: torch.Tensor, radius: int,
                  metric: str = "l1") -> torch.Tensor:
    """For each centre, the position in its (2r+1)^2 window (clamped to the map) whose feature is
    nearest to its reference vector. feats (1, C, H, W), ref_vectors (N, C), centers (N, 2) ->
    (N, 2) integer-valued positions, same dtype as ``centers``."""
    win_at = Patches(feats, centers, radius, bilinear=False)
    win = win_at.read(feats)  # (N, C, k, k)
    diff = win - ref_vectors[:, :, None, None].to(win.dtype)
    dist = diff.abs().sum(1) if metric == "l1" else diff.pow(2).sum(1)  # (N, k, k)
    k = win_at.k
    best = dist.flatten(1).argmin(1, keepdim=True)  # (N, 1) row-major first minimum
    return torch.cat([win_at.rows.gather(1, best // k), win_at.cols.gather(1, best % k)], 1).to(centers.dtype)


def motion_steps(handles: torch.Tensor, targets: torch.Tensor, max_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step d_i = unit(q_i - p_i) * min(max_step, |q_i - p_i|) and the distances |q_i - p_i|."""
    delta = targets - handles  # (N, 2)
    dist = delta.norm(dim=1)  # (N,)
    unit = delta / dist.clamp_min(1e-8)[:, None]
    return unit * dist.clamp(max=max_step)[:, None], dist
