"""Tests for the ``if`` metric (1 - LPIPS(AlexNet)).

torchvision does not load with the CPU torch on these machines, so:
- the metric's own code runs with LPIPS swapped for stand-ins through ``if.net_factory``
  (a recorder, and a hand-written AlexNet-shaped LPIPS in this file);
- the real ``lpips`` package runs against a fake ``torchvision`` module whose ``alexnet`` is an
  AlexNet-shaped network written here (needs lpips, scipy, tqdm: ``pip install --no-deps lpips``);
- the real lpips + torchvision run wherever they import, and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from gooddrag.core.errors import RequirementError
from gooddrag.core.registry import Registry, make_plugin_manager
from gooddrag.core.samples import Sample
from gooddrag.plugins.metrics import image_fidelity as if_mod
from gooddrag.plugins.metrics.image_fidelity import ImageFidelity



def noise_image(w=96, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))


def sample(image: Image.Image) -> Sample:
    return Sample(id="s", group="g", image=image, mask=None, pairs=(((1.0, 1.0), (5.0, 5.0)),))


# --- stand-ins --------------------------------------------------------------------------------


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` layout (same indices and channel counts), no torchvision."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


class TinyAlexLPIPS(nn.Module):
    """LPIPS's formula (unit-normalised ReLU outputs of AlexNet's 5 stages, squared difference,
    channel mean, spatial mean, summed over stages) on a randomly initialised AlexNet-shaped trunk."""

    TAPS = (1, 4, 7, 9, 11)  # ReLU outputs = lpips' slice ends

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = alexnet_features()

    def _taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, x0, x1):
        total = 0.0
        for a, b in zip(self._taps(x0), self._taps(x1)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((a - b) ** 2).mean(dim=1).mean()
        return total


class Recorder:
    """Records what it is given; distance = mean |x0 - x1|."""

    calls: list = []

    def __call__(self, x0, x1):
        Recorder.calls.append((x0.clone(), x1.clone()))
        return (x0 - x1).abs().mean()


@pytest.fixture
def standins(monkeypatch):
    """A module holding factories, importable as ``if_standins:...``."""
    mod = types.ModuleType("if_standins")
    mod.recorder = Recorder
    mod.tiny_alex = TinyAlexLPIPS
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "if_standins", mod)
    Recorder.calls = []
    return mod


def metric(factory: str, **kw) -> ImageFidelity:
    return ImageFidelity(ImageFidelity.Params(net_factory=f"if_standins:{factory}", device="cpu", **kw))


# --- the metric's own code ------------------------------------------------------------------------


def test_inputs_are_scaled_to_pm1_and_resized_to_224(standins):
    m = metric("recorder")
    m.check()
    white, black = Image.new("RGB", (96, 64), "white"), Image.new("RGB", (96, 64), "black")
    row = m.score(sample(white), black, None)
    x0, x1 = Recorder.calls[-1]
    assert x0.shape == x1.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x0, torch.ones_like(x0))  # white -> +1, black -> -1
    torch.testing.assert_close(x1, -torch.ones_like(x1))
    assert row == pytest.approx({"if": 1.0 - 2.0, "if_lpips": 2.0})


def test_value_matches_hand_computation(standins):
    a, b = noise_image(seed=0), noise_image(seed=1)
    row = metric("recorder").score(sample(a), b, None)

    def prep(im):
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        return F.interpolate(x, (224, 224), mode="bilinear", align_corners=False)

    want = float((prep(a) - prep(b)).abs().mean())
    assert row["if_lpips"] == pytest.approx(want, rel=1e-6)
    assert row["if"] == pytest.approx(1 - want, rel=1e-6)


def test_native_size_resizes_result_to_original(standins):
    m = metric("recorder", size=0)
    m.score(sample(noise_image(96, 64)), noise_image(48, 32, seed=3), None)
    x0, x1 = Recorder.calls[-1]
    assert x0.shape == x1.shape == (1, 3, 64, 96)


def test_alexnet_shaped_standin(standins):
    m = metric("tiny_alex")
    a = noise_image(seed=0)
    slight = Image.fromarray(np.clip(np.asarray(a, dtype=np.int16) + 6, 0, 255).astype(np.uint8))
    assert m.score(sample(a), a.copy(), None)["if"] == pytest.approx(1.0, abs=1e-6)
    near, far = m.score(sample(a), slight, None)["if"], m.score(sample(a), noise_image(seed=9), None)["if"]
    assert far < near < 1.0
    # symmetric, and the network is loaded once and kept
    net = m._net
    assert m.score(sample(noise_image(seed=9)), a, None)["if"] == pytest.approx(far, rel=1e-5)
    assert m._net is net


def test_aggregate_is_the_mean():
    rows = [{"if": 0.9, "if_lpips": 0.1}, {"if": 0.7, "if_lpips": 0.3},
            {"if": float("nan"), "if_lpips": float("nan")}, {"md": 3.0}]
    out = ImageFidelity().aggregate(rows)
    assert out["if"] == pytest.approx(0.8) and out["if_lpips"] == pytest.approx(0.2)
    assert out["if_samples"] == 2


def test_registered_through_the_hook():
    reg = Registry(make_plugin_manager([if_mod], entry_points=False))
    assert reg.get("metric", "if") is ImageFidelity and ImageFidelity.__doc__


# --- requirements ---------------------------------------------------------------------------------


class _Boom(importlib.abc.MetaPathFinder):
    """Makes ``import lpips`` fail the way torchvision's mismatched wheel does."""

    def find_spec(self, name, path=None, target=None):
        if name in ("lpips", "torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_check_refuses_when_lpips_cannot_load(monkeypatch, fresh_lpips):
    monkeypatch.setattr(sys, "meta_path", [_Boom(), *sys.meta_path])
    with pytest.raises(RequirementError) as exc:
        ImageFidelity().check()
    msg = str(exc.value)
    assert "\n" not in msg and "torchvision::nms" in msg and "pip install 'gooddrag[lpips]'" in msg


def test_check_refuses_when_lpips_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(RequirementError) as exc:
        ImageFidelity().check()
    assert "pip install 'gooddrag[lpips]'" in str(exc.value)


def test_check_alexnet_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(if_mod, "import_lpips", lambda: None)  # lpips itself is tested above
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RequirementError) as exc:
        ImageFidelity().check()
    msg = str(exc.value)
    assert "\n" not in msg and "--metric-param if.alexnet=PATH" in msg and "alexnet-owt-7be5be79.pth" in msg
    with pytest.raises(RequirementError, match="no such file"):
        ImageFidelity(ImageFidelity.Params(alexnet=str(tmp_path / "missing.pth"))).check()
    weights = tmp_path / "alex.pth"
    weights.write_bytes(b"x")
    ImageFidelity(ImageFidelity.Params(alexnet=str(weights))).check()
    cached = if_mod.torch_hub_alexnet()
    assert str(cached).startswith(str(tmp_path / "torch"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    ImageFidelity().check()


def test_check_net_factory(standins):
    metric("recorder").check()
    for bad in ("no_colon", "if_standins:missing", "no_such_module_xyz:f", "if_standins:not_callable"):
        with pytest.raises(RequirementError):
            ImageFidelity(ImageFidelity.Params(net_factory=bad)).check()


# --- the real lpips package -----------------------------------------------------------------------


def _lpips_installed() -> str:
    missing = [m for m in ("lpips", "scipy", "tqdm") if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)} (pip install --no-deps lpips; pip install scipy tqdm)" if missing else ""


@pytest.fixture
def fresh_lpips(monkeypatch):
    """Forget lpips/torchvision before the test and whatever of them it imported after it."""
    def ours(n):
        return n == "lpips" or n.startswith(("lpips.", "torchvision"))

    for name in [n for n in sys.modules if ours(n)]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if ours(n)]:
        del sys.modules[name]


@pytest.mark.skipif(bool(_lpips_installed()), reason=_lpips_installed() or "ok")
def test_real_lpips_with_fake_torchvision(tmp_path, monkeypatch, fresh_lpips):
    """The lpips package's own code (scaling layer, slices, linear layers shipped in the package)
    on a fake torchvision whose AlexNet is the AlexNet-shaped network above; our loader maps a
    torchvision-style state dict (features.i.*) onto lpips' slices."""
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def alexnet(pretrained=False, **kw):
        assert not pretrained, "the metric must not ask torchvision to download"
        net = nn.Module()
        net.features = alexnet_features()
        return net

    models.alexnet = alexnet
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ref = nn.Module()
        ref.features = alexnet_features()
        ref.classifier = nn.Linear(2, 2)  # a torchvision state dict has classifier.* keys too
    path = tmp_path / "alexnet.pth"
    torch.save(ref.state_dict(), path)

    m = ImageFidelity(ImageFidelity.Params(alexnet=str(path), device="cpu"))
    m.check()
    a, b = noise_image(seed=0), noise_image(seed=1)
    assert m.score(sample(a), a.copy(), None)["if"] == pytest.approx(1.0, abs=1e-6)
    row = m.score(sample(a), b, None)
    net = m._net
    torch.testing.assert_close(getattr(net.net.slice1, "0").weight, ref.features[0].weight)
    torch.testing.assert_close(getattr(net.net.slice5, "10").bias, ref.features[10].bias)
    x0, x1 = m.prepare(sample(a), b)
    with torch.no_grad():
        want = float(net(x0, x1))
    assert 0 < row["if_lpips"] == pytest.approx(want) and row["if"] == pytest.approx(1 - want)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(RequirementError, match="not a torchvision AlexNet state dict"):
        if_mod.load_alexnet_into(net.net, bad)


def _real_lpips_reason() -> str:
    try:
        if_mod.import_lpips()
    except RequirementError as exc:
        return str(exc)
    return ""


def test_real_lpips_and_torchvision(tmp_path):
    reason = _real_lpips_reason()
    if reason:
        pytest.skip(f"real lpips unavailable here: {reason}")
    import torchvision

    path = tmp_path / "alexnet-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    m = ImageFidelity(ImageFidelity.Params(alexnet=str(path), device="cpu"))
    m.check()
    a = noise_image(seed=0)
    assert m.score(sample(a), a.copy(), None)["if"] == pytest.approx(1.0, abs=1e-6)
    assert m.score(sample(a), noise_image(seed=1), None)["if"] < 1.0
    if if_mod.torch_hub_alexnet().is_file():  # the real ImageNet weights, where cached
        real = ImageFidelity(ImageFidelity.Params(device="cpu"))
        assert math.isfinite(real.score(sample(a), noise_image(seed=1), None)["if"])


def test_contract_suite(standins):
    import attrs

    from gooddrag.core.params import p
    from gooddrag.testing import check_component, check_metric

    check_component("metric", ImageFidelity)  # defaults: scored where lpips loads, else refused in one line

    class StandInIF(ImageFidelity):
        """IF with the AlexNet-shaped stand-in."""

        @attrs.frozen(kw_only=True)
        class Params(ImageFidelity.Params):
            net_factory: str = p("if_standins:tiny_alex", "stand-in")
            device: str = p("cpu", "device")

    check_metric(StandInIF, sample(noise_image(seed=0)), noise_image(seed=1))
