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

from gooddrag.core.contracts import describe
from gooddrag.core.engine import DragContext, Events, LossParts, Outcome, Points, Reference, drag_window
from gooddrag.core.errors import RequirementError
from gooddrag.plugins.backbones.tiny_pipeline import build_tiny_pipeline, load_tiny_pipeline, tiny_pipeline_dir  # noqa: F401
from gooddrag.testing.toy import ToyBackbone

__all__ = ["ContractError", "TRACK_TOLERANCE", "ToyBackbone", "build_tiny_pipeline", "load_tiny_pipeline", "tiny_pipeline_dir", "make_toy_context",
           "check_params", "check_component", "check_schedule", "check_loss", "check_tracker", "check_backbone",
           "check_backbone_class",
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


class ContractError(AssertionError):
    """A component broke its contract; the message says what was expected and what came back."""


def expect(ok: Any, what: str, expected: str, got: Any) -> None:
    """Raise ContractError ``what: expected ..., got ...`` unless ``ok``."""
    if not ok:
        raise ContractError(f"{what}: expected {expected}, got {got}")


#: how far (feature-grid px) a tracker may land from a planted exact copy of the reference feature
TRACK_TOLERANCE = 0.5


def check_params(kind: str, cls: type) -> Any:
    """Params is a frozen, keyword-only attrs class whose defaults construct; returns the defaults."""
    name = getattr(cls, "name", None)
    expect(isinstance(name, str) and name, f"{kind} class {cls.__name__}.name", "a non-empty str", repr(name))
    expect((cls.__doc__ or "").strip(), f"{kind} {name!r} docstring", "a one-line description", repr(cls.__doc__))
    P = getattr(cls, "Params", None)
    expect(P is not None and attrs.has(P), f"{kind} {name!r}.Params", "an attrs class (@attrs.frozen(kw_only=True))",
           repr(P))
    fields = attrs.fields(P)
    loose = [f.name for f in fields if not f.kw_only]
    expect(not loose, f"{kind} {name!r}.Params fields", "keyword-only (kw_only=True)", f"positional {loose}")
    try:
        params = P()
    except Exception as exc:
        raise ContractError(f"{kind} {name!r}.Params(): expected the defaults to construct, got "
                            f"{type(exc).__name__}: {exc}") from None
    for f in fields:
        try:
            setattr(params, f.name, getattr(params, f.name))
        except attrs.exceptions.FrozenInstanceError:
            continue
        raise ContractError(f"{kind} {name!r}.Params: expected a frozen class, got one whose field {f.name!r} "
                            "can be assigned")
    return params


def check_tracker(cls: type) -> None:
    """A tracker returns points like its input and finds an exact copy of the reference vector planted
    near each point (within TRACK_TOLERANCE feature-grid px)."""
    tracker = cls(check_params("tracker", cls))
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 8, 32, 32, generator=g)  # (1, C, H, W)
    points = torch.tensor([[10.0, 10.0], [20.0, 5.0]])  # (N, 2) (row, col)
    planted = torch.tensor([[11.0, 12.0], [19.0, 6.0]])
    ref = torch.rand(2, 8, generator=g) + 2.0  # (N, C)
    for (r, c), v in zip(planted.long().tolist(), ref):
        feats[0, :, r, c] = v
    out = tracker.track(ref, feats, points)
    like = isinstance(out, torch.Tensor) and out.shape == points.shape and out.dtype == points.dtype
    expect(like, f"tracker {cls.name!r}.track(...)", f"{describe(points)} like its input points", describe(out))
    err = float((out - planted).abs().max())
    expect(err <= TRACK_TOLERANCE, f"tracker {cls.name!r} on planted features",
           f"{planted.tolist()} within {TRACK_TOLERANCE} px", f"{out.tolist()}")


def check_loss(cls: type) -> None:
    """A loss returns finite 0-d parts whose total has a finite, non-zero gradient on the latent."""
    loss = cls(check_params("loss", cls))
    ctx = make_toy_context(loss, mask=True)
    t = ctx.timesteps[ctx.start_index]
    z = ctx.z_start.clone().requires_grad_(True)
    eps, feats = ctx.forward(z, t)
    parts = loss(ctx, z, t, feats, eps)
    what = f"loss {cls.name!r}"
    expect(isinstance(parts, LossParts), f"{what} return value", "LossParts(total, motion, preserve)", describe(parts))
    for field in ("total", "motion", "preserve"):
        part = getattr(parts, field)
        ok = isinstance(part, torch.Tensor) and part.dim() == 0 and math.isfinite(float(part.detach()))
        expect(ok, f"{what} LossParts.{field}", "a finite 0-d tensor", describe(part))
    parts.total.backward()
    grad = z.grad
    expect(grad is not None, f"{what} total", "a value with a gradient on the latent", "no gradient")
    expect(torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{what} gradient on the latent",
           "finite and non-zero", f"sum |grad| = {float(grad.abs().sum())}")


def check_schedule(cls: type) -> None:
    """A schedule drags on the toy backbone and hands back a consistent Outcome."""
    from gooddrag.core.registry import default_registry

    reg = default_registry()
    schedule = cls(check_params("schedule", cls))
    loss = reg.get("loss", "info-preserving")(reg.get("loss", "info-preserving").Params())
    tracker = reg.get("tracker", "nearest")(reg.get("tracker", "nearest").Params())
    num_steps = schedule.params.num_inference_steps
    start, indices = drag_window(schedule, num_steps)
    what = f"schedule {cls.name!r}"
    expect(indices and all(start <= k < num_steps for k in indices), f"{what}.drag_indices({start}, {num_steps})",
           f"a non-empty list within [{start}, {num_steps})", indices)
    ctx = make_toy_context(loss, tracker, num_steps=num_steps, start=start, indices=indices)
    out = schedule.run(ctx)
    expect(isinstance(out, Outcome), f"{what}.run(ctx)", "an Outcome", describe(out))
    expect(out.latent.shape == ctx.z_start.shape, f"{what} Outcome.latent", f"shape {tuple(ctx.z_start.shape)}",
           describe(out.latent))
    expect(out.next_index in ctx.reference.latents, f"{what} Outcome.next_index",
           f"a reference index in {sorted(ctx.reference.latents)} (start .. last drag + 1)", out.next_index)
    reasons = {"reached", "patience", "schedule_end", "loss_threshold", "warped"}
    expect(out.reason in reasons, f"{what} Outcome.reason", f"one of {sorted(reasons)}", repr(out.reason))


def check_backbone_class(cls: type) -> None:
    """A backbone class has Params, a ``claims(files)`` classmethod that answers a bool, and a
    ``load`` that accepts what was read (``files=``)."""
    import inspect

    from gooddrag.core.backbone import ModelFiles

    check_params("backbone", cls)
    claims = getattr(cls, "claims", None)
    expect(callable(claims), f"backbone {cls.name!r}.claims", "a classmethod claims(files) -> bool", repr(claims))
    answer = claims(ModelFiles("nobody/claims-this", "name", pipeline_class="NoSuchPipeline"))
    expect(isinstance(answer, bool), f"backbone {cls.name!r}.claims(files)", "a bool", describe(answer))
    load = getattr(cls, "load", None)
    params = inspect.signature(load).parameters if callable(load) else {}
    expect("files" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()),
           f"backbone {cls.name!r}.load", "a classmethod load(model, *, vae, device, dtype, attention, files)",
           f"parameters {list(params)}")


def check_backbone(backbone: Any) -> None:
    """A loaded backbone meets the contract of core/backbone.py (methods, attributes, the methods
    its capability flags promise), and its shapes and behaviour hold on a small image."""
    from gooddrag.core.backbone import contract_problems
    from gooddrag.core.ddim import PREDICTION_TYPES

    missing = contract_problems(backbone)
    expect(not missing, f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r}",
           "everything of the backbone contract", f"no {', '.join(missing)}")
    expect(isinstance(backbone.default_width, int) and backbone.default_width % 8 == 0, "default_width",
           "an int multiple of 8", repr(backbone.default_width))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    z = backbone.encode(image.to(backbone.device))
    expect(z.shape == (1, 4, 8, 8) and z.dtype == torch.float32, "encode(1x3x64x64)", "float32 (1, 4, 8, 8)",
           describe(z))
    ddim = backbone.sampler(10)
    expect(ddim.prediction_type in PREDICTION_TYPES, "sampler(10).prediction_type", f"one of {PREDICTION_TYPES}",
           repr(ddim.prediction_type))
    t = ddim.timesteps[2]
    eps, feats = backbone.eps_and_features(z, t)
    expect(eps.shape == z.shape, "eps_and_features eps", f"shape {tuple(z.shape)}", describe(eps))
    expect(feats.shape[-2:] == (32, 32), "eps_and_features features", "a (1, C, 32, 32) map", describe(feats))
    step = backbone.ddim_step(z, eps, t)
    expect(step.shape == z.shape, "ddim_step", f"shape {tuple(z.shape)}", describe(step))
    e_ref, e_edit = backbone.eps_mutual(z, z, t)
    expect(e_ref.shape == e_edit.shape == z.shape, "eps_mutual", f"two {tuple(z.shape)} tensors",
           f"{describe(e_ref)}, {describe(e_edit)}")
    diff = float((e_ref - e_edit).abs().max())
    expect(diff <= 1e-5, "eps_mutual with identical branches", "the same eps for both (max diff <= 1e-5)",
           f"max diff {diff:.3g}")
    x = backbone.decode(z)
    expect(x.shape == (1, 3, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1, "decode",
           "(1, 3, 64, 64) in [0, 1]", f"{describe(x)} in [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def check_metric(cls: type, sample: Any = None, result: Image.Image | None = None) -> None:
    """check() raises only RequirementError; where it passes, score() returns floats prefixed by the name."""
    metric = cls(check_params("metric", cls))
    try:
        metric.check()
    except RequirementError as exc:
        expect("\n" not in str(exc), f"metric {cls.name!r}.check() error", "one line", repr(str(exc)))
        return
    if sample is None:
        return
    row = metric.score(sample, result or sample.image, None)
    expect(row and all(k.startswith(cls.name) for k in row), f"metric {cls.name!r}.score() keys",
           f"names starting with {cls.name!r}", list(row or []))
    bad = {k: type(v).__name__ for k, v in row.items() if not isinstance(v, float)}
    expect(not bad, f"metric {cls.name!r}.score() values", "floats", bad)
    agg = metric.aggregate([row, row])
    expect(isinstance(agg, dict), f"metric {cls.name!r}.aggregate()", "a dict", describe(agg))


def check_component(kind: str, cls: type) -> None:
    """Run the contract check for one component class of ``kind``."""
    {"schedule": check_schedule, "loss": check_loss, "tracker": check_tracker, "metric": check_metric,
     "backbone": check_backbone_class, "dataset": lambda c: check_params("dataset", c),
     "runner": lambda c: check_params("runner", c)}[kind](cls)


def random_image(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image."""
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
