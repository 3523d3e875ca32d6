"""`gooddrag ui` without a browser: the extra's message, local-only serving, controls generated from
Params, and the engine side of the page (points, mask, cancel, one model load, Drag100 samples)."""

from __future__ import annotations

import json
import sys
import threading

import attrs
import numpy as np
import pytest
from attrs.validators import ge, in_, le
from PIL import Image

from gooddrag.app import cli
from gooddrag.core.config import LoadOptions
from gooddrag.core.errors import BadInputError
from gooddrag.core.params import p, param_specs
from gooddrag.core.registry import default_registry

FAST = ["schedule.num_inference_steps=10", "schedule.drag_timesteps=2", "schedule.drags_per_timestep=2"]


def test_without_gradio_ui_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    code = cli.main(["ui"])
    err = capsys.readouterr().err
    assert code == 2 and "gooddrag[ui]" in err and err.count("\n") == 1


def test_ui_serves_on_localhost_without_a_share_link(monkeypatch, tmp_path, capsys):
    gr = pytest.importorskip("gradio")
    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs, analytics=self.analytics_enabled, limit=self._queue.default_concurrency_limit)

    monkeypatch.setenv("GRADIO_SHARE", "True")  # an explicit share=False must win over this
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    assert cli.main(["ui", "--model", "tiny-random", "--out", str(tmp_path), "--port", "7999"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["server_port"] == 7999
    assert seen["analytics"] is False and seen["limit"] == 1
    assert "http://127.0.0.1:7999" in capsys.readouterr().out


def test_ui_refuses_bad_options_before_serving(capsys):
    pytest.importorskip("gradio")
    assert cli.main(["ui", "--dtype", "fp8"]) == 2
    assert "dtype 'fp8' is not supported" in capsys.readouterr().err


class _Probe:
    """A component with every kind of field a UI must render."""

    name = "probe"

    @attrs.frozen(kw_only=True)
    class Params:
        count: int = p(3, "how many", ge(1))
        share: float = p(0.5, "a fraction", ge(0), le(1))
        mode: str = p("a", "which mode", in_(("a", "b")))
        flag: bool = p(False, "a switch")
        limit: int | None = p(None, "optional cap")


def test_param_specs_carry_types_ranges_choices_and_help():
    specs = {s.field: s for s in param_specs(_Probe)}
    assert (specs["count"].type, specs["count"].minimum, specs["count"].maximum) == (int, 1, None)
    assert (specs["share"].minimum, specs["share"].maximum, specs["share"].help) == (0, 1, "a fraction")
    assert specs["mode"].choices == ("a", "b") and specs["flag"].type is bool
    assert specs["limit"].optional and specs["limit"].type is int and specs["limit"].default is None
    aldd = {s.field: s for s in param_specs(default_registry().get("schedule", "aldd"))}
    assert (aldd["inversion_strength"].minimum, aldd["inversion_strength"].maximum) == (0, 1)


def test_controls_follow_the_field_types_and_give_typed_overrides():
    gr = pytest.importorskip("gradio")
    from gooddrag.app.ui.controls import ParamControls
    from gooddrag.core.config import build_params

    with gr.Blocks():
        pc = ParamControls("tracker", _Probe)
    kinds = [type(c).__name__ for c in pc.controls]
    assert kinds == ["Number", "Slider", "Dropdown", "Checkbox", "Textbox"]
    assert pc.controls[0].minimum == 1 and pc.controls[0].precision == 0
    values = pc.overrides([5, 0.25, "b", True, "7"])
    params = build_params("tracker", _Probe, values)
    assert (params.count, params.share, params.mode, params.flag, params.limit) == (5, 0.25, "b", True, 7)
    assert build_params("tracker", _Probe, pc.overrides([5, 0.25, "b", True, ""])).limit is None


def test_every_builtin_control_holds_its_default():
    """The browser snaps a slider to its step grid: a default off the grid would silently change."""
    gr = pytest.importorskip("gradio")
    from gooddrag.app.ui.controls import ParamControls

    reg = default_registry()
    with gr.Blocks():
        for kind in ("schedule", "loss", "tracker"):
            for _, comp in reg.items(kind):
                pc = ParamControls(kind, comp)
                for spec, c in zip(pc.specs, pc.controls):
                    if isinstance(c, gr.Slider):
                        k = (spec.default - c.minimum) / c.step
                        assert abs(k - round(k)) < 1e-9, (comp.name, spec.field)
                    if isinstance(c, (gr.Slider, gr.Number)):
                        assert c.value == spec.default, (comp.name, spec.field)


def test_clicks_become_pairs_or_one_line_messages():
    from gooddrag.app.ui.work import pairs_from_clicks

    assert pairs_from_clicks([[1, 2], [3, 4]]) == [((1.0, 2.0), (3.0, 4.0))]
    with pytest.raises(BadInputError, match="no points"):
        pairs_from_clicks([])
    with pytest.raises(BadInputError, match="3 points, an odd number: handle 2 has no target"):
        pairs_from_clicks([[1, 2], [3, 4], [5, 6]])


def test_the_ui_reads_an_image_as_the_cli_does(tmp_path):
    """An EXIF-rotated JPEG and a 16-bit PNG give the same pixels in the editor as in `gooddrag edit`
    (the UI once opened them with a plain Image.open: unrotated, and the 16-bit one clipped white)."""
    from gooddrag.app.ui.work import open_image
    from gooddrag.core.inputs import prepare_input

    rng = np.random.RandomState(0)
    jpeg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray((rng.rand(24, 40, 3) * 255).astype("uint8")).save(jpeg, exif=exif)
    png16 = tmp_path / "deep.png"
    Image.fromarray((rng.rand(24, 40) * 65535).astype("uint16")).save(png16)
    for path, size in ((jpeg, (24, 40)), (png16, (40, 24))):
        ui = open_image(path)
        cli = prepare_input(path, [((1, 1), (5, 5))], width=16).image
        assert ui.size == cli.size == size, path.name  # displayed orientation
        assert np.array_equal(np.asarray(ui), np.asarray(cli)), path.name
    assert 60 < np.asarray(open_image(png16)).mean() < 195  # scaled, not clipped to white


def test_huge_and_non_image_uploads_are_refused(tmp_path):
    from gooddrag.app.ui.work import MAX_SIDE, check_image, open_image

    with pytest.raises(BadInputError, match=f"up to {MAX_SIDE} px"):
        check_image(Image.new("RGB", (MAX_SIDE + 1, 8)))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(BadInputError, match="'notes.png' is not a readable image"):
        open_image(tmp_path / "notes.png")


def test_painted_layer_is_the_mask():
    from gooddrag.app.ui.work import mask_from_layers

    layer = np.zeros((4, 6, 4), np.uint8)
    assert mask_from_layers([layer], (6, 4)) is None  # nothing painted: the whole image is editable
    layer[1:3, 2:4, 3] = 140
    mask = mask_from_layers([layer], (6, 4))
    assert mask.shape == (4, 6) and mask.sum() == 4 and mask[1, 2] and not mask[0, 0]
    assert mask_from_layers([layer], (12, 8)).sum() == 16  # a canvas of another size is resized


def test_saved_sample_reads_back_as_drag100(tmp_path, img):
    from gooddrag.app.ui.work import save_sample
    from gooddrag.plugins.datasets.drag100 import Drag100

    image = Image.open(img).convert("RGB")
    mask = np.zeros((32, 48), bool)
    mask[5:20, 10:30] = True
    folder = save_sample(tmp_path, "cat_1", image, [((12, 10), (20, 14))], mask)
    sample = Drag100.load(folder)
    assert sample.group == "animal" and sample.pairs == (((12.0, 10.0), (20.0, 14.0)),)
    assert (sample.mask == mask).all() and np.array_equal(np.asarray(sample.image), np.asarray(image))
    assert Drag100.detect(tmp_path)
    with pytest.raises(BadInputError, match="already exists"):
        save_sample(tmp_path, "cat_1", image, [((12, 10), (20, 14))], None)
    with pytest.raises(BadInputError, match="sample name '../x'"):
        save_sample(tmp_path, "../x", image, [((12, 10), (20, 14))], None)


def test_model_loads_once_per_key(monkeypatch):
    from gooddrag.app.ui.work import EditorPool
    from gooddrag.core.editor import Editor

    loads = []
    monkeypatch.setattr(Editor, "from_pretrained", classmethod(lambda cls, model, **k: loads.append(model) or object()))
    pool = EditorPool(default_registry())
    first = pool.get(LoadOptions(model="tiny-random", device="cpu"))
    assert pool.get(LoadOptions(model="tiny-random", device="cpu")) is first and len(loads) == 1
    pool.get(LoadOptions(model="tiny-random", device="cpu", dtype="bf16"))
    assert len(loads) == 2


def test_edit_streams_previews_and_cancel_stops_it(tiny_editor, img):
    from gooddrag.app.ui.work import EditCancelled, run_edit
    from gooddrag.core.inputs import prepare_input

    inp = prepare_input(img, [((8, 8), (30, 20))], width=32)
    options = tiny_editor.config(overrides=FAST, lora="off", width=32)
    events = list(run_edit(tiny_editor, inp, options, "", threading.Event()))
    kinds = [e[0] for e in events]
    assert kinds[-1] == "done" and kinds.count("preview") == 4  # 2 timesteps x 2 drags
    assert ("phase", "drag", "start") in events
    preview = next(e for e in events if e[0] == "preview")[3]
    assert preview.size == inp.size and len(events[-1][2].frames) == 1 + 4  # input + a frame per drag

    cancel = threading.Event()
    stream = run_edit(tiny_editor, inp, options, "", cancel)
    for ev in stream:
        if ev[0] == "step":
            cancel.set()
        if ev[0] in ("done", "error"):
            break
    assert ev[0] == "error" and isinstance(ev[1], EditCancelled)


def test_failed_edit_is_one_line():
    from gooddrag.app.ui.work import one_line

    assert one_line(RuntimeError("CUDA out of memory.\nTried to allocate")) == \
        "the edit failed: RuntimeError: CUDA out of memory."
    assert one_line(BadInputError("no points")) == "no points"


def test_outputs_include_the_animation(tiny_editor, img, tmp_path):
    from gooddrag.app.ui.work import run_edit, write_outputs
    from gooddrag.core.inputs import prepare_input

    inp = prepare_input(img, [((8, 8), (30, 20))], width=32)
    cfg = tiny_editor.config(overrides=FAST, lora="off", width=32)
    done = list(run_edit(tiny_editor, inp, cfg, "", threading.Event()))[-1]
    paths = write_outputs(tmp_path / "run", inp, done[1], done[2])
    assert [q.name for q in paths] == ["result.png", "points.png", "run.json", "drag.gif"]
    assert Image.open(paths[3]).n_frames == 1 + 4 + 1  # the input, a preview per drag, then the result
    assert json.loads(paths[2].read_text())["config"]["schedule_params"]["drag_timesteps"] == 2


def test_progress_says_the_step_of_each_phase_with_an_eta():
    from gooddrag.app.ui.work import EditProgress

    now = [0.0]
    prog = EditProgress(lora_mode="auto", drag_budget=210, clock=lambda: now[0])
    prog.update(("phase", "lora", "start"))
    assert prog.line() == "LoRA: preparing (trains on the first edit of an image, then cached)"
    now[0] = 4.0
    prog.update(("phase_step", "lora", 2, 10))  # 2 s a step, 8 steps to go
    assert prog.line() == "LoRA step 2/10, ETA 16 s"
    assert '<progress max="1000" value="200">' in prog.html() and prog.html().count("<progress") == 6
    prog.update(("phase", "lora", "end"))
    prog.update(("phase", "inversion", "start"))
    prog.update(("phase_step", "inversion", 5, 38))
    assert prog.line().startswith("inversion step 5/38")
    assert "LoRA: done in 4.0 s" in prog.html()  # the finished phase keeps its bar, full
    prog.update(("phase", "drag", "start"))
    prog.update(("step", 741, 12, 3))
    assert prog.line().startswith("drag gradient step 12 of at most 210 (t=741, drag 4)")

    cached = EditProgress(lora_mode="auto", clock=lambda: 0.0)
    cached.update(("phase", "lora", "start"))
    cached.update(("phase", "lora", "end"))  # no training step: the cache was used
    assert "cached LoRA reused (no training)" in cached.describe("lora")


def test_cancel_stops_lora_training_within_a_step_and_drops_the_adapter(img, _cache):
    from gooddrag.app.ui.work import EditCancelled, run_edit
    from gooddrag.core.editor import Editor
    from gooddrag.core.inputs import prepare_input
    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    # its own model: an adapter, once added, leaves peft's wrappers in the UNet (other tests share theirs)
    tiny_editor = Editor(TinyRandomBackbone.load(device="cpu"))

    inp = prepare_input(img, [((8, 8), (30, 20))], width=32)
    cfg = tiny_editor.config(overrides=[*FAST, "lora.steps=500", "lora.crop=16", "lora.batch_size=1"],
                             lora="auto", width=32)
    from gooddrag.core.deferred import wait as wait_for_cache_writes

    wait_for_cache_writes()  # other tests' LoRAs are on disk (they are written after each result)
    cached = set((_cache / "lora").glob("*/pytorch_lora_weights.safetensors"))  # other tests' LoRAs (shared cache)
    cancel = threading.Event()
    lora_steps = []
    for ev in run_edit(tiny_editor, inp, cfg, "", cancel, previews=False, poll_s=0.05):
        if ev[0] == "phase_step" and ev[1] == "lora":
            lora_steps.append(ev[2])
            cancel.set()  # pressed during the first training step
        if ev[0] == "error":
            break
    assert isinstance(ev[1], EditCancelled) and lora_steps == [1]
    # the worker stops at its next step check: the device is free within a step, no adapter is left
    from gooddrag.app.ui.work import device_queue

    dq = device_queue(str(tiny_editor.backbone.device))
    assert dq.lock.acquire(timeout=30)
    dq.lock.release()
    assert "gooddrag" not in (getattr(tiny_editor.backbone.unet, "peft_config", None) or {})
    wait_for_cache_writes()
    assert set((_cache / "lora").glob("*/pytorch_lora_weights.safetensors")) == cached  # this edit cached nothing


def test_a_run_while_another_holds_the_device_says_it_is_queued(tiny_editor, img):
    from gooddrag.app.ui.work import EditProgress, device_queue, run_edit
    from gooddrag.core.inputs import prepare_input

    dq = device_queue(str(tiny_editor.backbone.device))
    dq.lock.acquire()
    dq.running, dq.progress = "preview from another tab", EditProgress(lora_mode="off")
    try:
        stream = run_edit(tiny_editor, prepare_input(img, [((8, 8), (30, 20))], width=32),
                          tiny_editor.config(overrides=FAST, lora="off", width=32), "", threading.Event(), poll_s=0.05)
        first = next(stream)
        assert first == ("queued", "preview from another tab, now at starting")
    finally:
        dq.running, dq.progress = "", None
        dq.lock.release()
    assert list(stream)[-1][0] == "done"  # runs once the device is free
