"""The drag editor driven in a real browser: headless system Chromium through Playwright (no browser
is downloaded; without Chromium these tests skip and say why). One server per module, on 127.0.0.1,
with the tiny random model and a test plugin's tracker registered."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
from attrs.validators import ge, in_, le
from PIL import Image

from gooddrag.core.config import LoadOptions, Preset
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import p
from gooddrag.core.registry import Registry, default_registry, make_plugin_manager

CHROMIUM = os.environ.get("GOODDRAG_CHROMIUM") or next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium to drive (Debian: apt-get install "
                                                          "chromium; or set GOODDRAG_CHROMIUM)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
pytest.importorskip("gradio", reason="gradio (the ui extra) is not installed")
expect = sync_api.expect

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
WAIT_MS = 180_000  # an upper bound for one step on a CPU shared by many processes; the tests wait for elements, not time
SHOTS = os.environ.get("GOODDRAG_UI_SCREENSHOTS")  # also keep the screenshots there (the README's comes from here)


class ProbeTracker:
    """Keeps every handle where it is (a test plugin's tracker with its own parameters)."""

    name = "ui-probe"

    @attrs.frozen(kw_only=True)
    class Params:
        probe_window: int = p(5, "search window of the probe tracker", ge(1), le(9))
        probe_metric: str = p("l1", "distance the probe would use", in_(("l1", "cos")))

    def __init__(self, params):
        self.params = params

    def track(self, ref_vectors, feats, points):
        return points


#: a stand-in for the fast ``instant`` preset while it is not installed: the Preview button runs
#: whatever preset has that name, so the test gives it a short GoodDrag
STAND_IN = Preset(name="instant", doc="test stand-in: a short GoodDrag", schedule="aldd", loss="info-preserving",
                  tracker="nearest", params={"schedule": {"num_inference_steps": 6, "drag_timesteps": 1,
                                                          "drags_per_timestep": 2, "steps_per_drag": 1}})


class ProbePlugin:
    def __init__(self, presets=()):
        self.presets = list(presets)

    @hookimpl
    def gooddrag_register_trackers(self):
        return [ProbeTracker]

    @hookimpl
    def gooddrag_register_presets(self):
        return self.presets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_backbone, tmp_path_factory):
    """The UI on 127.0.0.1 with the tiny model already loaded; closed after the module."""
    from gooddrag.app.ui import launch
    from gooddrag.app.ui.page import UiSettings
    from gooddrag.app.ui.work import EditorPool

    root = tmp_path_factory.mktemp("ui")
    old_tmp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    pm = make_plugin_manager()
    has_instant = "instant" in default_registry().names("preset")
    pm.register(ProbePlugin([] if has_instant else [STAND_IN]), name="ui-test-plugin")
    registry = Registry(pm)
    pool = EditorPool(registry)
    load = LoadOptions(model="tiny-random", device="cpu")
    pool.adopt(tiny_backbone, load)
    settings = UiSettings(load=load, lora="off", width=32, out=root / "runs", samples=root / "samples")
    page = launch(settings, host="127.0.0.1", port=_free_port(), registry=registry, pool=pool, block=False,
                  quiet=True)
    yield page.local_url, settings
    page.close()
    if old_tmp is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old_tmp


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    pg.goto(server[0])
    expect(pg.locator("#status")).to_have_text("Ready.")  # the page is connected to the server
    yield pg
    pg.close()


def snap(page, tmp_path, name: str) -> Path:
    """Full-page screenshots at 1400 and 800 px wide in the test's folder (and in
    $GOODDRAG_UI_SCREENSHOTS when set): ``name.png`` and ``name-800.png``."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shots = [path]
    if SHOTS:
        page.set_viewport_size({"width": 800, "height": 1000})
        page.wait_for_timeout(300)  # the layout settles
        shots.append(tmp_path / f"{name}-800.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
        page.set_viewport_size({"width": 1400, "height": 1000})
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        for q in shots:
            shutil.copy(q, Path(SHOTS) / q.name)
    return path


def open_file(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#open-image").click()
    chooser.value.set_files(str(path))


def upload(page, path: Path) -> None:
    open_file(page, path)
    expect(page.locator("#points-view .gd-img")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Opened")


def brush(page) -> None:
    """One stroke across the middle of the image editor's canvas."""
    box = page.locator("#input-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy)
    page.mouse.down()
    for i in range(25):
        page.mouse.move(cx - 60 + 5 * i, cy + 3 * (i % 2))
    page.mouse.up()


def points_box(page) -> dict:
    return page.locator("#points-view .gd-svg").bounding_box()


def click(page, fx: float, fy: float, expect_text: str | None = None) -> None:
    """Click the point editor at a fraction of the picture's size (and wait until the list says so)."""
    box = points_box(page)
    page.locator("#points-view .gd-svg").click(position={"x": box["width"] * fx, "y": box["height"] * fy})
    if expect_text:
        expect(page.locator("#points-list")).to_contain_text(expect_text)


def shown_points(page) -> list:
    """The points the page holds (what Run sends), read from the component's list."""
    text = page.locator("#points-list").inner_text()
    return [[int(x), int(y)] for x, y in re.findall(r"\((\d+), (\d+)\)", text)]


def open_section(page, title: str) -> None:
    """Open an accordion by its title (they start closed)."""
    page.get_by_text(title).first.click()


def set_param(page, kind: str, field: str, value) -> None:
    box = page.locator(f"#param-{kind}-{field} input").first
    if not box.is_visible():
        open_section(page, "per image; trained once" if kind == "lora" else "Method and parameters")
    box.fill(str(value))
    box.press("Tab")


def download(page, name: str):
    """The download link of one output file."""
    return page.locator(f'#downloads a[href$="/{name}"]')


def run_and_wait(page, settings, button: str = "#run", done: str = "Run done") -> None:
    """Click Run (or Preview) and wait until its edit is written and the page says so."""
    before = len(runs(settings))
    stale = status_text(page)  # what the status said before this click
    page.locator(button).click()
    wait_for_runs(page, settings, before + 1, stale)
    expect(page.locator("#status")).to_contain_text(done)
    expect(download(page, "run.json")).to_be_visible()


def runs(settings) -> list[Path]:
    return sorted(settings.out.glob("*/run.json"), key=lambda q: q.stat().st_mtime)


def status_text(page) -> str:
    """The status line's own text (without gradio's elapsed-time counter shown while an event is pending)."""
    lines = page.locator("#status").inner_text().splitlines()
    tracker = re.compile(r"^\s*(processing\s*\|.*|queue:.*|[\d./]+s)\s*$")  # "processing | 0.3/1.1s", "0.1s"
    return "\n".join(x for x in lines if x.strip() and not tracker.match(x)).strip()


def wait_for_runs(page, settings, n: int, stale: str = "") -> None:
    """Until the n-th edit's run.json is written (at most WAIT_MS); a new error in the status (not the
    ``stale`` text from before the click) fails at once."""
    end = time.monotonic() + WAIT_MS / 1000
    while len(runs(settings)) < n:
        status = status_text(page)
        assert "Error" not in status or status == stale, status
        assert time.monotonic() < end, f"{len(runs(settings))} edits written, waited for {n}; status: {status}"
        page.wait_for_timeout(200)


def latest_run(settings) -> dict:
    return json.loads(runs(settings)[-1].read_text())


def fast(page) -> None:
    """Few steps, so the tiny model edits in seconds."""
    set_param(page, "schedule", "num_inference_steps", 10)
    set_param(page, "schedule", "drag_timesteps", 1)
    set_param(page, "schedule", "drags_per_timestep", 2)
    set_param(page, "schedule", "steps_per_drag", 1)


def test_fast_clicks_pairs_in_order_a_dragged_point_and_an_edit(page, server, tmp_path):
    _, settings = server
    upload(page, EXAMPLE)
    brush(page)
    box = points_box(page)
    svg = page.locator("#points-view .gd-svg")
    # 20 clicks, 100 ms apart, on a diagonal: each is drawn at once and kept, in order
    for i in range(20):
        svg.click(position={"x": box["width"] * (0.08 + 0.042 * i), "y": box["height"] * (0.1 + 0.04 * i)})
        page.wait_for_timeout(100)
    expect(page.locator("#points-list")).to_have_attribute("data-count", "20")
    clicked = shown_points(page)
    assert len(clicked) == 20 and clicked == sorted(clicked)  # the diagonal, in click order
    assert page.locator("#points-view circle.gd-handle").count() == 10
    assert page.locator("#points-view circle.gd-target").count() == 10
    # a placed point dragged to a new place moves in the list (and nothing else changes)
    w, h = Image.open(EXAMPLE).size
    tx, ty = clicked[3]  # target of pair 2
    page.mouse.move(box["x"] + tx * box["width"] / w, box["y"] + ty * box["height"] / h)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.15 * box["height"], steps=6)
    page.mouse.up()
    moved = shown_points(page)
    assert len(moved) == 20 and moved[:3] == clicked[:3] and moved[4:] == clicked[4:]
    assert moved[3] != clicked[3] and abs(moved[3][0] - 0.9 * w) <= 2 and abs(moved[3][1] - 0.15 * h) <= 2
    fast(page)
    set_param(page, "schedule", "drags_per_timestep", 3)  # the parameter run.json must record
    snap(page, tmp_path, "ui-points")
    run_and_wait(page, settings)
    snap(page, tmp_path, "ui-result")

    run = latest_run(settings)
    assert run["input"]["points"] == moved  # the whole list, in order, as the page held it
    assert run["handles_xy"] == moved[0::2] and run["targets_xy"] == moved[1::2]
    assert run["config"]["schedule_params"]["drags_per_timestep"] == 3
    assert run["config"]["model"] == "tiny-random" and run["lora"] == "off"
    assert run["input"]["mask"] == "brushed"
    final = run["final_handles_xy"][0]
    expect(page.locator("#status")).to_contain_text(f"final handles ({final[0]}, {final[1]})")
    # the result shown in the page has the final handle marked (the marker's yellow ring)
    from gooddrag.app.outputs.draw import CURRENT as FINAL_RING

    expect(page.locator("#result .gd-result")).to_have_attribute("data-final", "yes")
    src = page.locator("#result img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")  # inline and exact: no server path, no lossy colours
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)
    x, y = final
    near = shown[max(0, y - 14):y + 15, max(0, x - 14):x + 15].reshape(-1, 3)
    assert (np.abs(near - FINAL_RING).sum(1) == 0).any()
    for name in ("result.png", "points.png", "mask.png", "run.json", "drag.gif"):
        expect(download(page, name)).to_be_visible()
    mask = np.asarray(Image.open(runs(settings)[-1].parent / "mask.png"))
    assert mask.shape == (h, w) and mask.any() and not mask.all()  # the brushed stroke, 255 = editable
    # the compare view shows both pictures whole (not a crop): each fits inside the view
    view = page.locator("#compare .gd-cmp-stage").bounding_box()
    for sel in ("#compare .gd-before", "#compare .gd-after"):
        img = page.locator(sel)
        b = img.bounding_box()
        assert b["width"] <= view["width"] + 1 and b["height"] <= view["height"] + 1
        assert abs(b["width"] / b["height"] - w / h) < 0.02  # the whole picture, its own aspect
    assert "/tmp" not in page.locator("#status").inner_text()  # no server path in the page

    page.locator("#drag-again").click()  # multi-round editing: the result is the next input
    expect(page.locator("#status")).to_contain_text("the result is the new input")
    expect(page.locator("#points-list")).to_have_text("No points yet.")
    click(page, 0.2, 0.2, "click its target")
    click(page, 0.3, 0.3, "Pairs: 1:")
    open_section(page, "Save the input as a benchmark sample")
    page.locator("#sample-name textarea, #sample-name input").first.fill("cat_1")
    page.locator("#save-sample").click()
    expect(page.locator("#status")).to_contain_text("Saved the input as Drag100 sample")
    from gooddrag.plugins.datasets.drag100 import Drag100

    sample = Drag100.load(settings.samples / "cat_1")
    result = Image.open(runs(settings)[-1].parent / "result.png")
    assert np.array_equal(np.asarray(sample.image), np.asarray(result.convert("RGB")))  # the new input
    assert sample.mask.any() and not sample.mask.all() and len(sample.pairs) == 1  # the brushed mask was kept


def test_a_non_image_keeps_the_work_and_bad_input_shows_a_message(page, server, tmp_path):
    _, settings = server
    upload(page, EXAMPLE)
    click(page, 0.3, 0.3, "click its target")
    src = page.locator("#points-view .gd-img").get_attribute("src")
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    open_file(page, notes)
    expect(page.locator("#status")).to_contain_text("'notes.png' is not a readable image")
    expect(page.locator("#status")).to_contain_text("The current image, mask and points are kept")
    assert str(tmp_path) not in page.locator("#status").inner_text()  # its name, not a server path
    assert page.locator("#points-view .gd-img").get_attribute("src") == src  # the same picture
    expect(page.locator("#points-list")).to_contain_text("1: (")  # the same point
    page.locator("#run").click()
    expect(page.locator("#status")).to_contain_text("1 point, an odd number")
    snap(page, tmp_path, "ui-bad-input")

    click(page, 0.5, 0.4, "Pairs: 1:")
    fast(page)
    before = len(runs(settings))
    run_and_wait(page, settings)
    assert len(runs(settings)) == before + 1
    expect(page.locator("#status")).not_to_contain_text("Error")  # the status says the current state only


def test_a_parameter_change_then_run_starts_an_edit_every_time(page, server, tmp_path):
    """Ten times in a row: change a parameter, click Run at once; every click starts an edit."""
    _, settings = server
    upload(page, EXAMPLE)
    click(page, 0.3, 0.4, "click its target")
    click(page, 0.5, 0.5, "Pairs: 1:")
    fast(page)
    before = len(runs(settings))
    for i in range(10):
        set_param(page, "schedule", "lr", f"{0.02 + 0.001 * i:.3f}")
        stale = status_text(page)
        page.locator("#run").click()
        wait_for_runs(page, settings, before + i + 1, stale)  # the status still says the last edit's "Run done"
        expect(page.locator("#status")).to_contain_text("Run done")
        assert len(runs(settings)) == before + i + 1
        assert latest_run(settings)["config"]["schedule_params"]["lr"] == pytest.approx(0.02 + 0.001 * i)


def test_cancel_during_lora_then_run(page, server, tmp_path):
    """Cancel stops the LoRA training within a step: the page is ready at once, and the next Run
    (LoRA off) gives its result in the normal time with no stale 'Cancelled'."""
    _, settings = server
    upload(page, EXAMPLE)
    click(page, 0.3, 0.4, "click its target")
    click(page, 0.5, 0.5, "Pairs: 1:")
    fast(page)
    open_section(page, "per image; trained once")
    page.locator("#lora-mode").get_by_text("auto", exact=True).click()
    set_param(page, "lora", "steps", 5000)  # minutes of training if it were not stopped
    set_param(page, "lora", "crop", 32)
    set_param(page, "lora", "batch_size", 1)
    page.locator("#run").click()
    expect(page.locator("#progress")).to_contain_text("LoRA step")
    expect(page.locator("#progress")).to_contain_text("ETA")
    snap(page, tmp_path, "ui-lora-progress")
    page.locator("#cancel").click()
    expect(page.locator("#status")).to_contain_text("Cancelled", timeout=5_000)
    expect(page.locator("#status")).to_contain_text("Ready.")
    before = len(runs(settings))
    page.locator("#lora-mode").get_by_text("off", exact=True).click()
    start = time.monotonic()
    page.locator("#run").click()
    expect(page.locator("#status")).to_contain_text("Run done")
    took = time.monotonic() - start
    expect(page.locator("#status")).not_to_contain_text("Cancelled")
    assert len(runs(settings)) == before + 1 and latest_run(settings)["lora"] == "off"
    assert took < 60, f"the Run after a cancel took {took:.0f} s: the cancelled LoRA training held the device"


def test_preview_runs_the_instant_preset(page, server, tmp_path):
    _, settings = server
    upload(page, EXAMPLE)
    click(page, 0.3, 0.4, "click its target")
    click(page, 0.5, 0.5, "Pairs: 1:")
    run_and_wait(page, settings, "#preview", "Preview done")
    expect(page.locator("#result img")).to_be_visible()
    assert latest_run(settings)["config"]["preset"] == "instant"
    snap(page, tmp_path, "ui-preview")


def test_a_generated_image_is_dragged_without_inversion(page, server, tmp_path):
    _, settings = server
    open_section(page, "generate one from a prompt")
    page.locator("#gen-prompt textarea, #gen-prompt input").first.fill("a red ball on grass")
    box = page.locator("#gen-steps input").first
    box.fill("10")
    box.press("Tab")
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("Generated 32x32")
    expect(page.locator("#points-view .gd-img")).to_be_visible()
    click(page, 0.3, 0.3, "click its target")
    click(page, 0.7, 0.6, "Pairs: 1:")
    set_param(page, "schedule", "drag_timesteps", 1)
    set_param(page, "schedule", "drags_per_timestep", 2)
    run_and_wait(page, settings)
    expect(page.locator("#status")).to_contain_text("Reused the generation's latents (no inversion)")
    expect(page.locator("#progress")).to_contain_text("inversion: done in")
    expect(page.locator("#progress")).to_contain_text("skipped: the generation's latents")
    expect(page.locator("#result .gd-result")).to_have_attribute("data-final", "yes")  # the result, not a preview
    snap(page, tmp_path, "ui-generated")
    run = latest_run(settings)
    assert run["inversion"] == "skipped: the generation latents were reused"
    assert run["input"]["image"] == "generated in gooddrag ui" and run["prompt"] == "a red ball on grass"
    assert run["config"]["schedule_params"]["num_inference_steps"] == 10  # the generation's sampler
    assert run["image_size"] == [32, 32]


def test_a_plugin_component_gets_its_controls(page, server, tmp_path):
    _, settings = server
    open_section(page, "Method and parameters")
    expect(page.locator("#param-tracker-probe_window")).to_be_hidden()  # another tracker is selected
    dropdown = page.locator("#pick-tracker input")
    dropdown.click()
    page.get_by_role("option", name="ui-probe").click()
    window = page.locator("#param-tracker-probe_window")
    expect(window).to_be_visible()
    expect(window).to_contain_text("search window of the probe tracker")
    expect(page.locator("#param-tracker-probe_metric")).to_contain_text("distance the probe would use")
    expect(page.locator("#params-tracker-ui-probe").first).to_contain_text("Keeps every handle where it is")
    snap(page, tmp_path, "ui-plugin-params")

    upload(page, EXAMPLE)
    click(page, 0.3, 0.3, "click its target")
    click(page, 0.5, 0.4, "Pairs: 1:")
    fast(page)
    set_param(page, "tracker", "probe_window", 7)
    run_and_wait(page, settings)
    run = latest_run(settings)
    assert run["config"]["tracker"] == "ui-probe" and run["config"]["tracker_params"]["probe_window"] == 7
