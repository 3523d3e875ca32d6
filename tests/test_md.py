"""Tests for the ``md`` metric (DIFT mean distance) on a tiny random SD2.1-shaped model.

No weights are downloaded: ``gooddrag.testing.tiny_sd2`` builds the model locally and it is loaded
through the real diffusers ``from_pretrained`` path, offline.
"""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gooddrag.core.errors import RequirementError
from gooddrag.core.registry import Registry, make_plugin_manager
from gooddrag.core.samples import Sample
from gooddrag.testing.tiny_sd2 import SD21_HEADS, tiny_sd2_pipeline_dir
from gooddrag.plugins.metrics import md as md_mod
from gooddrag.plugins.metrics.md import MeanDistance, cosine_argmax, source_vectors

SIZE = 256  # image side; the 64x64 textured object sits in the middle
OBJ = 64



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield tiny_sd2_pipeline_dir(tmp_path_factory.mktemp("sd2-cache"))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def metric(tiny_dir):
    # Two noisy copies keep the tests fast; the default ensemble (8) has its own test.
    return MeanDistance(MeanDistance.Params(model=str(tiny_dir), device="cpu", ensemble=2, batch=2))


def scene(dx: int = 0, dy: int = 0, size: int = SIZE) -> Image.Image:
    """Grey canvas with a 64x64 random texture of 8 px blocks (unique features), moved by (dx, dy)."""
    rng = np.random.default_rng(0)
    tex = np.kron(rng.integers(0, 256, (OBJ // 8, OBJ // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    img = np.full((size, size, 3), 128, np.uint8)
    o = (size - OBJ) // 2
    img[o + dy:o + dy + OBJ, o + dx:o + dx + OBJ] = tex
    return Image.fromarray(img)


OFS = (SIZE - OBJ) // 2
# Handles on block centres inside the object; targets anywhere.
PAIRS = (
    ((OFS + 12.0, OFS + 12.0), (200.0, 30.0)),
    ((OFS + 28.0, OFS + 20.0), (40.0, 220.0)),
    ((OFS + 20.0, OFS + 44.0), (OFS + 60.0, OFS + 44.0)),
)


def sample(pairs=PAIRS, prompt: str = "a photo of a cat") -> Sample:
    return Sample(id="cat_1", group="animals", image=scene(), mask=None, pairs=pairs, prompt=prompt)


def dist(a, b) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


# --- the tiny SD2.1-shaped model -------------------------------------------------------------------


def test_tiny_sd2_is_sd21_shaped(tiny_dir):
    cfg = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert cfg["use_linear_projection"] is True and cfg["upcast_attention"] is True
    assert tuple(cfg["attention_head_dim"]) == SD21_HEADS == (5, 10, 20, 20)
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["prediction_type"] == "v_prediction"
    te = json.loads((tiny_dir / "text_encoder" / "config.json").read_text())
    assert te["hidden_act"] == "gelu"
    assert json.loads((tiny_dir / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"


# --- geometry: chunked cosine argmax == full-size upsampling --------------------------------------


def test_cosine_argmax_equals_full_upsampling():
    g = torch.Generator().manual_seed(0)
    src, res = torch.randn(24, 5, 7, generator=g), torch.randn(24, 5, 7, generator=g)
    H, W = 40, 56
    pts = [(3, 4), (20, 30), (39, 55), (17, 0)]
    up_src = F.interpolate(src[None], (H, W), mode="bilinear")[0]
    up_res = F.interpolate(res[None], (H, W), mode="bilinear")[0]
    vecs = source_vectors(src, pts, (H, W))
    torch.testing.assert_close(vecs, torch.stack([up_src[:, r, c] for r, c in pts]), rtol=1e-5, atol=1e-5)
    # tiny chunks, so the row-chunked norm path is exercised
    best, sims = cosine_argmax(vecs, res, (H, W), chunk_elems=24 * W * 3)
    for v, (r, c), s in zip(vecs, best, sims):
        cos = F.cosine_similarity(v.view(-1, 1, 1), up_res, dim=0)
        idx = int(cos.flatten().argmax())
        assert (r, c) == (idx // W, idx % W)
        assert float(s) == pytest.approx(float(cos.flatten()[idx]), abs=1e-5)


def test_matching_bookkeeping_with_stub_features(metric, monkeypatch):
    """With exactly shifted feature maps the best match is the shifted handle, exactly."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 16, 16, generator=g)  # (C, h, w) for a 64x64 image: 4 px per cell
    original = Image.new("RGB", (64, 64), (10, 20, 30))
    edited = Image.new("RGB", (32, 32), (40, 50, 60))  # other size: resized to the original's

    def fake_features(image, prompt=""):
        assert image.size == (64, 64) and prompt == "p"
        same = image.getpixel((0, 0)) == (10, 20, 30)
        return base if same else torch.roll(base, shifts=(1, 2), dims=(1, 2))  # +4 px down, +8 px right

    monkeypatch.setattr(metric, "features", fake_features)
    pairs = (((20.0, 24.0), (40.0, 40.0)), ((30.0, 30.0), (30.0, 30.5)))
    s = Sample(id="x", group="g", image=original, mask=None, pairs=pairs, prompt="p")
    got = metric.matches(s, edited)
    assert [m for m, _ in got] == [(28, 28), (38, 34)]
    want = [dist((28, 28), (40, 40)), dist((38, 34), (30, 30.5))]
    row = metric.score(s, edited, None)
    assert row["md_pairs"] == 2 and row["md_sum"] == pytest.approx(sum(want))
    assert row["md"] == pytest.approx(sum(want) / 2)


# --- the real DIFT pipeline on the tiny model -----------------------------------------------------


def test_unedited_result_matches_handles_default_protocol(tiny_dir):
    """Default protocol (t=261, up block 1, 8 batched copies): in an unedited result each handle's
    best match is the handle itself, so MD = mean |handle - target|."""
    m = MeanDistance(MeanDistance.Params(model=str(tiny_dir), device="cpu"))
    assert (m.params.t, m.params.up_block, m.params.ensemble, m.params.posterior) == (261, 1, 8, "sample")
    d = (SIZE - 128) // 2  # a 128 px version of the scene (cheaper), same object and handles
    pairs = tuple(((hx - d, hy - d), (tx / 2, ty / 2)) for (hx, hy), (tx, ty) in PAIRS)
    s = Sample(id="cat_1", group="animals", image=scene(size=128), mask=None, pairs=pairs, prompt="a cat")
    got = m.matches(s, scene(size=128))
    assert [mt for mt, _ in got] == [(int(h[0]), int(h[1])) for h, _ in pairs]
    want = [dist(h, t) for h, t in pairs]
    row = m.score(s, scene(size=128), None)
    assert row == pytest.approx({"md": sum(want) / 3, "md_sum": sum(want), "md_pairs": 3.0})
    feats = m.features(s.image, s.prompt)
    assert feats.shape == (160, 128 // 16, 128 // 16)  # up_blocks[1] of the SD2.1 shape, 1/16 res


def test_batching_does_not_change_features(tiny_dir, metric):
    img = scene(size=128)  # cheaper
    a = metric.features(img, "a photo of a cat")
    other = MeanDistance(MeanDistance.Params(model=str(tiny_dir), device="cpu", ensemble=2, batch=1))
    torch.testing.assert_close(a, other.features(img, "a photo of a cat"), rtol=1e-4, atol=1e-5)
    # seeded: another seed gives another map
    c = MeanDistance(MeanDistance.Params(model=str(tiny_dir), device="cpu", ensemble=2, seed=1))
    assert not torch.allclose(a, c.features(img, "a photo of a cat"))


@pytest.mark.parametrize("shift", [(64, 0), (0, 64)])
def test_shifted_result_md_follows_the_shift(metric, shift):
    """Result = original with the object moved by (dx, dy): each handle is found near handle +
    shift (within half the 16 px feature stride), and MD ~ mean |handle + shift - target|."""
    dx, dy = shift
    s = sample()
    got = metric.matches(s, scene(dx, dy))
    for (mt, _), (h, _) in zip(got, PAIRS):
        assert dist(mt, (h[0] + dx, h[1] + dy)) <= 8.0, (mt, h, shift)
    want = np.mean([dist((h[0] + dx, h[1] + dy), t) for h, t in PAIRS])
    assert metric.score(s, scene(dx, dy), None)["md"] == pytest.approx(want, abs=8.0)


# --- aggregation -----------------------------------------------------------------------------------


def test_aggregate_pools_pairs_across_samples():
    rows = [
        {"md": 2.0, "md_sum": 2.0, "md_pairs": 1.0},  # 1 pair at 2 px
        {"md": 11.0, "md_sum": 33.0, "md_pairs": 3.0},  # 3 pairs, 33 px in all
        {"md": float("nan"), "md_sum": 0.0, "md_pairs": 0.0},  # a sample without pairs
        {"dai_1": 0.5},  # another metric's row: ignored
    ]
    out = MeanDistance().aggregate(rows)
    assert out["md"] == pytest.approx(35.0 / 4)  # pooled: (2 + 33) / 4, not (2 + 11) / 2
    assert out["md_sample_mean"] == pytest.approx(6.5)
    assert out["md_pairs"] == 4 and out["md_samples"] == 2
    assert math.isnan(MeanDistance().aggregate([])["md"])


def test_registered_through_the_hook():
    reg = Registry(make_plugin_manager([md_mod], entry_points=False))
    cls = reg.get("metric", "md")
    assert cls is MeanDistance and cls.__doc__
    assert MeanDistance.Params().model == "stabilityai/stable-diffusion-2-1"


# --- requirements ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_check_accepts_local_folder_without_loading(tiny_dir):
    m = MeanDistance(MeanDistance.Params(model=str(tiny_dir)))
    m.check()
    assert m._models is None  # cheap: nothing loaded


def test_check_refuses_missing_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RequirementError) as exc:
        MeanDistance().check()
    msg = _one_line(exc)
    assert "stabilityai/stable-diffusion-2-1" in msg and "HF_HUB_OFFLINE" in msg
    assert "--metric-param md.model=DIR" in msg and "hf download" in msg


def test_check_refuses_when_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(RequirementError) as exc:
        MeanDistance().check()
    msg = _one_line(exc)
    assert "cannot be reached" in msg and "--metric-param md.model=DIR" in msg


def test_check_accepts_hub_cache_offline(tmp_path, monkeypatch):
    """A model present in the HF cache layout (models--owner--name/snapshots/REV) passes offline."""
    repo = tmp_path / "cache" / "models--stabilityai--stable-diffusion-2-1"
    snap = repo / "snapshots" / ("a" * 40)
    for f in md_mod._NEEDED + ("unet/diffusion_pytorch_model.safetensors",):
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    MeanDistance().check()
    (snap / "unet/diffusion_pytorch_model.safetensors").unlink()  # weights missing: refuse
    with pytest.raises(RequirementError):
        MeanDistance().check()


@pytest.mark.parametrize("model", ["/no/such/folder", "./relative/missing", "not-a-hub-id"])
def test_check_refuses_bad_model_values(model):
    with pytest.raises(RequirementError) as exc:
        MeanDistance(MeanDistance.Params(model=model)).check()
    assert "--metric-param md.model=DIR" in _one_line(exc)


def test_check_refuses_non_diffusers_folder(tmp_path):
    with pytest.raises(RequirementError) as exc:
        MeanDistance(MeanDistance.Params(model=str(tmp_path))).check()
    assert "not a diffusers model folder" in _one_line(exc)


def test_contract_suite(tiny_dir):
    """gooddrag.testing's metric contract: with the defaults (refused offline, one line) and with
    the tiny model as the default (scored)."""
    import attrs

    from gooddrag.core.params import p
    from gooddrag.testing import check_component, check_metric

    check_component("metric", MeanDistance)

    class TinyMD(MeanDistance):
        """MD on the tiny SD2.1-shaped model."""

        @attrs.frozen(kw_only=True)
        class Params(MeanDistance.Params):
            model: str = p(str(tiny_dir), "tiny model")
            device: str = p("cpu", "device")
            ensemble: int = p(2, "copies")

    s = Sample(id="c", group="g", image=scene(size=128), mask=None, pairs=(((60.0, 60.0), (70.0, 64.0)),))
    check_metric(TinyMD, s, scene(8, 0, size=128))
