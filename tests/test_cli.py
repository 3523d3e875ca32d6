"""The command line: version, plugin table, dry-run, one-line errors before any model loads, and
full edits on the tiny model with every output file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from gooddrag.app import cli
from gooddrag.core.editor import Editor

BASE = ["-p", "schedule.num_inference_steps=10", "--lora", "off", "--width", "32", "--model", "tiny-random"]
FAST = BASE + ["-p", "schedule.drag_timesteps=2", "-p", "schedule.drags_per_timestep=2"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Any model load during the test fails it: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(Editor, "from_pretrained", classmethod(boom))


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip().startswith("gooddrag 0.")


def test_plugins_params_lists_every_component_with_params(capsys):
    code, out, _ = run(["plugins", "--params"], capsys)
    assert code == 0
    for name in ("aldd", "single-step", "info-preserving", "patch-following", "nearest", "tiny-random",
                 "gooddrag-bench", "dragdiffusion-star", "drags_per_timestep = 10", "lam = 0.2", "radius = 12"):
        assert name in out, name


def test_dry_run_prints_config_with_override(img, capsys, no_model):
    code, out, _ = run(["edit", img, "--points", "10,10:20,20", "--dry-run", "-p", "loss.lam=0.1"], capsys)
    assert code == 0
    cfg = json.loads(out)
    assert cfg["loss"] == "info-preserving" and cfg["loss_params"]["lam"] == 0.1
    assert cfg["schedule_params"]["drag_timesteps"] == 7


@pytest.mark.parametrize("extra, needle", [
    (["-p", "loss.nope=1"], "loss.nope"),
    (["-p", "loss.lam=abc"], "loss.lam"),
    (["--schedule", "zzz"], "unknown schedule 'zzz'"),
    (["--preset", "zzz"], "unknown preset 'zzz'"),
    (["--dtype", "fp8"], "dtype 'fp8' is not supported"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--precision", "fp8"], "precision 'fp8' is not supported; use auto, fp32, bf16, fp16"),
    (["--precision", "bf16", "--faithful"], "precision bf16 and faithful contradict each other"),
    (["--precision", "fp16", "--dtype", "bf16"], "precision fp16 needs fp32 weights, but dtype is bf16"),
])
def test_bad_config_is_one_line_without_traceback(img, capsys, no_model, extra, needle):
    code, out, err = run(["edit", img, "--points", "10,10:20,20", "--dry-run", *extra], capsys)
    assert code != 0 and needle in err
    assert err.count("error:") == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _bad_inputs(tmp_path, img):
    (tmp_path / "odd.json").write_text(json.dumps({"points": [[1, 1], [2, 2], [3, 3]]}))
    (tmp_path / "notimg.png").write_text("not an image")
    Image.new("L", (10, 10)).save(tmp_path / "small_mask.png")
    (tmp_path / "strings.json").write_text(json.dumps({"points": ["12", "34"]}))
    (tmp_path / "bools.json").write_text(json.dumps({"points": [[True, 1], [3, 4]]}))
    (tmp_path / "folder.json").mkdir()
    return [
        ([img, "--points-file", tmp_path / "strings.json"], "point 1 is \"12\", not [x, y] with two numbers"),
        ([img, "--points-file", tmp_path / "bools.json"], "point 1 is [true, 1], not [x, y] with two numbers"),
        ([img, "--points-file", tmp_path / "folder.json"], "is a folder; give a file"),
        ([tmp_path / "notimg.png", "--points", "1,1:5,5"], "not a readable image"),
        ([tmp_path / "missing.png", "--points", "1,1:5,5"], "does not exist"),
        ([img, "--points", "10,10:60,20"], "target 1 at (60, 20) is outside the 48x32 image"),
        ([img, "--points", "-1,10:20,20"], "handle 1 at (-1, 10) is outside"),
        ([img, "--points-file", tmp_path / "odd.json"], "odd number"),
        ([img, "--points", "10,10:10,10"], "handle equals target"),
        ([img, "--points", "10,10:20,20", "--mask", tmp_path / "small_mask.png"], "mask is 10x10 but the image is 48x32"),
        ([img], "no points given"),
        ([img, "--points", "10,10"], "HX,HY:TX,TY"),
        ([img, "--points", "10,10:20,20", "--lora", tmp_path / "none.safetensors"], "no such file or folder"),
        ([img, "--points", "10,10:20,20"], "--out DIR is required"),
    ]


def test_bad_input_is_refused_before_any_model_loads(tmp_path, img, capsys, no_model):
    for argv, needle in _bad_inputs(tmp_path, img):
        extra = [] if "--out DIR" in needle else ["--out", tmp_path / "o"]
        code, _, err = run(["edit", *argv, *extra], capsys)
        lines = [l for l in err.strip().splitlines() if not l.startswith("warning:")]
        assert code == 2, argv
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), (argv, err)
        assert not (tmp_path / "o").exists()


def test_offline_default_model_names_the_model_and_the_fix(img, tmp_path, capsys):
    code, _, err = run(["edit", img, "--points", "10,10:20,20", "--lora", "off", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "local copy" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(img, capsys):
    with pytest.raises(Exception):
        cli.main(["--debug", "edit", str(img), "--points", "10,10:20,20", "--dry-run", "-p", "loss.nope=1"])


def _edit(img, out, capsys, *extra, opts=FAST):
    code, stdout, err = run(["edit", img, "--points", "8,8:30,20", *opts, "--out", out, *extra], capsys)
    assert code == 0, err
    return out


def test_edit_writes_every_output(img, tmp_path, capsys):
    out = _edit(img, tmp_path / "o", capsys, "--trace", "--gif", "--frames")
    assert sorted(p.name for p in out.iterdir()) == ["drag.gif", "frames", "points.png", "result.png", "run.json",
                                                     "trace.jsonl"]
    assert len(list((out / "frames").iterdir())) == Image.open(out / "drag.gif").n_frames
    assert Image.open(out / "result.png").size == (48, 32)
    assert Image.open(out / "points.png").size == (2 * 48 + 8, 32)
    assert Image.open(out / "drag.gif").n_frames >= 2
    run_json = json.loads((out / "run.json").read_text())
    for key in ("config", "versions", "timings_s", "peak_memory_mb", "final_handles_xy", "stop_reason", "device", "dtype"):
        assert key in run_json, key
    assert set(run_json["timings_s"]) == {"lora", "inversion", "reference", "drag", "finish", "decode"}
    events = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert kinds == {"step", "track", "stop"}
    step = next(e for e in events if e["event"] == "step")
    assert set(step) == {"event", "timestep", "drag", "step", "loss", "motion", "preserve"}
    track = next(e for e in events if e["event"] == "track")
    assert set(track) == {"event", "timestep", "drag", "points_grid_rc"} and len(track["points_grid_rc"][0]) == 2
    assert events[-1]["event"] == "stop" and events[-1]["reason"] in {"reached", "patience", "schedule_end"}
    assert sum(e["event"] == "step" for e in events) == run_json["gradient_steps"]


def test_a_new_edit_replaces_the_whole_output_set_of_the_last(img, tmp_path, capsys):
    out = _edit(img, tmp_path / "o", capsys, "--trace", "--gif", "--frames")
    (out / "notes.txt").write_text("mine")  # not an edit output: kept
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "points.png", "result.png", "run.json"]
    assert f"warning: removed drag.gif, frames, trace.jsonl of the previous edit in {out}" in err


def test_mp4_without_a_video_writer_is_refused_before_loading(img, tmp_path, capsys, no_model, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_av(name, *a, **k):
        if name == "av":
            raise ImportError("no av")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_av)
    code, _, err = run(["edit", img, "--points", "8,8:30,20", "--mp4", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--mp4 needs a video writer" in err and "gooddrag[video]" in err


def test_strategies_change_the_trace_and_runs_are_byte_identical(img, tmp_path, capsys):
    a = _edit(img, tmp_path / "a", capsys, "--trace")
    b = _edit(img, tmp_path / "b", capsys, "--trace")
    assert (a / "result.png").read_bytes() == (b / "result.png").read_bytes()
    c = _edit(img, tmp_path / "c", capsys, "--trace", "--schedule", "single-step", "--loss", "patch-following",
              "-p", "schedule.steps=5", opts=BASE)
    d = _edit(img, tmp_path / "d", capsys, "--trace", "--preset", "dragdiffusion", "-p", "schedule.steps=5", opts=BASE)
    traces = [(x / "trace.jsonl").read_text() for x in (a, c, d)]
    assert len(set(traces)) == 3
    assert {json.loads(l)["timestep"] for l in traces[1].splitlines()} != \
           {json.loads(l)["timestep"] for l in traces[0].splitlines()}


def test_failed_edit_leaves_no_partial_output(img, tmp_path, capsys, monkeypatch):
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone

    def broken(self, z):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(StableDiffusionBackbone, "decode", broken)
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--trace", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "decoder exploded" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "other.txt").write_text("x")
    code, _, _ = run(["edit", img, "--points", "8,8:30,20", *FAST, "--trace", "--out", tmp_path / "keep"], capsys)
    assert code == 1 and [p.name for p in (tmp_path / "keep").iterdir()] == ["other.txt"]


def test_mask_and_points_file(img, tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"points": [[8, 8], [30, 20], [33, 25], [28, 10]]}))
    m = np.zeros((32, 48), np.uint8)
    m[:, :36] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    code, _, err = run(["edit", img, "--points-file", tmp_path / "p.json", "--mask", tmp_path / "mask.png", *FAST,
                        "--out", tmp_path / "o", "--trace"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "o" / "run.json").read_text())
    assert len(r["final_handles_xy"]) == 2 and r["warnings"] == []
    assert len(r["final_handles_grid_rc"]) == 2 and {"handles_xy", "targets_xy"} <= set(r)
    preserve = [json.loads(l)["preserve"] for l in (tmp_path / "o" / "trace.jsonl").read_text().splitlines()
                if '"step"' in l]
    assert any(p > 0 for p in preserve)  # the mask term is on


def test_handles_at_the_border_work(tmp_path, capsys):
    from gooddrag.testing import random_image

    img = tmp_path / "i.png"
    random_image(32, 32).save(img)
    code, _, err = run(["edit", img, "--points", "0,0:20,20", "--points", "31,31:10,31", *FAST,
                        "--out", tmp_path / "o"], capsys)
    assert code == 0, err


def test_out_that_would_replace_an_input_or_cannot_be_written_is_refused(tmp_path, capsys, no_model):
    from gooddrag.testing import random_image

    src = tmp_path / "in"
    src.mkdir()
    random_image(48, 32).save(src / "result.png")
    Image.new("L", (48, 32), 255).save(src / "points.png")
    (src / "run.json").write_text(json.dumps({"points": [[8, 8], [30, 20]]}))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    cases = [
        (["edit", src / "result.png", "--points", "8,8:30,20", "--out", src], "would replace the input image"),
        (["edit", tmp_path / "in" / "." / "result.png", "--points", "8,8:30,20", "--out", src / "."],
         "would replace the input image"),
        (["edit", src / "result.png", "--points", "8,8:30,20", "--mask", src / "points.png", "--out", src],
         "would replace the input image"),
        (["edit", img_copy(tmp_path), "--points", "8,8:30,20", "--mask", src / "points.png", "--out", src],
         "would replace the input mask"),
        (["edit", img_copy(tmp_path), "--points-file", src / "run.json", "--out", src],
         "would replace the input points file"),
        (["edit", img_copy(tmp_path), "--points", "8,8:30,20", "--out", src / "run.json"], "is a file; give a folder"),
        (["edit", img_copy(tmp_path), "--points", "8,8:30,20", "--out", src / "run.json" / "x"], "is a file, not a folder"),
        (["edit", img_copy(tmp_path), "--points", "8,8:30,20", "--out", "/sys/gooddrag-out"], "is not writable"),
    ]
    for argv, needle in cases:
        code, _, err = run([*argv, *FAST], capsys)
        lines = [l for l in err.strip().splitlines() if not l.startswith("warning:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_read_only_out_is_refused_before_the_model(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only folder is writable")
        code, _, err = run(["edit", img_copy(tmp_path), "--points", "8,8:30,20", "--out", ro / "o", *FAST], capsys)
        assert code == 2 and "is not writable" in err
    finally:
        ro.chmod(0o755)


def img_copy(tmp_path):
    from gooddrag.testing import random_image

    path = tmp_path / "elsewhere.png"
    if not path.exists():
        random_image(48, 32).save(path)
    return path


@pytest.mark.parametrize("schedule", ["aldd", "single-step"])
def test_a_diverging_drag_is_an_error_and_writes_nothing(img, tmp_path, capsys, monkeypatch, schedule):
    import torch

    from gooddrag.core.capture import GradientStep
    from gooddrag.schedules import aldd, single_step

    # what -p schedule.lr=1e30 did before lr had an upper bound
    for mod in (aldd, single_step):
        monkeypatch.setattr(mod, "GradientStep", lambda ctx, lr: GradientStep(ctx, 1e30))
    extra = ["--schedule", schedule] + (["-p", "schedule.steps=3"] if schedule == "single-step" else [])
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *(BASE if extra[1] != "aldd" else FAST), *extra,
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and "error: the latent became NaN/inf while dragging at timestep" in err
    assert "lower schedule.lr" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_broken_weights_are_an_error_and_write_nothing(img, tmp_path, capsys, monkeypatch):
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone

    real = StableDiffusionBackbone.invert
    monkeypatch.setattr(StableDiffusionBackbone, "invert", lambda self, z, k: real(self, z, k) * float("nan"))
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "the inverted latent is NaN/inf before any drag" in err and "try lora off" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("param", ["loss.max_step=1e308", "schedule.lr=1e30", "loss.lam=1e308",
                                   "loss.patch_radius=100000"])
def test_parameters_that_can_only_overflow_are_refused(img, capsys, no_model, param):
    code, _, err = run(["edit", img, "--points", "10,10:20,20", "--dry-run", "-p", param], capsys)
    assert code == 2 and param.split("=")[0] in err and len(err.strip().splitlines()) == 1


# --- unusual images ---------------------------------------------------------------------------------


def test_image_decoding_16bit_exif_animated_bomb(tmp_path, monkeypatch):
    from gooddrag.core.errors import BadInputError
    from gooddrag.core.inputs import prepare_input

    ramp = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)  # 0..61400
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    inp = prepare_input(tmp_path / "g16.png", [((8, 8), (30, 20))])
    got = np.asarray(inp.image)[..., 0].astype(int)
    assert np.abs(got - np.round(ramp / 257)).max() <= 1 and got.min() == 0 and got.max() > 200  # not all white

    # a phone photo: stored 48 wide x 32 high, EXIF orientation 6 (display rotated 90 degrees: 32x48)
    raw = Image.new("RGB", (48, 32), (0, 0, 0))
    raw.paste((255, 0, 0), (0, 0, 8, 8))  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    inp = prepare_input(tmp_path / "phone.jpg", [((4, 40), (20, 40))])  # y=40 exists only when displayed
    assert inp.size == (32, 48)
    assert inp.image.getpixel((28, 3))[0] > 200  # stored top-left is displayed top-right

    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    inp = prepare_input(tmp_path / "anim.gif", [((8, 8), (30, 20))])
    assert any("is animated (2 frames): frame 1 is used" in n for n in inp.warnings)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadInputError, match=r"is 48x32, over the limit of 1000 pixels .*downscale it"):
        prepare_input(tmp_path / "anim.gif", [((8, 8), (30, 20))])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # over twice the limit: pillow's own error
    with pytest.raises(BadInputError, match=r"is 48x32, over the limit of 700 pixels"):
        prepare_input(tmp_path / "g16.png", [((8, 8), (30, 20))])


def test_pair_collapsing_to_one_grid_cell_is_warned(tmp_path):
    from gooddrag.core.inputs import prepare_input

    Image.new("RGB", (1000, 100)).save(tmp_path / "wide.png")
    inp = prepare_input(tmp_path / "wide.png", [((100, 50), (110, 50)), ((100, 50), (600, 50))], width=32)
    notes = [n for n in inp.warnings if "same feature cell" in n]
    assert len(notes) == 1 and notes[0].startswith("pair 1: handle and target fall in the same feature cell at the 32x")


def test_bomb_image_is_one_line_in_edit(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    make = tmp_path / "i.png"
    Image.new("RGB", (48, 32)).save(make)
    code, _, err = run(["edit", make, "--points", "8,8:30,20", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith("error: image") and "over the limit of 100 pixels" in err


# --- smaller: stale staging, Ctrl-C ------------------------------------------------------------------


def test_edit_clears_staging_left_by_a_killed_run(img, tmp_path, capsys):
    out = tmp_path / "o"
    for name in (".partial-abc", ".partial-999999999-x", ".partial-1-live"):  # pid 1 is alive: not ours to clear
        (out / name).mkdir(parents=True)
        (out / name / "result.png").write_bytes(b"half")
    _edit(img, out, capsys)
    assert sorted(p.name for p in out.iterdir()) == [".partial-1-live", "points.png", "result.png", "run.json"]


def test_ctrl_c_says_so(img, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Editor, "from_pretrained", classmethod(interrupted))
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 130 and "interrupted: no partial output was kept" in err
    assert not (tmp_path / "o").exists()


def test_points_outside_the_mask_warn_one_line_each(img, tmp_path, capsys, no_model):
    m = np.zeros((32, 48), np.uint8)
    m[:, :24] = 255  # left half editable
    Image.fromarray(m).save(tmp_path / "mask.png")
    code, _, err = run(["edit", img, "--points", "8,8:20,20", "--points", "30,10:10,10", "--points", "5,5:40,20",
                        "--mask", tmp_path / "mask.png", "--dry-run"], capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert lines == [
        "warning: handle 2 at (30, 10) is outside the editable mask, where the image is held to the input, so the "
        "content cannot move there cleanly; widen the mask to cover it",
        "warning: target 3 at (40, 20) is outside the editable mask, where the image is held to the input, so the "
        "content cannot move there cleanly; widen the mask to cover it"]


def test_dry_run_says_where_every_value_came_from_and_warns_about_dropped_ones(img, capsys, no_model):
    code, out, err = run(["edit", img, "--points", "10,10:20,20", "--dry-run", "--preset", "dragdiffusion",
                          "--loss", "info-preserving", "-p", "loss.lam=0.3", "-p", "lora.rank=8", "--lora", "off",
                          "-p", "backbone.feature_block=1"], capsys)
    assert code == 0
    sources = json.loads(out)["sources"]
    assert sources["loss"] == "chosen" and sources["loss.lam"] == "override" and sources["loss.patch_radius"] == "default"
    assert sources["tracker.radius"] == "preset dragdiffusion" and sources["backbone.feature_block"] == "override"
    assert "warning: lora.rank has no effect: the LoRA is off" in err.splitlines()
    assert json.loads(out)["backbone_params"]["feature_block"] == 1


def test_help_and_plugin_table_are_readable(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # --help wraps at the terminal width
    code, out, _ = run(["edit", "--help"], capsys)
    assert code == 0 and '{"points": [[hx,hy], [tx,ty], ...]}' in out
    from gooddrag.core.registry import default_registry

    for name, comp in default_registry().items("metric"):  # whole descriptions, not cut at a line wrap
        assert cli._first_paragraph(comp.__doc__).endswith(("is better.", "is better).")), name
    code, out, _ = run(["plugins", "--params"], capsys)
    assert "unet.up_blocks[i]" in out and "(per-image LoRA)" in out and "rank = 16" in out
    for shorthand in ("(Q", "(T2)", "feature px", "r1:", "r2:"):
        assert shorthand not in out, shorthand
