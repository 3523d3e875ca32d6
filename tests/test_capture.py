"""Whole-step capture and host syncs: the drag step and the LoRA step have no graph break under
dynamo, the compiled drag step drags like the eager one, their device-side optimisers update as
torch's do, and the drag loop reads the device at most once per drag."""

from __future__ import annotations

import torch

from gooddrag.core.capture import LatentAdam, adam_factors
from gooddrag.testing import random_image
from gooddrag.testing.capture import explain_drag_step, explain_lora_step, tiny_drag_context
from gooddrag.testing.counting import counting


def test_latent_adam_updates_as_torch_adam():
    g = torch.Generator().manual_seed(0)
    z_ref = torch.randn(1, 4, 6, 6, generator=g)
    z = z_ref.clone()
    z_ref.requires_grad_(True)
    opt = torch.optim.Adam([z_ref], lr=0.02)
    adam = LatentAdam(z, 0.02, capacity=4)  # the table of bias corrections grows past its first 4 steps
    for _ in range(30):
        grad = torch.randn(z.shape, generator=g)
        z_ref.grad = grad.clone()
        opt.step()
        adam.advance()
        adam.update(z, grad)
    assert adam.factors.shape[0] > 30
    assert torch.allclose(z, z_ref.detach(), rtol=0, atol=1e-6)


def test_lora_adamw_updates_as_torch_adamw():
    from gooddrag.core.lora import LoraParams
    from gooddrag.plugins.backbones.lora import LoraTrainer

    g = torch.Generator().manual_seed(1)
    ref = [torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)]
    trainer = LoraTrainer.__new__(LoraTrainer)
    trainer.params = LoraParams(lr=0.01, weight_decay=0.1)
    trainer.weights = [q.detach().clone() for q in ref]
    trainer.exp_avg = [torch.zeros_like(q) for q in ref]
    trainer.exp_avg_sq = [torch.zeros_like(q) for q in ref]
    trainer.count = torch.zeros(1, dtype=torch.int64)
    trainer.factors = adam_factors(0.01, (0.9, 0.999), 1e-8, 20, torch.device("cpu"))
    opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.999), weight_decay=0.1)
    for _ in range(20):
        grads = [torch.randn(q.shape, generator=g) for q in ref]
        for q, gr in zip(ref, grads):
            q.grad = gr.clone()
        opt.step()
        trainer._adamw(grads)
    for mine, theirs in zip(trainer.weights, ref):
        assert torch.allclose(mine, theirs.detach(), rtol=0, atol=1e-6)


def test_drag_step_and_lora_step_have_no_graph_break(tiny_backbone):
    drag = explain_drag_step(tiny_backbone)
    assert drag["graph_breaks"] == 0 and drag["graphs"] == 1, drag
    lora = explain_lora_step(tiny_backbone)
    assert lora["graph_breaks"] == 0 and lora["graphs"] == 1, lora


def _aldd_handles(backbone, capture: bool):
    from gooddrag.core.registry import default_registry

    A = default_registry().get("schedule", "aldd")
    ctx = tiny_drag_context(backbone)
    ctx.reuse_forward, ctx.capture = not capture, capture
    out = A(A.Params(inversion_strength=0.76, drag_timesteps=1, drags_per_timestep=3, reach_distance=0,
                     patience=0)).run(ctx)
    return ctx.points.handles, out.latent, out.steps


def test_compiled_drag_step_gives_the_eager_handles(tiny_backbone, monkeypatch):
    import torch._dynamo

    import gooddrag.core.capture as capture

    monkeypatch.setattr(capture, "BACKEND", "aot_eager")  # the same capture, without C++ code generation
    eager_h, eager_z, eager_steps = _aldd_handles(tiny_backbone, False)
    torch._dynamo.reset()
    try:
        comp_h, comp_z, comp_steps = _aldd_handles(tiny_backbone, True)
    finally:
        torch._dynamo.reset()
    assert comp_steps == eager_steps == 9
    assert torch.equal(comp_h, eager_h)
    assert torch.allclose(comp_z, eager_z, atol=1e-5)


class _PhaseSyncs:
    """Host syncs per phase of an edit, from the phase events."""

    def __init__(self, counter):
        from gooddrag.core.hookspecs import hookimpl

        outer, self.syncs, self._start = self, {}, {}

        class Hooks:
            @hookimpl
            def gooddrag_phase(self, name, status):
                if status == "start":
                    outer._start[name] = counter.syncs
                else:
                    outer.syncs[name] = counter.syncs - outer._start[name]

        self.hooks = Hooks()


def test_drag_loop_reads_the_device_at_most_once_per_drag(tiny_editor):
    image = random_image(48, 32, seed=2)
    with counting() as c:
        probe = _PhaseSyncs(c)
        r = tiny_editor.edit(image, [((10, 10), (40, 24))], lora="off", width=48, plugins=[probe.hooks],
                             overrides=["schedule.num_inference_steps=20", "schedule.drag_timesteps=3",
                                        "schedule.drags_per_timestep=4", "schedule.reach_distance=0",
                                        "schedule.patience=0"])
    drags = r.report["drags"]
    assert drags == 12
    assert 0 < probe.syncs["drag"] <= drags, probe.syncs
