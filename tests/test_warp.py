"""The instant warp (schedules/warp.py) moves content where the points say, and nothing else.

The pure warp is tested on latents built by hand; the schedule runs end to end on the toy backbone,
whose features are the latent, so a move is exact there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gooddrag.core.warp import warp_latent

H = W = 32


def blob(center, size=(H, W), sigma=1.5, channels=4):
    rows, cols = torch.meshgrid(torch.arange(size[0]).float(), torch.arange(size[1]).float(), indexing="ij")
    g = torch.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma ** 2))
    return g.expand(1, channels, *size).clone()  # (1, C, h, w)


def peak(z):
    i = int(z[0, 0].argmax())
    return np.array(divmod(i, z.shape[-1]))


def pts(*rc):
    return torch.tensor(rc, dtype=torch.float32)


@pytest.mark.parametrize("combine", ["nearest", "blend"])
@pytest.mark.parametrize("fill", ["nearest", "noise"])
def test_a_blob_at_the_handle_ends_at_the_target(combine, fill):
    z = blob((10, 8))
    out, _ = warp_latent(z, pts((10, 8)), pts((13, 20)), None, combine=combine, fill=fill,
                         noise=torch.zeros_like(z))
    assert np.abs(peak(out) - [13, 20]).max() <= 1  # within one latent pixel
    assert float(out[0, 0, 13, 20]) > 0.95  # the blob itself, not a smear of it
    assert float(out[0, 0, 10, 8]) < 0.05  # and it left the handle


def test_outside_the_mask_the_latent_is_the_input_bit_for_bit():
    torch.manual_seed(0)
    z = torch.randn(1, 4, H, W)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 4:20, 2:24] = 1
    out, revealed = warp_latent(z, pts((10, 6)), pts((12, 16)), mask, noise=torch.randn(1, 4, H, W))
    fixed = (mask == 0).expand_as(z)
    assert torch.equal(out[fixed], z[fixed])
    assert not bool(revealed[mask == 0].any())
    assert not torch.equal(out, z)  # inside, it moved


def test_two_pairs_move_two_blobs_independently():
    z = blob((8, 6)) + blob((24, 26))
    handles, targets = pts((8, 6), (24, 26)), pts((8, 14), (18, 26))
    out, _ = warp_latent(z, handles, targets, None, fill="nearest")
    for target in ((8, 14), (18, 26)):
        assert float(out[0, 0, target[0], target[1]]) > 0.95
    for handle in ((8, 6), (24, 26)):
        assert float(out[0, 0, handle[0], handle[1]]) < 0.05
    # each blob moved exactly as it does when dragged alone
    alone1, _ = warp_latent(z, handles[:1], targets[:1], None, fill="nearest")
    alone2, _ = warp_latent(z, handles[1:], targets[1:], None, fill="nearest")
    assert torch.equal(out[..., 4:13, 2:19], alone1[..., 4:13, 2:19])
    assert torch.equal(out[..., 14:29, 21:31], alone2[..., 14:29, 21:31])


def test_revealed_positions_get_fresh_noise():
    torch.manual_seed(1)
    z = torch.randn(1, 4, H, W)
    noise = torch.randn(1, 4, H, W) + 100  # unmistakable
    out, revealed = warp_latent(z, pts((16, 10)), pts((16, 20)), None, fill="noise", noise=noise)
    r = revealed.expand_as(z)
    assert int(revealed.sum()) > 0
    assert torch.equal(out[r], noise[r])
    assert float(out[~r].max()) < 50  # noise nowhere else


def test_revealed_positions_copy_their_nearest_source_neighbour():
    torch.manual_seed(2)
    z = torch.randn(1, 4, H, W)
    out, revealed = warp_latent(z, pts((16, 10)), pts((16, 20)), None, fill="nearest")
    holes = revealed[0, 0].nonzero().tolist()
    kept = (~revealed[0, 0]).nonzero().float()
    assert holes
    for r, c in holes:
        near = kept[((kept - torch.tensor([r, c]).float()) ** 2).sum(1).argmin()].long().tolist()
        assert torch.equal(out[0, :, r, c], out[0, :, near[0], near[1]])


def test_bad_choices_are_refused():
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="combine"):
        warp_latent(z, pts((1, 1)), pts((2, 2)), None, combine="sum")
    with pytest.raises(ValueError, match="noise tensor"):
        warp_latent(z, pts((1, 1)), pts((2, 2)), None, fill="noise")


# --- the schedule in the engine ---------------------------------------------------------------------

from gooddrag.core.editor import Editor  # noqa: E402
from gooddrag.core.errors import ConfigError, GoodDragWarning  # noqa: E402
from gooddrag.core.registry import default_registry  # noqa: E402
from gooddrag.testing.toy import ToyBackbone  # noqa: E402

IW = 128
YY, XX = np.mgrid[0:IW, 0:IW]
HANDLE, TARGET = (40, 64), (84, 64)  # image px [x, y]


def blob_image(cx, cy):
    a = (np.exp(-((XX - cx) ** 2 + (YY - cy) ** 2) / (2 * 10 ** 2)) * 255).astype("uint8")
    return Image.fromarray(np.stack([a, a, a], -1))


def test_instant_moves_the_blob_with_no_lora_loss_tracker_or_gradient():
    r = Editor(ToyBackbone()).edit(blob_image(*HANDLE), [(HANDLE, TARGET)], preset="instant", width=IW)
    res = np.asarray(r.image, dtype=float)[..., 0] / 255
    assert res[TARGET[1], TARGET[0]] > 0.6 and res[HANDLE[1], HANDLE[0]] < 0.3
    rep = r.report
    cfg = rep["config"]
    assert cfg["schedule"] == "warp" and cfg["loss"] is None and cfg["tracker"] is None
    assert cfg["loss_params"] is None and rep["lora"] == "off" and rep["gradient_steps"] == 0
    passes = rep["unet_passes"]
    steps = cfg["schedule_params"]["num_inference_steps"]
    inverted = round(cfg["schedule_params"]["inversion_strength"] * steps)
    assert passes["lora"] == passes["reference"] == passes["drag"] == {"forward": 0, "backward": 0}
    assert passes["inversion"] == {"forward": inverted, "backward": 0}
    assert passes["finish"] == {"forward": 2 * inverted, "backward": 0}  # the toy runs [ref, edit] as two
    assert passes["total"] == {"forward": 3 * inverted, "backward": 0}
    assert np.abs(np.array(r.points[0]) - TARGET).max() <= 2  # the handle is reported where the warp put it


def test_the_engine_builds_no_loss_or_tracker_for_the_warp(monkeypatch):
    reg = default_registry()
    asked = []
    real_get = reg.get
    monkeypatch.setattr(reg, "get", lambda kind, name: asked.append(kind) or real_get(kind, name))
    Editor(ToyBackbone(), reg).edit(blob_image(*HANDLE), [(HANDLE, TARGET)], preset="instant", width=IW)
    assert "loss" not in asked and "tracker" not in asked


def test_aldd_reports_its_backward_passes():
    r = Editor(ToyBackbone()).edit(blob_image(*HANDLE), [(HANDLE, TARGET)], lora="off", width=IW,
                                   overrides=["schedule.patience=0"])
    drag = r.report["unet_passes"]["drag"]
    assert drag["backward"] == r.report["gradient_steps"] > 0
    assert drag["forward"] >= drag["backward"]


def test_a_loss_asked_of_the_warp_is_a_note_and_a_schedule_that_needs_one_must_get_one():
    reg = default_registry()
    from gooddrag.core.config import resolve_config

    with pytest.warns(GoodDragWarning, match="--loss info-preserving, loss.lam have no effect: schedule 'warp' uses no loss"):
        cfg = resolve_config(reg, preset="instant", loss="info-preserving", overrides=["loss.lam=0.3"])
    assert cfg.loss is None
    with pytest.warns(GoodDragWarning, match="lora.rank has no effect: schedule 'warp' uses no LoRA"):
        resolve_config(reg, preset="instant", overrides=["lora.rank=8"])
    with pytest.raises(ConfigError, match="schedule 'aldd' needs a loss and preset 'instant' names none; choose one with --loss"):
        resolve_config(reg, preset="instant", schedule="aldd")
    assert resolve_config(reg, preset="instant", schedule="aldd", loss="info-preserving", tracker="nearest").loss_params


def test_outside_the_mask_nothing_changes_and_a_pair_outside_it_is_warned():
    mask = np.zeros((IW, IW), bool)
    mask[20:100, 20:80] = True  # the target (84, 64) is outside
    img = blob_image(*HANDLE)
    with pytest.warns(GoodDragWarning, match="target 1 at \\(84, 64\\) is outside the editable mask"):
        r = Editor(ToyBackbone()).edit(img, [(HANDLE, TARGET)], mask, preset="instant", width=IW)
    assert any("outside the editable mask" in w for w in r.report["warnings"])
    toy = ToyBackbone()  # what the toy makes of the image untouched: its 8x8 average, decoded
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    same = (toy.decode(toy.encode(x))[0].permute(1, 2, 0).numpy() * 255).round()
    res = np.asarray(r.image, dtype=float)
    outside = ~np.kron(mask[::8, ::8], np.ones((8, 8), bool))  # whole latent cells outside the mask
    assert np.abs(res[outside] - same[outside]).max() <= 1  # unchanged (up to the 8-bit rounding)
    assert np.abs(res[~outside] - same[~outside]).max() > 50  # while inside the blob moved


def test_handles_at_the_border_are_clamped_to_the_latent():
    r = Editor(ToyBackbone()).edit(blob_image(*HANDLE), [((0, 0), (60, 60)), ((IW - 1, IW - 1), (70, IW - 1))],
                                   preset="instant", width=IW)
    assert r.report["stop_reason"] == "warped"
    for x, y in r.points:
        assert 0 <= x < IW and 0 <= y < IW


def test_instant_from_the_command_line_on_the_tiny_model(img, tmp_path, capsys):
    import json

    from gooddrag.app import cli

    code = cli.main(["edit", str(img), "--points", "10,10:20,12", "--preset", "instant", "--model", "tiny-random",
                     "--width", "32", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["config"]["schedule"] == "warp" and run["unet_passes"]["drag"]["forward"] == 0
    assert run["unet_passes"]["finish"]["forward"] == 14  # one batch-2 pass per remaining step (20 x 0.7)
    assert "warped" in out


def test_instant_through_the_python_api_on_the_tiny_model(tiny_editor, img):
    r = tiny_editor.edit(str(img), [((10, 10), (20, 12))], preset="instant", width=32)
    assert r.image.size == (48, 32) and r.report["lora"] == "off"
    assert r.report["unet_passes"]["total"] == {"forward": 28, "backward": 0}


def test_the_ui_lists_the_instant_preset_and_opens_with_it(tmp_path):
    gr = pytest.importorskip("gradio")
    from gooddrag.app.ui.page import UiSettings, build_page
    from gooddrag.app.ui.work import EditorPool
    from gooddrag.core.config import LoadOptions

    reg = default_registry()
    settings = UiSettings(load=LoadOptions(model="tiny-random"), preset="instant", out=tmp_path, samples=tmp_path)
    page = build_page(settings, reg, EditorPool(reg))
    dd = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "preset")
    assert "instant" in [c[0] if isinstance(c, tuple) else c for c in dd.choices] and dd.value == "instant"
    picker = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "pick-schedule")
    assert picker.value == "warp"
    assert isinstance(page, gr.Blocks)


def test_instant_refine_starts_from_the_warp_and_stops_once_tracking_confirms_it():
    r = Editor(ToyBackbone()).edit(blob_image(*HANDLE), [(HANDLE, TARGET)], preset="instant-refine", lora="off",
                                   width=IW)
    res = np.asarray(r.image, dtype=float)[..., 0] / 255
    assert res[TARGET[1], TARGET[0]] > 0.6 and res[HANDLE[1], HANDLE[0]] < 0.3
    # the warp lands the blob on the target's latent pixel (within half of one: 2 feature-grid px); the
    # drags only finish the sub-pixel rest, where the same schedule without the warp drags the whole way
    plain = Editor(ToyBackbone()).edit(blob_image(*HANDLE), [(HANDLE, TARGET)], preset="instant-refine", lora="off",
                                       width=IW, overrides=["schedule.warp_start=false"])
    assert r.report["stop_reason"] == plain.report["stop_reason"] == "reached"
    assert 0 <= r.report["gradient_steps"] <= plain.report["gradient_steps"] / 3, (r.report["gradient_steps"],
                                                                                 plain.report["gradient_steps"])


def test_the_warp_schedule_passes_the_plugin_contract_suite():
    from gooddrag.schedules.warp import Warp
    from gooddrag.testing import check_component

    check_component("schedule", Warp)


# --- the cost estimate a CPU user sees before paying -----------------------------------------------

def test_worst_case_cost_counts_every_pass_of_the_preset():
    from gooddrag.core.config import resolve_config
    from gooddrag.core.estimate import FORWARD_BACKWARD, LORA_STEP_B4_512, MUTUAL_B2, forward_units

    reg = default_registry()
    good = forward_units(resolve_config(reg), reg.get("schedule", "aldd"), (512, 512))
    assert good == {"lora": 70 * LORA_STEP_B4_512, "inversion": 38, "reference": 7,
                    "drag": 7 * 2 + 210 * FORWARD_BACKWARD, "finish": 31 * MUTUAL_B2}
    fast = forward_units(resolve_config(reg, preset="instant"), reg.get("schedule", "warp"), (512, 512))
    assert fast == {"lora": 0, "inversion": 14, "reference": 0, "drag": 0, "finish": 14 * MUTUAL_B2}
    no_lora = forward_units(resolve_config(reg, lora="off"), reg.get("schedule", "aldd"), (512, 512))
    assert no_lora["lora"] == 0
    assert sum(fast.values()) / sum(good.values()) < 0.05


def test_gooddrag_on_a_cpu_with_a_full_size_model_says_what_it_costs_before_the_lora(img, tmp_path, capsys,
                                                                                     monkeypatch):
    from gooddrag.app import cli
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone

    argv = ["edit", str(img), "--points", "10,10:20,12", "--model", "tiny-random", "--width", "32",
            "-p", "schedule.num_inference_steps=4", "-p", "schedule.drag_timesteps=1", "-p",
            "schedule.drags_per_timestep=1", "-p", "lora.steps=1", "--precision", "fp32"]
    assert cli.main([*argv, "--out", str(tmp_path / "tiny")]) == 0
    assert "estimate on this CPU" not in capsys.readouterr().err  # the tiny model costs nothing worth saying
    monkeypatch.setattr(StableDiffusionBackbone, "unet_parameters", lambda self: 860_000_000)  # "full size"
    assert cli.main([*argv, "--out", str(tmp_path / "full")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("estimate on this CPU")]
    assert len(lines) == 1, lines
    assert "preset gooddrag takes up to about" in lines[0] and "(LoRA training" in lines[0]
    assert "--preset instant answers in about" in lines[0]
    assert cli.main(["edit", str(img), "--points", "10,10:20,12", "--model", "tiny-random", "--width", "32",
                     "--preset", "instant", "--out", str(tmp_path / "instant")]) == 0
    assert "estimate on this CPU" not in capsys.readouterr().err  # instant is the fast answer already


def test_the_bench_runs_the_instant_preset(tmp_path, capsys):
    import csv
    import json
    import sys
    from pathlib import Path

    from gooddrag.app.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from test_datasets import write_drag100_sample

    root = tmp_path / "d100"
    write_drag100_sample(root, "cat_0", w=48, h=8, points=((8, 4), (16, 4)), seed=0)
    out = tmp_path / "bench"
    assert main(["bench", str(root), "--out", str(out), "--model", "tiny-random", "--device", "cpu",
                 "--width", "64", "--preset", "instant"]) == 0, capsys.readouterr().err
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["stop_reason"] == "warped"
    run = json.loads((out / "samples" / "cat_0" / "run.json").read_text())
    assert run["config"]["schedule"] == "warp" and run["unet_passes"]["total"]["backward"] == 0
    assert "(warp)" in (out / "report.md").read_text()
