"""The fast paths change nothing but float rounding: FeatureMap reads equal the dense upsampled map,
a features-only UNet pass gives the same features, the reused tracking pass gives the same drag, and
the faithful and default editors reach the same final handles. The speed harness runs at tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gooddrag.core.geometry import FeatureMap, crop_patches, point_vectors, sample_patches, window_argmin
from gooddrag.core.registry import default_registry
from gooddrag.testing import make_toy_context

ROOT = Path(__file__).resolve().parents[1]


def test_feature_map_reads_equal_the_dense_map():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1, 6, 9, 13, generator=g, dtype=torch.float64)  # (1, C, h, w)
    fm = FeatureMap(low, (36, 52))
    dense = F.interpolate(low, size=(36, 52), mode="bilinear", align_corners=False)
    assert torch.equal(fm.dense(), dense) and fm.shape == dense.shape
    centers = torch.tensor([[0.0, 0.0], [35.0, 51.0], [17.4, 3.6], [2.5, 50.9]], dtype=torch.float64)  # borders too
    for r in (0, 1, 4):
        assert torch.allclose(crop_patches(fm, centers, r), crop_patches(dense, centers, r), atol=1e-12)
        assert torch.allclose(sample_patches(fm, centers, r), sample_patches(dense, centers, r), atol=1e-12)
    ref = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.equal(window_argmin(fm, ref, centers, 6), window_argmin(dense, ref, centers, 6))
    assert torch.allclose(point_vectors(fm, centers.round()), point_vectors(dense, centers.round()), atol=1e-12)


def test_feature_map_gradient_equals_the_dense_gradient():
    low = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    centers = torch.tensor([[10.3, 20.8], [0.2, 31.5]], dtype=torch.float64)
    sample_patches(FeatureMap(low, (32, 32)), centers, 2).sum().backward()
    g_lazy, low.grad = low.grad.clone(), None
    dense = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    sample_patches(dense, centers, 2).sum().backward()
    assert torch.allclose(g_lazy, low.grad, atol=1e-12)


def test_features_only_pass_gives_the_same_features(tiny_backbone):
    b = tiny_backbone
    b.set_prompt("")
    b.sampler(10)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps, full = b.eps_and_features(z, 701, upsample=False)
        none, early = b.eps_and_features(z, 701, upsample=False, need_eps=False)
    assert eps is not None and none is None
    assert torch.equal(full, early)


def _drag(reuse: bool):
    reg = default_registry()
    schedule = reg.get("schedule", "aldd")(reg.get("schedule", "aldd").Params(
        num_inference_steps=10, drag_timesteps=2, drags_per_timestep=3, reach_distance=0, patience=0))
    loss = reg.get("loss", "info-preserving")(reg.get("loss", "info-preserving").Params())
    tracker = reg.get("tracker", "nearest")(reg.get("tracker", "nearest").Params())
    ctx = make_toy_context(loss, tracker, num_steps=10, start=2, indices=[2, 3], mask=True)
    ctx.reuse_forward = reuse
    calls0 = ctx.backbone.calls
    out = schedule.run(ctx)
    return out, ctx.points.handles, ctx.backbone.calls - calls0


def test_reusing_the_tracking_pass_drags_identically_with_fewer_passes():
    slow, slow_handles, slow_calls = _drag(False)
    fast, fast_handles, fast_calls = _drag(True)
    assert torch.equal(fast_handles, slow_handles) and torch.equal(fast.latent, slow.latent)
    assert (fast.steps, fast.drags) == (slow.steps, slow.drags) == (18, 6)
    assert slow_calls - fast_calls == 2  # one tracking pass saved per drag timestep


@pytest.mark.parametrize("name", ["info-preserving", "patch-following"])
def test_losses_on_a_feature_map_equal_the_dense_loss_and_gradient(name):
    """Same value and gradient; over many Adam steps the float differences can flip a tracker's
    argmin between near-equal positions, which is why whole edits are compared by their final
    handles (test_faithful_and_default_editors_reach_the_same_handles)."""
    comp = default_registry().get("loss", name)
    got = []
    for patch in (False, True):
        loss = comp(comp.Params())
        ctx = make_toy_context(loss, mask=True)
        ctx.reference.patch_features = ctx.patch_features = patch
        t = ctx.timesteps[ctx.start_index]
        z = ctx.z_start.clone().requires_grad_(True)
        eps, feats = ctx.forward(z, t, for_loss=True)
        assert isinstance(feats, FeatureMap) is patch
        parts = loss(ctx, z, t, feats, eps)
        parts.total.backward()
        got.append((parts.total.detach(), z.grad))
    assert torch.allclose(got[0][0], got[1][0], rtol=1e-6)
    assert torch.allclose(got[0][1], got[1][1], atol=1e-6)


def test_loss_says_when_it_reads_eps():
    reg = default_registry()
    info = reg.get("loss", "info-preserving")
    ctx = make_toy_context(mask=True)
    assert info(info.Params()).uses_eps(ctx) is True
    assert info(info.Params(lam=0.0)).uses_eps(ctx) is False
    assert info(info.Params()).uses_eps(make_toy_context(mask=False)) is False


def test_faithful_and_default_editors_reach_the_same_handles(tiny_backbone, img):
    from gooddrag.core.editor import Editor

    kw = dict(lora="off", width=32, overrides=["schedule.num_inference_steps=10", "schedule.drag_timesteps=2",
                                               "schedule.drags_per_timestep=2"])
    faithful = Editor(tiny_backbone, faithful=True).edit(img, [((8, 8), (30, 20))], **kw)
    default = Editor(tiny_backbone).edit(img, [((8, 8), (30, 20))], **kw)
    assert faithful.report["config"]["faithful"] is True and default.report["config"]["faithful"] is False
    assert default.points == faithful.points
    assert default.report["gradient_steps"] == faithful.report["gradient_steps"]


def test_speed_harness_runs_at_tiny_size(tmp_path):
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [x["variant"] for x in runs] == ["faithful", "default"]
    for x in runs:
        assert x["gradient_steps"] == 6 and x["lora"] == "trained" and x["peak_rss_mb"] > 0
        assert set(x["timings_s"]) == {"lora", "inversion", "reference", "drag", "finish", "decode"}
    assert runs[1]["vs_faithful"]["same_final_handles"] is True
    assert runs[0]["vs_faithful"]["result_psnr_db"] == float("inf")  # the faithful row against itself
    assert "drag step" in r.stdout
