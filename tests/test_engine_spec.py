"""The method's numbers (docs/method.md) on the tiny random SD1.5-shaped model: timesteps, inversion, AlDD and single-step
step counts, and mutual self-attention confined to transformer blocks 10-15."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gooddrag.plugins.backbones.attention import MutualSelfAttention
from gooddrag.core.ddim import ddim_timesteps, start_index
from gooddrag.testing import check_backbone, random_image

sys.path.insert(0, str(Path(__file__).parent))
from recorder import Recorder  # noqa: E402

UNREACHABLE = ["schedule.reach_distance=0"]  # no distance is < 0: the targets are never reached


def test_ddim_timesteps_and_start():
    ts = ddim_timesteps(50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50 and ts[1] - ts[0] == -20
    assert start_index(50, 0.75) == 12 and ts[12] == 741
    assert start_index(50, 0.7) == 15 and ts[15] == 681


def test_scheduler_of_the_tiny_model_matches(tiny_backbone):
    sched = tiny_backbone.pipe.scheduler
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == ddim_timesteps(50)
    assert not sched.config.clip_sample and not sched.config.set_alpha_to_one


def _counting(backbone, monkeypatch):
    calls = []
    original = backbone.eps

    def eps(z, t):
        calls.append(t)
        return original(z, t)

    monkeypatch.setattr(backbone, "eps", eps)
    return calls


def test_aldd_inverts_38_steps_then_drags_70_times_210_steps(tiny_editor, monkeypatch):
    calls = _counting(tiny_editor.backbone, monkeypatch)
    rec = Recorder()
    r = tiny_editor.edit(random_image(32, 32), [((8, 8), (24, 20))], lora="off", width=32, plugins=[rec],
                         overrides=UNREACHABLE + ["schedule.patience=0"])
    inversion = calls[:38]
    assert inversion == list(range(1, 742, 20))  # t = 1, 21, ..., 741 on the level below
    assert r.report["start_timestep"] == 741
    drag_ts = [741, 721, 701, 681, 661, 641, 621]
    assert r.report["drag_timesteps"] == drag_ts
    assert sorted({t for t, *_ in rec.steps}, reverse=True) == drag_ts
    assert len(rec.steps) == 210 and r.report["gradient_steps"] == 210
    assert r.report["drags"] == 70
    assert len(rec.tracks) == 70 + 7  # one fresh track per timestep plus one after every drag
    for t in drag_ts:
        assert sum(1 for s in rec.steps if s[0] == t) == 30
    assert rec.stops == [(621, "schedule_end")]
    assert [p for p in rec.phases if p[1] == "start"] == [(n, "start") for n in
                                                          ("lora", "inversion", "reference", "drag", "finish", "decode")]
    assert r.image.size == (32, 32)


def test_aldd_patience_counter_stops_early(tiny_editor):
    rec = Recorder()
    r = tiny_editor.edit(random_image(32, 32), [((8, 8), (24, 20))], lora="off", width=32, plugins=[rec],
                         overrides=UNREACHABLE + ["schedule.patience=1", "tracker.radius=0"])
    # radius 0: tracking can never move a point, so the first post-drag track exhausts patience 1
    assert r.report["stop_reason"] == "patience" and r.report["gradient_steps"] == 3 and r.report["drags"] == 1


def test_single_step_drags_only_at_681_for_80_steps(tiny_editor):
    rec = Recorder()
    r = tiny_editor.edit(random_image(32, 32), [((8, 8), (24, 20))], lora="off", width=32, plugins=[rec],
                         preset="dragdiffusion", overrides=UNREACHABLE)
    assert {t for t, *_ in rec.steps} == {681} and len(rec.steps) == 80
    assert r.report["start_timestep"] == 681 and r.report["drag_timesteps"] == [681]
    assert len(rec.tracks) == 79  # tracking before every step but the first


def test_mutual_attention_touches_only_blocks_10_to_15(tiny_backbone):
    blocks = tiny_backbone.transformer_blocks()
    assert len(blocks) == 16
    before = [(b.attn1.processor, b.attn2.processor) for b in blocks]
    with tiny_backbone.mutual_attention():
        for i, b in enumerate(blocks):
            assert isinstance(b.attn1.processor, MutualSelfAttention) == (i >= 10), i
            assert b.attn2.processor is before[i][1]  # cross-attention unchanged
    assert [(b.attn1.processor, b.attn2.processor) for b in blocks] == before


def test_mutual_attention_edited_branch_reads_reference_keys(tiny_backbone):
    b = tiny_backbone
    b.set_prompt("")
    g = torch.Generator().manual_seed(0)
    z_ref, z = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        e_ref, e_edit = b.eps_mutual(z_ref, z, 741)
        plain_ref, plain_edit = b.eps(z_ref, 741), b.eps(z, 741)
        same_ref, same_edit = b.eps_mutual(z, z, 741)
    assert torch.allclose(e_ref, plain_ref, atol=1e-5)  # the reference attends to itself
    assert not torch.allclose(e_edit, plain_edit, atol=1e-5)  # the edited branch does not
    assert torch.allclose(same_edit, plain_edit, atol=1e-5)  # identical branches: nothing changes


def test_tiny_backbone_passes_the_backbone_contract(tiny_backbone):
    check_backbone(tiny_backbone)


def test_features_are_up_block_2_upsampled_to_half_resolution(tiny_backbone):
    z = torch.randn(1, 4, 6, 8)
    tiny_backbone._ddim = None
    tiny_backbone.sampler(50)
    with torch.no_grad():
        eps, feats = tiny_backbone.eps_and_features(z, 741)
        _, raw = tiny_backbone.eps_and_features(z, 741, upsample=False)
    assert raw.shape[1] == tiny_backbone.unet.up_blocks[2].resnets[-1].out_channels
    assert feats.shape == (1, raw.shape[1], 24, 32)
    assert torch.allclose(feats, torch.nn.functional.interpolate(raw, size=(24, 32), mode="bilinear",
                                                                  align_corners=False))


def test_per_image_lora_trains_once_then_loads_from_cache(tiny_editor):
    b = tiny_editor.backbone
    image = random_image(32, 32, seed=3)
    kw = dict(lora="auto", width=32, overrides=["lora.steps=2", "lora.crop=32", "lora.batch_size=2",
                                                 "schedule.drag_timesteps=1", "schedule.drags_per_timestep=1"])
    r1 = tiny_editor.edit(image, [((8, 8), (20, 20))], **kw)
    assert r1.report["lora"].startswith("trained")
    n_lora = sum(1 for n, _ in b.unet.named_parameters() if "lora_" in n)
    assert n_lora == 32 * 4 * 2  # A and B of to_q/k/v/out.0 on all 32 attention modules
    r2 = tiny_editor.edit(image, [((8, 8), (20, 20))], **kw)
    assert r2.report["lora"].startswith("cached")
    assert r1.image.tobytes() == r2.image.tobytes()  # the cached adapter is the trained one
    r3 = tiny_editor.edit(image, [((8, 8), (20, 20))], **{**kw, "lora": "off"})
    assert r3.report["lora"] == "off" and not any("lora_" in n for n, _ in b.unet.named_parameters())
    assert r3.image.tobytes() != r1.image.tobytes()


def test_ddim_step_works_before_any_sampler_is_asked_for(tiny_backbone):
    """A backbone's DDIM step and inversion use the method's 50-step sampler until an edit asks for
    its own (they once failed with an AttributeError on a fresh backbone)."""
    import torch

    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    fresh = TinyRandomBackbone.load(device="cpu")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = tiny_backbone.sampler(50).step(z, eps, 741)
    assert torch.equal(fresh.ddim_step(z, eps, 741), expected)
    assert fresh.invert(z, 49).shape == z.shape
