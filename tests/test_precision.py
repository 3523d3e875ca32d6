"""Mixed precision, low-memory mode and torch.compile: what each one promises.

- split weights: the bf16 half is the weight rounded to nearest and the fp32 weight comes back bit
  for bit, so an edit in mixed precision leaves the model exactly as it found it;
- ``precision``: autocast covers the reference and drag passes only; ``auto`` picks it only for
  large UNets on hardware with native bf16; contradictions are refused before anything loads;
- ``low_memory``: the VAE and text encoder visit the device only for their own calls; same image;
- ``compile``: same drag as eager, and a backend that cannot compile falls back to eager.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gooddrag.core.config import check_precision
from gooddrag.core.devices import AUTOCAST_MIN_PARAMETERS, resolve_precision
from gooddrag.core.editor import Editor
from gooddrag.core.errors import ConfigError, GoodDragWarning
from gooddrag.core.hookspecs import hookimpl
from gooddrag.plugins.backbones.split_weights import SplitWeights, join, split

KW = dict(lora="off", width=32, overrides=["schedule.num_inference_steps=10", "schedule.drag_timesteps=2",
                                           "schedule.drags_per_timestep=2"])
PAIRS = [((8, 8), (30, 20))]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def test_split_weights_round_to_nearest_and_join_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.logspace(-38, 30, 4000)
    patterns = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00000001, 0x7F7FFFFF],
                            dtype=torch.int64)  # ties (even, odd top), just above/below, subnormal, max
    specials = torch.tensor([0.0, -0.0, 1.0, -3.5, float("inf"), float("-inf")])
    x = torch.cat([x, -x, patterns.to(torch.int32).view(torch.float32), specials]).reshape(-1, 2)
    hi, lo = split(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16 and hi.shape == lo.shape == x.shape
    assert torch.equal(_bits(join(hi, lo)), _bits(x))
    tie = (_bits(x) & 0xFFFF) == 0x8000
    rne = x.to(torch.bfloat16)
    assert torch.equal(hi[~tie].float(), rne[~tie].float())  # round to nearest everywhere but the ties
    assert tie.sum() == 2 and hi[tie].float().abs().le(x[tie].abs()).all()  # ties round toward zero


def test_split_weights_hold_bf16_and_restore_every_bit():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(5, 4))
    before = {n: q.detach().clone() for n, q in m.named_parameters()}
    held = SplitWeights(m)
    assert {q.dtype for layer in (m[0], m[2]) for q in layer.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in m[1].parameters()} == {torch.float32}  # normalisation runs in fp32 under autocast
    held.join()
    for n, q in m.named_parameters():
        assert q.dtype == torch.float32 and torch.equal(_bits(q.detach()), _bits(before[n])), n


@pytest.mark.parametrize("precision, dtype, faithful, needle", [
    ("fp8", "fp32", False, "precision 'fp8' is not supported; use auto, fp32, bf16, fp16"),
    ("bf16", "fp32", True, "precision bf16 and faithful contradict each other"),
    ("fp16", "bf16", False, "precision fp16 needs fp32 weights, but dtype is bf16"),
])
def test_contradictory_precisions_are_refused(precision, dtype, faithful, needle):
    with pytest.raises(ConfigError, match=needle):
        check_precision(precision, dtype, faithful)
    with pytest.raises(ConfigError, match=needle):  # before any model loads
        Editor.from_pretrained("tiny-random", device="cpu", precision=precision, dtype=dtype, faithful=faithful)


def test_auto_precision_is_bf16_only_for_large_unets_on_native_bf16(monkeypatch):
    import gooddrag.core.devices as devices

    cpu, big, small = torch.device("cpu"), AUTOCAST_MIN_PARAMETERS, 1_000_000
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu, torch.float32, False, big) == torch.bfloat16
    assert resolve_precision("auto", cpu, torch.float32, False, small) is None
    assert resolve_precision("auto", cpu, torch.float32, True, big) is None  # faithful
    assert resolve_precision("auto", cpu, torch.bfloat16, False, big) is None  # bf16 weights compute in bf16
    assert resolve_precision("fp32", cpu, torch.float32, False, big) is None
    assert resolve_precision("fp16", cpu, torch.float32, False, small) == torch.float16
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu, torch.float32, False, big) is None
    assert resolve_precision("bf16", cpu, torch.float32, False, small) == torch.bfloat16


def _record_conv_dtypes(backbone):
    """The dtype of conv_in's output at every UNet pass, per phase (from the phase events)."""
    seen: dict[str, set] = {}
    current = {"phase": None}

    class PhaseSpy:
        @hookimpl
        def gooddrag_phase(self, name, status):
            current["phase"] = name if status == "start" else None

    handle = backbone.unet.conv_in.register_forward_hook(
        lambda m, a, out: seen.setdefault(current["phase"], set()).add(out.dtype))
    return PhaseSpy(), seen, handle


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_mixed_precision_covers_the_reference_and_drag_passes_only(tiny_backbone, img, precision):
    b = tiny_backbone
    before = {n: q.detach().clone() for n, q in b.unet.named_parameters()}
    spy, seen, handle = _record_conv_dtypes(b)
    try:
        res = Editor(b, precision=precision).edit(img, PAIRS, plugins=[spy], **KW)
    finally:
        handle.remove()
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    assert res.report["compute"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    assert res.report["config"]["precision"] == precision
    assert seen["inversion"] == seen["finish"] == {torch.float32}
    assert seen["reference"] == seen["drag"] == {low}
    for n, q in b.unet.named_parameters():  # the split weights came back bit for bit
        assert q.dtype == torch.float32 and torch.equal(_bits(q.detach()), _bits(before[n])), n


def test_auto_precision_keeps_the_tiny_model_exact(tiny_backbone, img):
    res = Editor(tiny_backbone).edit(img, PAIRS, **KW)
    assert res.report["config"]["precision"] == "auto" and res.report["compute"] == "fp32"


def test_low_memory_parks_the_vae_and_text_encoder_between_their_calls(tiny_backbone, img, monkeypatch):
    b = tiny_backbone
    plain = Editor(b).edit(img, PAIRS, prompt="a cat", **KW)
    b._text.clear()  # the text encoder runs again in the low-memory edit
    # on this CPU-only machine the device is "cpu": park on "cpu:0" (the same memory) so the moves show
    monkeypatch.setattr(b, "park", torch.device("cpu", 0))
    where = {"vae": None, "text": None}  # the last place each module was sent to
    calls: list[tuple[str, str]] = []  # (who ran, where the VAE and text encoder were)

    def spy_to(key, mod):
        orig = mod.to

        def to(device, *a, **k):
            where[key] = str(device)
            return orig(device, *a, **k)
        monkeypatch.setattr(mod, "to", to)

    spy_to("vae", b.vae)
    spy_to("text", b.pipe.text_encoder)
    for name in ("encode", "decode"):
        orig = getattr(b.vae, name)
        monkeypatch.setattr(b.vae, name, lambda *a, _o=orig, **k: (calls.append(("vae", where["vae"])), _o(*a, **k))[1])
    hooks = [b.unet.register_forward_pre_hook(lambda m, a: calls.append(("unet", f"{where['vae']} {where['text']}"))),
             b.pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(("text", where["text"])))]
    try:
        low = Editor(b, low_memory=True).edit(img, PAIRS, prompt="a cat", **KW)
    finally:
        b.set_low_memory(False)
        for h in hooks:
            h.remove()
    dev, park = str(b.device), "cpu:0"
    assert {who for who, _ in calls} == {"vae", "text", "unet"}
    assert all(w == dev for who, w in calls if who in ("vae", "text"))  # on the device for their own calls
    assert all(w == f"{park} {park}" for who, w in calls if who == "unet")  # parked while the UNet runs
    assert low.report["config"]["low_memory"] is True
    assert low.points == plain.points and np.array_equal(np.asarray(low.image), np.asarray(plain.image))


@pytest.fixture
def fresh_backbone(_cache):
    """A backbone of its own (compiling changes it for good) and dynamo's caches emptied (compiled
    code is cached per block class, across backbones)."""
    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    torch._dynamo.reset()
    yield TinyRandomBackbone.load(device="cpu")
    torch._dynamo.reset()


def test_compiled_blocks_drag_like_eager(fresh_backbone, img):
    b = fresh_backbone
    eager = Editor(b).edit(img, PAIRS, **KW)
    b.compile(backend="eager")  # dynamo traces and runs the graphs; no C++ build in the suite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = Editor(b).edit(img, PAIRS, **KW)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # no fallback happened
    assert b.compiled is True
    assert compiled.points == eager.points


def test_a_compile_failure_falls_back_to_eager_with_one_warning(fresh_backbone, img):
    b = fresh_backbone
    eager = Editor(b).edit(img, PAIRS, **KW)

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    b.compile(backend=no_compiler)
    expected = "torch.compile failed .*no C\\+\\+ compiler on this machine.*running eager"
    with pytest.warns(GoodDragWarning, match=expected):
        res = Editor(b).edit(img, PAIRS, **KW)
    assert b.compiled is False and res.points == eager.points


def test_a_backward_compile_failure_redoes_the_edit_eagerly(fresh_backbone, img):
    """Backward graphs compile lazily, at the first backward pass, outside the UNet call: the Editor
    catches that one, falls back to eager and redoes the edit."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    b = fresh_backbone
    eager = Editor(b).edit(img, PAIRS, **KW)

    def no_backward_compiler(gm, example_inputs):
        raise RuntimeError("no backward compiler")

    b.compile(backend=aot_autograd(fw_compiler=lambda gm, ins: make_boxed_func(gm.forward),
                                   bw_compiler=no_backward_compiler))
    with pytest.warns(GoodDragWarning, match="torch.compile failed .*no backward compiler.*running eager"):
        res = Editor(b).edit(img, PAIRS, **KW)
    assert b.compiled is False and res.points == eager.points
    assert res.report["gradient_steps"] == eager.report["gradient_steps"]


def test_bf16_lora_training_reads_split_weights_with_the_same_result(fresh_backbone, monkeypatch):
    """Under bf16 autocast, LoRA training reads the frozen base weights as split bf16 halves (no cast
    per weight per pass) and the prompt embedding cast once: the bf16 values autocast would make
    (but for exact ties, which the split rounds toward zero), so a training step's loss is the same
    up to float rounding; the LoRA weights train in fp32 and the base comes back bit for bit."""
    from gooddrag.core.lora import LoraParams
    from gooddrag.plugins.backbones import lora as lora_mod
    from gooddrag.testing import random_image

    b = fresh_backbone
    b.compute_dtype = torch.bfloat16
    image = torch.from_numpy(np.asarray(random_image(32, 32, seed=3), dtype=np.float32) / 127.5 - 1)
    image = image.permute(2, 0, 1)[None]  # (1, 3, 32, 32) in [-1, 1]
    params = LoraParams(steps=1, crop=32, batch_size=1, rank=2)  # one step: later ones add Adam's sign flips
    base = {n: q.detach().clone() for n, q in b.unet.named_parameters()}

    def first_losses(split: bool) -> list[float]:
        if not split:  # the reference: plain autocast, every weight and the embedding cast at each use
            monkeypatch.setattr(lora_mod, "SplitWeights", lambda *a, **k: None)
            monkeypatch.setattr(lora_mod.LoraTrainer, "_cast_prompt", False)
        torch.manual_seed(0)  # the adapter's initial weights
        trainer = b.lora.trainer(image, params)
        try:
            dtypes = {n.rsplit(".", 2)[-2] if "lora_" in n else "base": q.dtype
                      for n, q in b.unet.named_parameters() if n.endswith("to_q.base_layer.weight") or "lora_" in n}
            assert dtypes["base"] == (torch.bfloat16 if split else torch.float32)
            assert {d for k, d in dtypes.items() if k != "base"} == {torch.float32}  # the LoRA trains in fp32
            losses = [float(trainer.step(*trainer.inputs(k))) for k in range(params.steps)]
        finally:
            trainer.close()
            b.lora.drop()
        for n, q in b.unet.named_parameters():  # the split base weights came back bit for bit
            n = n.replace(".base_layer", "")  # peft's wrappers stay after the adapter is dropped
            assert q.dtype == torch.float32 and torch.equal(_bits(q.detach()), _bits(base[n])), n
        return losses

    with_split = first_losses(split=True)
    plain = first_losses(split=False)
    assert with_split == pytest.approx(plain, rel=1e-4)  # bf16 itself rounds at 4e-3
