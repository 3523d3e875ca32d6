"""Checks at the plugin boundary. The first answer of a loss or tracker is checked against its
contract, so a plugin that returns the wrong thing fails at once, in one line naming it, instead of
somewhere at the end of the edit. After that first call the plugin is called directly: the hot loop
pays nothing."""

from __future__ import annotations

from typing import Any

import torch

from gooddrag.core.engine import DragContext, LossParts
from gooddrag.core.errors import PluginError


def describe(x: Any) -> str:
    """A short description of a value for error messages: type, shape, dtype, device."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


class CheckedTracker:
    """Wraps a tracker: its first ``track`` must return (N, 2) points like the ones it was given."""

    def __init__(self, tracker: Any, name: str, plugin: str):
        self.tracker, self.name, self.plugin = tracker, name, plugin

    def track(self, ref_vectors: torch.Tensor, feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        out = self.tracker.track(ref_vectors, feats, points)
        ok = (isinstance(out, torch.Tensor) and out.shape == points.shape and out.dtype == points.dtype
              and out.device == points.device)
        if not ok:
            raise PluginError(f"tracker {self.name!r} (plugin {self.plugin!r}) returned {describe(out)}; expected "
                              f"{describe(points)}, like the points it was given")
        self.track = self.tracker.track  # checked once: from now on the plugin is called directly
        return out


class CheckedLoss:
    """Wraps a loss: its first call must return ``LossParts`` of 0-d tensors on the latent's device."""

    def __init__(self, loss: Any, name: str, plugin: str):
        self.loss, self.name, self.plugin = loss, name, plugin

    def __call__(self, ctx: DragContext, z: torch.Tensor, t: int, feats: torch.Tensor,
                 eps: torch.Tensor | None) -> LossParts:
        out = self.loss(ctx, z, t, feats, eps)
        where = f"loss {self.name!r} (plugin {self.plugin!r})"
        if not isinstance(out, LossParts):
            raise PluginError(f"{where} returned {describe(out)}; expected gooddrag.core.engine.LossParts"
                              "(total, motion, preserve)")
        for field in ("total", "motion", "preserve"):
            part = getattr(out, field)
            if not (isinstance(part, torch.Tensor) and part.dim() == 0 and part.device == z.device):
                raise PluginError(f"{where} returned LossParts.{field} as {describe(part)}; expected a 0-d tensor "
                                  f"on {z.device}")
        ctx.loss = self.loss  # checked once: from now on the plugin is called directly
        return out
