"""Patch sampling, motion supervision and tracking pinned to docs/method.md (sections 4, 5, DragDiffusion) on synthetic features."""

from __future__ import annotations

import torch

from gooddrag.core.geometry import crop_patches, sample_patches, window_argmin
from gooddrag.losses.info_preserving import InfoPreserving
from gooddrag.losses.patch_following import PatchFollowing
from gooddrag.testing import make_toy_context
from gooddrag.trackers.nearest import Nearest


def test_bilinear_patch_matches_a_hand_computed_case():
    f = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])[None, None]  # (1, 1, 3, 3)
    # centre (0.25, 0.5): top row between 0 and 1 -> 0.5, next row 10.5; 0.75*0.5 + 0.25*10.5 = 3.0
    out = sample_patches(f, torch.tensor([[0.25, 0.5]]), 0)
    assert out.shape == (1, 1, 1, 1) and torch.isclose(out[0, 0, 0, 0], torch.tensor(3.0))
    # radius 1 at (1.5, 0.5): every sample shares the offset; centre = mean of 10, 11, 20, 21 = 15.5
    patch = sample_patches(f, torch.tensor([[1.5, 0.5]]), 1)[0, 0]
    assert patch.shape == (3, 3) and torch.isclose(patch[1, 1], torch.tensor(15.5))
    assert torch.isclose(patch[0, 1], torch.tensor(5.5))  # rows 0/1, cols 0/1
    assert torch.isclose(patch[2, 1], torch.tensor(21.0 * 0.5 + 20.0 * 0.5))  # row 3 clamps to row 2


def test_integer_patch_equals_bilinear_at_integer_centres_and_clamps():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(1, 5, 20, 20, generator=g)
    c = torch.tensor([[7.0, 9.0], [0.0, 19.0]])
    assert torch.allclose(crop_patches(f, c, 4), sample_patches(f, c, 4))
    p = crop_patches(f, c, 4)
    assert p.shape == (2, 5, 9, 9)
    assert torch.equal(p[0], f[0, :, 3:12, 5:14])
    assert torch.equal(p[1, :, 4, 4], f[0, :, 0, 19]) and torch.equal(p[1, :, 0, 4], f[0, :, 0, 19])  # clamped rows


def _ctx_with_features(ref_feats, targets=((10.0, 20.0),), handles=((10.0, 8.0),)):
    ctx = make_toy_context(handles=handles, targets=targets)
    t = ctx.timesteps[ctx.start_index]
    ctx.reference._cached = (t, ref_feats)
    return ctx, t


def test_info_preserving_weight_64_and_9x9_target_at_the_original_handle():
    loss = InfoPreserving(InfoPreserving.Params(lam=0.0))
    zeros = torch.zeros(1, 3, 32, 32)
    ctx, t = _ctx_with_features(zeros)
    ones = torch.ones(1, 3, 32, 32)
    z = ctx.z_start
    assert torch.isclose(loss(ctx, z, t, ones, z).motion, torch.tensor(64.0))  # 64 * mean|0 - 1|
    # a reference perturbation 4 px from the original handle (inside 9x9) changes the loss, 5 px away does not
    for offset, changes in ((4, True), (5, False)):
        ref = zeros.clone()
        ref[0, :, 10 + offset, 8] = 81.0
        ctx.reference._cached = (t, ref)
        value = loss(ctx, z, t, ones, z).motion
        assert (not torch.isclose(value, torch.tensor(64.0))) == changes, offset


def test_step_is_min_4_distance_and_pairs_within_2_are_skipped():
    loss = InfoPreserving(InfoPreserving.Params(lam=0.0))
    cols = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 1, 32, 32)  # feature = column index
    zeros = torch.zeros(1, 1, 32, 32)
    for target_col, centre in ((20.0, 12.0), (10.5, 10.5), (9.9, None)):
        ctx, t = _ctx_with_features(zeros, targets=((10.0, target_col),))
        motion = loss(ctx, ctx.z_start, t, cols, ctx.z_start).motion
        if centre is None:  # |q - p| = 1.9 < 2: no motion term
            assert motion == 0
        else:  # moving patch centred at p + d: its mean column is the centre column
            assert torch.isclose(motion, torch.tensor(64.0 * centre), atol=1e-4), (target_col, float(motion))


def test_patch_following_follows_the_current_handle_with_unit_steps():
    loss = PatchFollowing(PatchFollowing.Params(lam=0.0))
    cols = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 1, 32, 32).clone()
    ctx, t = _ctx_with_features(torch.zeros(1, 1, 32, 32), targets=((10.0, 20.0),), handles=((10.0, 8.0),))
    ctx.points.handles = torch.tensor([[10.0, 12.0]])  # tracking moved the handle
    motion = loss(ctx, ctx.z_start, t, cols, ctx.z_start).motion
    assert torch.isclose(motion, torch.tensor(9.0 * 1.0))  # 3x3 weight 9, |12 - 13| = 1 everywhere
    assert loss.weight == 9.0


def test_preservation_term_uses_the_mask_and_the_reference_step():
    loss = InfoPreserving(InfoPreserving.Params(lam=0.2))
    ctx = make_toy_context(mask=True)
    t = ctx.timesteps[ctx.start_index]
    z = ctx.z_start.clone()
    eps, feats = ctx.forward(z, t)
    assert loss(ctx, z, t, feats, eps).preserve == 0  # unchanged latent: on the reference
    z2 = z.clone()
    z2[..., :4] += 1.0  # editable half (mask = 1): no penalty
    assert loss(ctx, z2, t, feats, eps).preserve == 0
    z3 = z.clone()
    z3[..., 0, 6] += 1.0  # kept half (all 4 channels): penalised by |DDIM step of the change|
    parts = loss(ctx, z3, t, feats, eps)
    expected = float((ctx.backbone.ddim_step(z3, eps, t)[0, :, 0, 6] - ctx.reference.prev[t][0, :, 0, 6]).abs().sum())
    assert abs(float(parts.preserve) - expected) < 1e-5
    assert torch.isclose(parts.total, parts.motion + 0.2 * parts.preserve)


def test_tracker_25x25_window_argmin():
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(1, 6, 64, 64, generator=g)
    ref = torch.full((1, 6), 5.0)
    tracker = Nearest(Nearest.Params())
    p = torch.tensor([[30.0, 30.0]])
    f = feats.clone()
    f[0, :, 42, 18] = 5.0  # offset (+12, -12): the window's corner
    assert tracker.track(ref, f, p).tolist() == [[42.0, 18.0]]
    f = feats.clone()
    f[0, :, 43, 30] = 5.0  # offset 13: outside the window
    assert tracker.track(ref, f, p).tolist() != [[43.0, 30.0]]
    f = feats.clone()
    f[0, :, 0, 2] = 5.0  # near the border: window clamped, no crash (docs/method.md, "Image borders")
    assert tracker.track(ref, f, torch.tensor([[3.0, 5.0]])).tolist() == [[0.0, 2.0]]
    dd = Nearest(Nearest.Params(radius=3))
    f = feats.clone()
    f[0, :, 34, 30] = 5.0
    assert dd.track(ref, f, p).tolist() != [[34.0, 30.0]]  # 7x7 window for DragDiffusion


def test_window_argmin_is_l1_over_channels():
    feats = torch.zeros(1, 2, 5, 5)
    feats[0, :, 1, 1] = torch.tensor([1.0, 1.0])  # L1 2, L2 sq 2
    feats[0, :, 3, 3] = torch.tensor([2.0, 0.0])  # L1 2, L2 sq 4  -> both at L1 distance 0 from... ref
    ref = torch.tensor([[1.9, 0.0]])
    # L1: |1-1.9|+|1-0| = 1.9 vs |2-1.9|+0 = 0.1 -> (3, 3)
    assert window_argmin(feats, ref, torch.tensor([[2.0, 2.0]]), 2).tolist() == [[3.0, 3.0]]
