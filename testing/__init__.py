"""Test support for gooddrag and its plugins: the tiny random SD1.5 pipeline, a toy backbone, and the
contract suite every schedule, loss, tracker, backbone or metric plugin must pass.

A plugin package tests itself with, for example::

    from gooddrag.testing import check_component
    def test_contract():
        check_component("tracker", MyTracker)
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch
from PIL import Image

from gooddrag.core.engine import DragContext, Events, LossParts, Outcome, Points, Reference, drag_window
from gooddrag.core.errors import RequirementError
from gooddrag.plugins.backbones.tiny_pipeline import build_tiny_pipeline, load_tiny_pipeline, tiny_pipeline_dir  # noqa: F401
from gooddrag.testing.toy import ToyBackbone

__all__ = ["ToyBackbone", "build_tiny_pipeline", "load_tiny_pipeline", "tiny_pipeline_dir", "make_toy_context",
           "check_params", "check_component", "check_schedule", "check_loss", "check_tracker", "check_backbone",
           "check_metric"]


def make_toy_context(loss: Any = None, tracker: Any = None, *, size: int = 8, num_steps: int = 10, start: int = 2,
                     indices: list[int] | None = None, handles=((10.0, 8.0),), targets=((10.0, 20.0),),
                     mask: bool = False, seed: int = 0) -> DragContext:
    """A DragContext over a toy backbone with a random latent (1, 4, size, size); the reference covers
    ``indices`` (default: every index from ``start``)."""
    b = ToyBackbone()
    ddim = b.sampler(num_steps)
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(1, 4, size, size, generator=g)
    ref = Reference(b, z, indices or list(range(start, num_steps)), ddim.timesteps)
    h = torch.tensor(handles, dtype=torch.float32)
    m = None
    if mask:
        m = torch.zeros(1, 1, size, size)
        m[..., : size // 2] = 1
    return DragContext(backbone=b, timesteps=ddim.timesteps, start_index=start, z_start=z, reference=ref,
                       loss=loss, tracker=tracker, points=Points(h.clone(), h.clone(), torch.tensor(targets)),
                       mask=m, mask_is_empty=False, events=Events(None))


def check_params(kind: str, cls: type) -> Any:
    """Params is a frozen, keyword-only attrs class whose defaults construct; returns the defaults."""
    assert isinstance(getattr(cls, "name", None), str) and cls.name, f"{kind} needs a non-empty str name"
    assert (cls.__doc__ or "").strip(), f"{kind} {cls.name!r} needs a docstring"
    P = cls.Params
    assert attrs.has(P), f"{kind} {cls.name!r}: Params must be an attrs class"
    fields = attrs.fields(P)
    assert all(f.kw_only for f in fields), f"{kind} {cls.name!r}: Params fields must be keyword-only"
    params = P()
    for f in fields:
        try:
            setattr(params, f.name, getattr(params, f.name))
        except attrs.exceptions.FrozenInstanceError:
            continue
        raise AssertionError(f"{kind} {cls.name!r}: Params must be frozen")
    return params


def check_tracker(cls: type) -> None:
    """A tracker finds an exact copy of the reference vector planted near each point."""
    tracker = cls(check_params("tracker", cls))
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 8, 32, 32, generator=g)  # (1, C, H, W)
    points = torch.tensor([[10.0, 10.0], [20.0, 5.0]])
    planted = torch.tensor([[11.0, 12.0], [19.0, 6.0]])
    ref = torch.rand(2, 8, generator=g) + 2.0
    for (r, c), v in zip(planted.long().tolist(), ref):
        feats[0, :, r, c] = v
    out = tracker.track(ref, feats, points)
    assert out.shape == points.shape and out.dtype == points.dtype, "track must return (N, 2) like its input"
    assert torch.equal(out, planted), f"{cls.name!r} did not find the planted features: {out.tolist()}"


def check_loss(cls: type) -> None:
    """A loss returns finite 0-d parts whose total has a finite gradient on the latent."""
    loss = cls(check_params("loss", cls))
    ctx = make_toy_context(loss, mask=True)
    t = ctx.timesteps[ctx.start_index]
    z = ctx.z_start.clone().requires_grad_(True)
    eps, feats = ctx.forward(z, t)
    parts = loss(ctx, z, t, feats, eps, ctx.points)
    assert isinstance(parts, LossParts)
    for part in (parts.total, parts.motion, parts.preserve):
        assert part.dim() == 0 and math.isfinite(float(part.detach()))
    parts.total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def check_schedule(cls: type) -> None:
    """A schedule drags on the toy backbone and hands back a consistent Outcome."""
    from gooddrag.core.registry import default_registry

    reg = default_registry()
    schedule = cls(check_params("schedule", cls))
    loss = reg.get("loss", "info-preserving")(reg.get("loss", "info-preserving").Params())
    tracker = reg.get("tracker", "nearest")(reg.get("tracker", "nearest").Params())
    num_steps = schedule.params.num_inference_steps
    start, indices = drag_window(schedule, num_steps)
    assert indices and all(start <= k < num_steps for k in indices), "drag indices must lie after the start"
    ctx = make_toy_context(loss, tracker, num_steps=num_steps, start=start, indices=indices)
    out = schedule.run(ctx)
    assert isinstance(out, Outcome) and out.latent.shape == ctx.z_start.shape
    assert out.next_index in ctx.reference.latents, "next_index must be a reference index (start .. last drag + 1)"
    assert out.reason in {"reached", "patience", "schedule_end", "loss_threshold"}


def check_backbone(backbone: Any) -> None:
    """Shapes and behaviour of a loaded backbone on a small image."""
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    z = backbone.encode(image.to(backbone.device))
    assert z.shape == (1, 4, 8, 8) and z.dtype == torch.float32
    ddim = backbone.sampler(10)
    t = ddim.timesteps[2]
    eps, feats = backbone.eps_and_features(z, t)
    assert eps.shape == z.shape and feats.shape[-2:] == (32, 32)
    assert backbone.ddim_step(z, eps, t).shape == z.shape
    e_ref, e_edit = backbone.eps_mutual(z, z, t)
    assert e_ref.shape == e_edit.shape == z.shape
    assert torch.allclose(e_ref, e_edit, atol=1e-5), "mutual attention with identical branches must change nothing"
    x = backbone.decode(z)
    assert x.shape == (1, 3, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1


def check_metric(cls: type, sample: Any = None, result: Image.Image | None = None) -> None:
    """check() raises only RequirementError; where it passes, score() returns floats prefixed by the name."""
    metric = cls(check_params("metric", cls))
    try:
        metric.check()
    except RequirementError as exc:
        assert "\n" not in str(exc), "requirement errors must be one line"
        return
    if sample is None:
        return
    row = metric.score(sample, result or sample.image, None)
    assert row and all(k.startswith(cls.name) for k in row), f"keys must start with {cls.name!r}: {list(row)}"
    assert all(isinstance(v, float) for v in row.values())
    assert isinstance(metric.aggregate([row, row]), dict)


def check_component(kind: str, cls: type) -> None:
    """Run the contract check for one component class of ``kind``."""
    {"schedule": check_schedule, "loss": check_loss, "tracker": check_tracker, "metric": check_metric,
     "backbone": lambda c: check_params("backbone", c), "dataset": lambda c: check_params("dataset", c),
     "runner": lambda c: check_params("runner", c)}[kind](cls)


def random_image(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image."""
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
