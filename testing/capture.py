"""The captured steps on the tiny random model, for the tests and ``benchmarks/counts.py``: a drag
context on the default fast path, and ``torch._dynamo.explain`` of the drag step and the LoRA step."""

from __future__ import annotations

from typing import Any

import torch

from gooddrag.core.capture import GradientStep, explain
from gooddrag.core.engine import DragContext, Events, Points, Reference


def tiny_drag_context(backbone: Any, *, size: int = 8, mask: bool = True, num_steps: int = 50, start: int = 12,
                      seed: int = 0) -> DragContext:
    """A DragContext over ``backbone`` (the tiny model) on the default fast path: a random latent
    (1, 4, size, size), one drag timestep, GoodDrag's loss and tracker, a mask (so eps is read)."""
    from gooddrag.core.registry import default_registry

    reg = default_registry()
    loss_cls, tracker_cls = reg.get("loss", "info-preserving"), reg.get("tracker", "nearest")
    backbone.set_prompt("")
    ddim = backbone.sampler(num_steps)
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    ref = Reference(backbone, z, [start], ddim.timesteps, patch_features=True)
    grid = 4 * size
    h = torch.tensor([[grid * 0.4, grid * 0.3]])
    m = None
    if mask:
        m = torch.zeros(1, 1, size, size)
        m[..., : size // 2 + 2] = 1
    return DragContext(backbone=backbone, timesteps=ddim.timesteps, start_index=start, z_start=z, reference=ref,
                       loss=loss_cls(loss_cls.Params()), tracker=tracker_cls(tracker_cls.Params(radius=3)),
                       points=Points(h.clone(), h.clone(), torch.tensor([[grid * 0.4, grid * 0.8]])),
                       mask=m, mask_is_empty=False, events=Events(None), fast_step=True, patch_features=True)


def explain_drag_step(backbone: Any) -> dict:
    """Graphs and graph breaks of one drag gradient step (forward, loss, backward, Adam) under dynamo."""
    ctx = tiny_drag_context(backbone)
    step = GradientStep(ctx, 0.02)
    step.start(ctx.z_start)
    t = ctx.timesteps[ctx.start_index]
    step.prepare(t)
    return explain(step._step, t)


def explain_lora_step(backbone: Any) -> dict:
    """Graphs and graph breaks of one LoRA training step (forward, loss, backward, AdamW) under dynamo."""
    from gooddrag.core.lora import LoraParams

    backbone.set_prompt("")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    trainer = backbone.lora.trainer(image, LoraParams(steps=2, crop=32, batch_size=2))
    try:
        return explain(trainer.step, *trainer.inputs(0))
    finally:
        trainer.close()
        backbone.lora.drop()


def explain_steps() -> dict:
    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    b = TinyRandomBackbone.load(device="cpu")
    return {"drag_step": explain_drag_step(b), "lora_step": explain_lora_step(b)}
