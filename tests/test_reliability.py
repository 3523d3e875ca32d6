"""Reliability and security, round two (issue 24): one group of tests per class of defect.

1 LoRA cache identity; 2 an edit never destroys an input; 3 races and locks; 4 Python API inputs;
6 the local Ray; 7 bench and score edge cases; 8 bounded decode, pair caps, duplicate pairs and
keys; 9 OS errors while writing. (5, the UI server, is in tests/test_ui_security.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gooddrag.app import cli
from gooddrag.core.editor import Editor
from gooddrag.core.errors import BadInputError, GoodDragError, GoodDragWarning
from gooddrag.core.deferred import wait as wait_for_cache_writes
from gooddrag.plugins.backbones.tiny_pipeline import tiny_pipeline_dir
from gooddrag.testing import random_image

from .conftest import make_image

_LORA_KW = dict(width=32, overrides=["lora.steps=1", "lora.crop=32", "lora.batch_size=1", "lora.rank=2",
                                     "schedule.num_inference_steps=10", "schedule.drag_timesteps=1",
                                     "schedule.drags_per_timestep=1"])
BASE = ["-p", "schedule.num_inference_steps=10", "--lora", "off", "--width", "32", "--model", "tiny-random",
        "-p", "schedule.drag_timesteps=1", "-p", "schedule.drags_per_timestep=1"]


def run(argv, capsys):
    """Exit code, stdout, and stderr without the ``warning:`` lines."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, "".join(line for line in err.splitlines(True) if not line.startswith("warning: "))


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(Editor, "from_pretrained", classmethod(boom))


# --- 1. the LoRA cache identifies what the LoRA was trained on --------------------------------------

def _model_copy(dest: Path, perturb: float = 0.0) -> Path:
    """The tiny model's files at ``dest``; ``perturb`` changes its UNet weights (a retrained model)."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(tiny_pipeline_dir(), dest)
    if perturb:
        f = dest / "unet" / "diffusion_pytorch_model.safetensors"
        sd = load_file(f)
        name = next(n for n in sd if n.endswith("conv_in.weight"))
        sd[name] = sd[name] + perturb
        save_file(sd, f)
    return dest


def _editor(folder: Path) -> Editor:
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone

    return Editor(StableDiffusionBackbone.load(str(folder), vae="model", device="cpu"))


def test_lora_cache_key_follows_the_weights_not_the_model_name(tmp_path, monkeypatch):
    """A model folder retrained in place (same --model string) gets its own LoRA: 'trained', never
    the other model's 'cached' one; the same weights at another path share the entry."""
    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))
    image = random_image(32, 32, seed=3)
    model = _model_copy(tmp_path / "model")
    first = _editor(model).edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert first.report["lora"].startswith("trained ")
    _model_copy(model, perturb=0.5)  # retrained in place: same path, other weights
    second = _editor(model).edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert second.report["lora"].startswith("trained "), second.report["lora"]
    assert second.report["lora"] != first.report["lora"]
    moved = _model_copy(tmp_path / "elsewhere" / "model", perturb=0.5)  # same weights, other path
    third = _editor(moved).edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert third.report["lora"] == "cached " + second.report["lora"].split(" ", 1)[1]


def test_lora_cache_key_holds_the_vae(tiny_backbone, tmp_path):
    from gooddrag.core.lora import LoraParams

    lora = tiny_backbone.lora
    image = torch.zeros(1, 3, 32, 32)
    before = lora.key(image, LoraParams())
    vae = tiny_backbone.pipe.vae
    other = type(vae).from_config(vae.config)  # another VAE of the same shape
    try:
        tiny_backbone.pipe.vae = tiny_backbone.vae = other
        assert lora.key(image, LoraParams()) != before
    finally:
        tiny_backbone.pipe.vae = tiny_backbone.vae = vae
    assert lora.key(image, LoraParams()) == before


def _save_lora(folder: Path, unet_layers=None, text_layers=None) -> Path:
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_layers, safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["empty-file", "text-encoder-only", "zeros"])
def test_lora_that_changes_nothing_is_refused(tiny_editor, tmp_path, kind):
    from safetensors.torch import save_file

    if kind == "empty-file":
        path = tmp_path / "empty.safetensors"
        save_file({}, str(path))
    elif kind == "text-encoder-only":
        te = tiny_editor.backbone.pipe.text_encoder
        hidden = te.config.hidden_size
        layers = {f"text_model.encoder.layers.{i}.self_attn.{m}.lora_{ab}.weight":
                  torch.randn((2, hidden) if ab == "A" else (hidden, 2))
                  for i in range(te.config.num_hidden_layers) for m in ("q_proj", "v_proj") for ab in "AB"}
        path = _save_lora(tmp_path / "te", text_layers=layers)
    else:  # a UNet LoRA whose update is exactly zero
        first = tiny_editor.edit(random_image(32, 32, seed=5), [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
        from safetensors.torch import load_file

        wait_for_cache_writes()  # the cache entry is written after the result is out
        src = Path(first.report["lora"].split(" ", 1)[1]) / "pytorch_lora_weights.safetensors"
        sd = {k: (torch.zeros_like(v) if "lora_B" in k or "lora.up" in k else v) for k, v in load_file(src).items()}
        path = tmp_path / "zeros.safetensors"
        save_file(sd, str(path))
    with pytest.raises(BadInputError, match="holds no UNet LoRA weights") as exc:
        tiny_editor.edit(random_image(32, 32), [((8, 8), (20, 20))], lora=str(path), **_LORA_KW)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    b = tiny_editor.backbone
    assert not getattr(b.unet, "peft_config", None) or "gooddrag" not in b.unet.peft_config
    assert "gooddrag" not in (getattr(b.pipe.text_encoder, "peft_config", None) or {})


def test_empty_lora_cache_entry_with_a_matching_checksum_is_retrained(tiny_editor, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from gooddrag.plugins.backbones.lora import CHECKSUM_NAME, WEIGHTS_NAME, _sha256

    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))
    image = random_image(32, 32, seed=21)
    first = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    folder = Path(first.report["lora"].split(" ", 1)[1])
    wait_for_cache_writes()
    save_file({}, str(folder / WEIGHTS_NAME))
    (folder / CHECKSUM_NAME).write_text(f"{_sha256(folder / WEIGHTS_NAME)}  {WEIGHTS_NAME}\n")
    again = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert again.report["lora"] == f"trained {folder}"
    assert any("holds no UNet LoRA weights" in w for w in again.report["warnings"])
    assert again.image.tobytes() == first.image.tobytes()


def test_lora_cache_entry_that_is_a_file_is_named_and_healed(tiny_editor, tmp_path, monkeypatch):
    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))
    image = random_image(32, 32, seed=22)
    first = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    folder = Path(first.report["lora"].split(" ", 1)[1])
    wait_for_cache_writes()
    shutil.rmtree(folder)
    folder.write_text("not a LoRA")
    again = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert any(w.startswith(f"cached LoRA {folder} is damaged: it is a file") for w in again.report["warnings"])
    wait_for_cache_writes()
    assert folder.is_dir()  # healed: the entry is a cache folder again
    third = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert third.report["lora"] == f"cached {folder}"


def test_trained_lora_is_cached_after_the_result_is_out(tiny_editor, tmp_path, monkeypatch):
    """Reading the LoRA back from a GPU would stop the host once per tensor in the middle of the
    edit: the cache entry is written once the result is out, and the next lookup waits for it."""
    from gooddrag.core.hookspecs import hookimpl
    from gooddrag.plugins.backbones.lora import WEIGHTS_NAME, cache_problem

    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))
    written_during_edit = []

    class Probe:
        @hookimpl
        def gooddrag_edit_finished(self, result):
            written_during_edit.extend((tmp_path / "cache" / "lora").glob(f"*/{WEIGHTS_NAME}"))

    image = random_image(32, 32, seed=31)
    first = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", plugins=[Probe()], **_LORA_KW)
    folder = Path(first.report["lora"].split(" ", 1)[1])
    assert written_during_edit == []  # the report and the result came first
    again = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)  # waits for the write
    assert again.report["lora"] == f"cached {folder}" and cache_problem(folder) is None
    assert again.image.tobytes() == first.image.tobytes()


def test_lora_of_an_edit_that_fails_after_training_is_cached(tiny_editor, tmp_path, monkeypatch):
    """The LoRA is as good as trained when a later phase fails (or is cancelled): the retry reuses it."""
    from gooddrag.core.hookspecs import hookimpl
    from gooddrag.plugins.backbones.lora import WEIGHTS_NAME

    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))

    class FailAtDrag:
        @hookimpl
        def gooddrag_phase(self, name, status):
            if name == "drag" and status == "start":
                raise RuntimeError("stopped at the drag")

    image = random_image(32, 32, seed=32)
    with pytest.raises(RuntimeError, match="stopped at the drag"):
        tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", plugins=[FailAtDrag()], **_LORA_KW)
    wait_for_cache_writes()
    assert len(list((tmp_path / "cache" / "lora").glob(f"*/{WEIGHTS_NAME}"))) == 1
    retry = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert retry.report["lora"].startswith("cached ")


def test_gooddrag_cache_that_is_a_file_is_named_with_the_variable(tiny_editor, tmp_path, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cachefile"))
    res = tiny_editor.edit(random_image(32, 32, seed=23), [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert res.report["lora"] == "trained (not cached)"
    assert any(f"GOODDRAG_CACHE={str(tmp_path / 'cachefile')!r} is a file, not a folder" in w
               for w in res.report["warnings"])


# --- 2. an edit never destroys an input ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["frames", "frames-subfolder", "link-to-result", "link-into-frames",
                                   "mask-in-frames", "points-file-link", "lora-in-frames"])
def test_an_input_anywhere_in_the_output_set_is_refused_before_the_model(tmp_path, capsys, no_model, where):
    out = tmp_path / "out"
    (out / "frames" / "sub").mkdir(parents=True)
    img = make_image(tmp_path / "img.png")
    pts = tmp_path / "p.json"
    pts.write_text(json.dumps({"points": [[8, 8], [30, 20]]}))
    args = ["edit", img, "--points", "8,8:30,20", *BASE, "--out", out]
    if where == "frames":
        victim = make_image(out / "frames" / "frame_000.png")
        args[1] = victim
    elif where == "frames-subfolder":
        victim = make_image(out / "frames" / "sub" / "in.png")
        args[1] = victim
    elif where == "link-to-result":  # the input is a link elsewhere whose target is out/result.png
        victim = make_image(out / "result.png")
        (tmp_path / "link.png").symlink_to(victim)
        args[1] = tmp_path / "link.png"
    elif where == "link-into-frames":  # --out given through a link: the input resolves into its set
        victim = make_image(out / "frames" / "in.png")
        (tmp_path / "outlink").symlink_to(out)
        args = ["edit", victim, "--points", "8,8:30,20", *BASE, "--out", tmp_path / "outlink"]
    elif where == "mask-in-frames":
        victim = out / "frames" / "mask.png"
        Image.new("L", (48, 32), 255).save(victim)
        args += ["--mask", victim]
    elif where == "points-file-link":
        victim = out / "frames" / "p.json"
        victim.write_text(pts.read_text())
        (tmp_path / "plink.json").symlink_to(victim)
        args = ["edit", img, "--points-file", tmp_path / "plink.json", *BASE, "--out", out]
    else:
        victim = out / "frames" / "lora"
        victim.mkdir()
        args = [a if a != "off" else str(victim) for a in args]
    before = victim.read_bytes() if victim.is_file() else None
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert "would replace the input" in err and err.count("\n") == 1, err
    assert victim.exists() and (before is None or victim.read_bytes() == before)


@pytest.mark.parametrize("name,kind", [("run.json", "folder"), ("result.png", "folder"), ("frames", "file"),
                                       ("trace.jsonl", "folder")])
def test_an_output_name_taken_by_another_kind_of_entry_is_found_before_the_model(tmp_path, capsys, no_model,
                                                                              name, kind):
    out = tmp_path / "out"
    out.mkdir()
    if kind == "folder":
        (out / name).mkdir()
        (out / name / "keep.txt").write_text("mine")
    else:
        (out / name).write_text("mine")
    img = make_image(tmp_path / "img.png")
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *BASE, "--out", out], capsys)
    assert code == 2 and f"{name} there is a {'folder' if kind == 'folder' else 'file'}" in err, err
    assert (out / name).exists()


def test_a_failed_move_puts_the_old_set_back(tmp_path, monkeypatch):
    from gooddrag.app.outputs import files

    out = tmp_path / "out"
    out.mkdir()
    for name in ("result.png", "points.png", "run.json", "trace.jsonl"):
        (out / name).write_text(f"old {name}")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if Path(dst).name == "run.json" and ".partial-" in str(src):
            raise OSError(28, "No space left on device")  # the third new file cannot be moved in
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(files.OutputError, match="No space left on device"):
        with files.staging(out, replaces=files.OUTPUT_NAMES) as tmp:
            for name in ("result.png", "points.png", "run.json"):
                (tmp / name).write_text(f"new {name}")
    assert sorted(p.name for p in out.iterdir()) == ["points.png", "result.png", "run.json", "trace.jsonl"]
    assert all((out / n).read_text() == f"old {n}" for n in ("result.png", "points.png", "run.json", "trace.jsonl"))


def test_a_swap_cut_short_by_a_kill_is_undone_by_the_next_edit(tmp_path):
    from gooddrag.app.outputs import files

    out = tmp_path / "out"
    aside = out / ".previous-999999-x"  # a process that no longer exists
    aside.mkdir(parents=True)
    (aside / files.SWAP_MANIFEST).write_text(json.dumps({"new": ["result.png", "drag.gif"]}))
    (aside / "result.png").write_text("old")
    (aside / "run.json").write_text("old run")
    (out / "result.png").write_text("new")  # moved in before the kill
    (out / "drag.gif").write_text("new gif")
    files.clear_partials(out)
    assert sorted(p.name for p in out.iterdir()) == ["result.png", "run.json"]
    assert (out / "result.png").read_text() == "old"


# --- 3. races ------------------------------------------------------------------------------------------

def test_a_second_edit_into_a_held_out_fails_in_one_line(tmp_path, capsys, no_model):
    from gooddrag.app.outputs.files import output_lock

    out = tmp_path / "out"
    img = make_image(tmp_path / "img.png")
    with output_lock(out):  # another edit is writing here
        code, _, err = run(["edit", img, "--points", "8,8:30,20", *BASE, "--out", out], capsys)
    assert code == 2 and "is in use by another gooddrag edit" in err and err.count("\n") == 1, err
    assert not out.exists()  # the holder created it and left it empty


def test_the_out_lock_is_released_and_a_failed_edit_leaves_no_folder(tmp_path, capsys, monkeypatch):
    img = make_image(tmp_path / "img.png")
    out = tmp_path / "out"
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *BASE, "--out", out], capsys)
    assert code == 0, err
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *BASE, "--out", out], capsys)  # same process
    assert code == 0, err


def test_two_threads_on_one_editor_are_serialised(tiny_editor):
    import threading

    image = random_image(32, 32, seed=31)
    kw = dict(width=32, lora="off", overrides=["schedule.num_inference_steps=10", "schedule.drag_timesteps=2",
                                                "schedule.drags_per_timestep=2"])
    alone = tiny_editor.edit(image, [((8, 8), (20, 20))], **kw).image.tobytes()
    results, errors = [], []

    def work():
        try:
            results.append(tiny_editor.edit(image, [((8, 8), (20, 20))], **kw).image.tobytes())
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [alone] * 3


# --- 9. OS errors while writing ---------------------------------------------------------------------------

@pytest.mark.parametrize("err", [(28, "No space left on device"), (27, "File too large"), (30, "Read-only file system")])
def test_an_os_error_while_writing_is_one_line_and_keeps_the_old_set(tmp_path, capsys, monkeypatch, err):
    img = make_image(tmp_path / "img.png")
    out = tmp_path / "out"
    code, _, e = run(["edit", img, "--points", "8,8:30,20", *BASE, "--out", out], capsys)
    assert code == 0, e
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_bytes

    def full(self, data):
        if self.name == "run.json":
            raise OSError(err[0], err[1])  # as a failed write() raises it: no file name
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, _, e = run(["edit", img, "--points", "8,8:12,20", *BASE, "--out", out], capsys)
    assert code == 2 and e == f"error: cannot write {out / 'run.json'}: {err[1]}; nothing of this edit was kept " \
                              f"and the previous results in {str(out)!r} are unchanged\n", e
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_bench_shards_with_different_counts_on_one_out_are_refused(tmp_path):
    from gooddrag.app.bench.lock import lock_out

    out = tmp_path / "out"
    out.mkdir()
    a, b, c = [], [], []
    lock_out(out, (0, 2), a)
    with pytest.raises(BadInputError, match=r"split into 2 shards; --shard i/3 cannot run beside it"):
        lock_out(out, (1, 3), b)
    assert b == []
    lock_out(out, (1, 2), c)  # the same split: fine
    for fh in a + c:
        fh.close()
    lock_out(out, (1, 3), b)  # once the 2-way run is over, a 3-way one may start
    for fh in b:
        fh.close()


# --- 4. Python API inputs ---------------------------------------------------------------------------------

_API_KW = dict(width=32, lora="off", overrides=["schedule.num_inference_steps=10", "schedule.drag_timesteps=1",
                                                 "schedule.drags_per_timestep=1"])


@pytest.mark.parametrize("points", [np.array([[[8, 8], [20, 20]]]), torch.tensor([[[8.0, 8.0], [20.0, 20.0]]]),
                                    [(np.array([8, 8]), torch.tensor([20, 20]))]],
                         ids=["numpy", "tensor", "mixed"])
def test_points_as_arrays_or_tensors_work(tiny_editor, points):
    res = tiny_editor.edit(random_image(32, 32), points, **_API_KW)
    assert res.report["handles_xy"] == [[8.0, 8.0]] and res.report["targets_xy"] == [[20.0, 20.0]]


@pytest.mark.parametrize("points,needle", [
    ((p for p in [((8, 8), (20, 20))]), "points is a generator"),
    ([8, 8, 20, 20], "points[0] is 8, not a (handle, target) pair"),
    ([[8, 8], [20, 20]], "points[0] is [8, 8], not a pair of [x, y] points with real numbers (a flat list"),
    ({"points": [[8, 8], [20, 20]]}, "points is a dict"),
    ("8,8:20,20", "points is a str"),
    ([((8 + 1j, 8), (20, 20))], "points[0] is (((8+1j), 8), (20, 20)), not a pair of [x, y] points"),
    ([((True, 8), (20, 20))], "points[0] is ((True, 8), (20, 20)), not a pair"),
    (np.array([[8, 8], [20, 20]]), "points has shape (2, 2)"),
    (np.array([[[8, 8], [20, 20]]], dtype=complex), "points is an array of complex128"),
    ([((float("nan"), 8), (20, 20))], "a coordinate is not finite"),
], ids=["generator", "flat", "flat-points", "dict", "string", "complex", "bool", "array-2d", "array-complex", "nan"])
def test_bad_points_are_one_line_naming_the_argument(tiny_editor, points, needle):
    with pytest.raises(BadInputError) as exc:
        tiny_editor.edit(random_image(32, 32), points, **_API_KW)
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("extra,needle", [(dict(seed=2**70), "seed 1180591620717411303424 must be an integer"),
                                          (dict(seed=True), "seed True must be an integer"),
                                          (dict(plugins=None), "plugins is None"),
                                          (dict(plugins=[None]), "plugins holds None")])
def test_bad_seed_and_plugins_are_one_line(tiny_editor, extra, needle):
    with pytest.raises(GoodDragError, match=needle.replace("(", r"\(")):
        tiny_editor.edit(random_image(32, 32), [((8, 8), (20, 20))], **{**_API_KW, **extra})


def test_float_and_32bit_grayscale_images_are_scaled_not_black_or_clipped():
    from gooddrag.core.inputs import prepare_input

    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    want = np.round(ramp * 255).astype(np.uint8)
    f01 = Image.fromarray(ramp, "F")
    i16 = Image.fromarray((ramp * 65535).round().astype(np.int32), "I")
    for im in (f01, i16):
        got = np.asarray(prepare_input(im, [((8, 8), (20, 20))], width=32).image)[..., 0]
        assert np.abs(got.astype(int) - want).max() <= 1, im.mode
    mask = prepare_input(random_image(32, 32), [((8, 8), (20, 20))], Image.fromarray(ramp, "F"), width=32).mask
    assert mask.mean() == pytest.approx(0.5, abs=0.01)  # the upper half of 0..1 is editable, not none of it
    with pytest.raises(BadInputError, match=r"mode F\) has values from -1 to 1"):
        prepare_input(Image.fromarray(ramp * 2 - 1, "F"), [((8, 8), (20, 20))], width=32)


# --- 8. bounded decode, pair cap, duplicate pairs and keys ----------------------------------------------

def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, capsys, no_model, monkeypatch):
    from gooddrag.core.inputs import MAX_PIXELS

    big = tmp_path / "big.png"
    Image.new("L", (4100, 4100)).save(big)  # 16.8 Mpx, under pillow's own limit, a few KB on disk
    assert big.stat().st_size < 100_000 and 4100 * 4100 < Image.MAX_IMAGE_PIXELS
    opened = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (opened.append(self.size), real_load(self))[1])
    code, _, err = run(["edit", big, "--points", "8,8:30,20", *BASE, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err == (f"error: image {str(big)!r} is 4100x4100, over the limit of {MAX_PIXELS} pixels "
                                 "(a decompression bomb, or far larger than needed; GOODDRAG_MAX_PIXELS sets the "
                                 "limit); downscale it\n"), err
    assert (4100, 4100) not in opened  # refused before decoding
    monkeypatch.setenv("GOODDRAG_MAX_PIXELS", str(4100 * 4100))
    from gooddrag.core.inputs import prepare_input

    assert prepare_input(big, [((8, 8), (30, 20))]).size == (4100, 4100)
    monkeypatch.setenv("GOODDRAG_MAX_PIXELS", "1000")
    with pytest.raises(BadInputError, match="is 48x32, over the limit of 1000 pixels"):
        prepare_input(random_image(48, 32), [((8, 8), (30, 20))])  # a PIL image too


def test_too_many_pairs_is_one_short_line(tmp_path, capsys, no_model):
    img = make_image(tmp_path / "img.png")
    pts = tmp_path / "p.json"
    pts.write_text(json.dumps({"points": [[i % 40, 5 + i % 2] for i in range(202)]}))
    code, _, err = run(["edit", img, "--points-file", pts, *BASE, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err == "error: 101 point pairs given, over the limit of 100; drag fewer points per edit " \
                                "(split it into several edits)\n", err
    many = [a for i in range(10_000) for a in ("--points", f"{i % 40},{i % 30}:{(i + 1) % 40},{i % 30}")]
    code, _, err = run(["edit", img, *many, *BASE, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith("error: 10000 point pairs given") and len(err) < 200


def test_pairs_that_fight_each_other_are_warned():
    from gooddrag.core.inputs import prepare_input

    pairs = [((4, 4), (20, 20)), ((4, 4), (20, 20)), ((4, 4), (10, 30)), ((30, 8), (40, 8)), ((40, 8), (30, 8))]
    notes = [n for n in prepare_input(random_image(48, 32), pairs, width=32).warnings if "pair" in n]
    assert "pair 2 repeats pair 1 ((4, 4) -> (20, 20)); give it once" in notes
    assert any(n.startswith("pairs 1 and 3 drag the same handle (4, 4) to two targets") for n in notes)
    assert any(n.startswith("pairs 4 and 5 swap (40, 8) and (30, 8) (A->B with B->A)") for n in notes)
    clean = prepare_input(random_image(48, 32), [((4, 4), (20, 20)), ((30, 8), (40, 8))], width=32).warnings
    assert not any("repeats" in n or "same handle" in n or "swap" in n for n in clean)


def test_a_points_file_with_a_duplicate_key_is_refused(tmp_path, capsys, no_model):
    img = make_image(tmp_path / "img.png")
    pts = tmp_path / "p.json"
    pts.write_text('{"points": [[1, 1], [2, 2]], "points": [[8, 8], [30, 20]]}')
    code, _, err = run(["edit", img, "--points-file", pts, *BASE, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err == f"error: points file {str(pts)!r} gives the key 'points' twice (only one would " \
                                "count); keep one\n", err
    from gooddrag.plugins.datasets import read_json

    with pytest.raises(BadInputError, match="gives the key 'points' twice"):
        read_json(pts, "s1")


# --- 7. bench and score edge cases --------------------------------------------------------------------------

def _d100(root: Path, *names: str) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_datasets import write_drag100_sample

    for i, name in enumerate(names):
        write_drag100_sample(root, name, w=40, h=30, points=((10, 10), (20, 15)), seed=i)
    return root


def _score(argv, capsys):
    code = cli.main([str(a) for a in ["score", *argv]])
    out, err = capsys.readouterr()
    return code, out, err


def _csv(path: Path) -> dict:
    import csv

    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_an_alias_folder_is_one_sample_and_links_out_of_the_dataset_are_skipped(tmp_path):
    from gooddrag.core.errors import GoodDragWarning
    from gooddrag.core.samples import MalformedSample
    from gooddrag.plugins.datasets.drag100 import Drag100

    root = _d100(tmp_path / "d100", "cat_0", "dog_1")
    (root / "cat_alias").symlink_to(root / "cat_0")  # the same sample under two names
    outside = _d100(tmp_path / "elsewhere", "owl_2")
    (root / "owl_2").symlink_to(outside / "owl_2")  # a sample folder that leads out of the dataset
    (root / "dog_1" / "original.jpg").unlink()
    (root / "dog_1" / "original.jpg").symlink_to(outside / "owl_2" / "original.jpg")  # a file that leads out
    with pytest.warns(GoodDragWarning) as caught:
        samples = list(Drag100().samples(root))
    assert [s.id for s in samples] == ["cat_0", "dog_1"]
    said = [str(w.message) for w in caught]
    assert any(m == f"{root / 'cat_alias'} is a link to {root / 'cat_0'}, another sample folder: skipped, so that "
               "sample is scored once" for m in said), said
    assert any(m.startswith(f"{root / 'owl_2'} links outside the dataset folder") for m in said), said
    assert isinstance(samples[1], MalformedSample) and "original.jpg links outside its sample folder" in samples[1].error


def test_a_sample_with_two_originals_is_ambiguous(tmp_path):
    from gooddrag.core.samples import MalformedSample
    from gooddrag.plugins.datasets.drag100 import Drag100

    root = _d100(tmp_path / "d100", "cat_0")
    Image.open(root / "cat_0" / "original.jpg").save(root / "cat_0" / "original.png")
    (s,) = Drag100().samples(root)
    assert isinstance(s, MalformedSample)
    assert s.error == "sample 'cat_0': has original.jpg and original.png: which one is the input is ambiguous; keep one"


def test_score_flags_an_empty_mask_refuses_foreign_run_json_and_fails_when_nothing_scored(tmp_path, capsys):
    from gooddrag.plugins.datasets.drag100 import Drag100

    root = _d100(tmp_path / "d100", "cat_0", "dog_1", "owl_2")
    Image.new("L", (40, 30), 0).save(root / "owl_2" / "mask.png")  # no editable pixel
    samples = {s.id: s for s in Drag100().samples(root)}
    res = tmp_path / "res"
    for sid in samples:
        (res / sid).mkdir(parents=True)
        samples[sid].image.save(res / sid / "result.png")
    (res / "cat_0" / "run.json").write_text(json.dumps({"bench": {"sample": "dog_1"}}))  # another sample's run
    (res / "dog_1" / "run.json").write_text(json.dumps({"handles_xy": [[1, 1], [2, 2]]}))  # other points
    code, _, err = _score([res, root, "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    rows = _csv(tmp_path / "s" / "results.csv")
    assert rows["cat_0"]["status"] == "failed" and rows["cat_0"]["error"] == (
        f"sample 'cat_0': {res / 'cat_0' / 'run.json'} is the run of sample 'dog_1'; put each result in its own "
        "sample's folder")
    assert rows["dog_1"]["status"] == "failed" and "has 2 pairs but the sample has 1" in rows["dog_1"]["error"]
    assert rows["owl_2"]["status"] == "ok" and rows["owl_2"]["flags"] == "mask has no editable pixel"
    assert rows["cat_0"]["flags"] == ""

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _score([empty, root, "--out", tmp_path / "s2"], capsys)
    assert code == 2 and err == (f"error: nothing could be scored: no result image found for any of the 3 samples "
                                 f"in {str(empty)!r}; see docs/evaluation.md for the accepted layouts\n"), err
    shutil.rmtree(res / "owl_2")
    code, _, err = _score([res, root, "--out", tmp_path / "s3"], capsys)
    assert code == 2 and err.startswith("error: nothing could be scored: all 2 results found"), err


# --- 6. the local Ray ---------------------------------------------------------------------------------------

class _FakeRay:
    """Records what the runner asks of Ray (a real local instance may only start in the loopback-only
    namespace of tests/test_ray_runner.py)."""

    def __init__(self, running_cluster: bool = False):
        self.calls, self.running, self.up = [], running_cluster, False

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.calls.append(kw)
        if kw.get("address") == "auto" and not self.running:
            raise ConnectionError("Could not find any running Ray instance.")
        if kw.get("_temp_dir"):
            Path(kw["_temp_dir"], "session_latest").mkdir()  # as Ray fills its session folder
        self.up = True

    def shutdown(self):
        self.up = False


def test_the_local_ray_sends_nothing_warns_that_it_listens_and_removes_its_session(monkeypatch):
    from gooddrag.plugins.runners.ray import LISTENS_WARNING, RayRunner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    fake = _FakeRay()
    runner = RayRunner()
    with pytest.warns(GoodDragWarning) as caught:
        assert runner._connect(fake) is True
    local = fake.calls[-1]
    assert local["address"] == "local"
    assert local["include_dashboard"] is False and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    temp = Path(local["_temp_dir"])
    assert temp.is_dir() and str(temp).startswith("/tmp/gdray-")
    assert [str(w.message) for w in caught if issubclass(w.category, GoodDragWarning)] == [LISTENS_WARNING]
    fake.shutdown()
    runner._cleanup()
    assert not temp.exists()


def test_ray_joins_a_cluster_already_running_here_without_starting_one(monkeypatch):
    from gooddrag.plugins.runners.ray import RayRunner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay(running_cluster=True)
    assert RayRunner()._connect(fake) is True
    assert [c["address"] for c in fake.calls] == ["auto"]


def test_the_weights_digest_ignores_adapters_a_path_lora_left_behind(tiny_editor, tmp_path):
    """A LoRA loaded by path and dropped again leaves peft's wrapper layers: the digest (so the cache
    key) of the model must not change, or a fresh process would miss the cache."""
    from gooddrag.plugins.backbones.fingerprint import tensors_digest

    unet, lora = tiny_editor.backbone.unet, tiny_editor.backbone.lora
    lora.drop()  # an earlier edit's LoRA stays fused until the next edit drops it
    before = tensors_digest(unet, sample=1024)
    first = tiny_editor.edit(random_image(32, 32, seed=41), [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    tiny_editor.edit(random_image(32, 32, seed=41), [((8, 8), (20, 20))],
                     lora=first.report["lora"].split(" ", 1)[1], **{**_LORA_KW, "overrides": _LORA_KW["overrides"][4:]})
    lora.drop()
    assert tensors_digest(unet, sample=1024) == before
