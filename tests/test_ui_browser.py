"""The drag editor driven in a real browser: headless system Chromium through Playwright (no browser
is downloaded; without Chromium these tests skip and say why). One server per module, on 127.0.0.1,
with the tiny random model and a test plugin's tracker registered."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
from pathlib import Path

import attrs
import numpy as np
import pytest

from gooddrag.core.config import LoadOptions
from attrs.validators import ge, in_, le
from PIL import Image

from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import p
from gooddrag.core.registry import Registry, make_plugin_manager

CHROMIUM = os.environ.get("GOODDRAG_CHROMIUM") or next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium to drive (Debian: apt-get install "
                                                "chromium; or set GOODDRAG_CHROMIUM)"),
    # Known flake, also on older commits: about one run in three, a Run click after a parameter
    # change starts no edit (a stack dump at the timeout shows no edit thread and an idle queue), and
    # the test waits out its 90 s. Not yet explained; a rerun of the test passes.
    pytest.mark.flaky(reruns=2, only_rerun=["AssertionError"]),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
pytest.importorskip("gradio", reason="gradio (the ui extra) is not installed")
expect = sync_api.expect

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
WAIT_MS = 90_000  # an upper bound for one tiny edit on a busy CPU; the tests wait for elements, not time
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


class ProbePlugin:
    @hookimpl
    def gooddrag_register_trackers(self):
        return [ProbeTracker]


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
    pm.register(ProbePlugin(), name="ui-test-plugin")
    registry = Registry(pm)
    pool = EditorPool(registry)
    load = LoadOptions(model="tiny-random", device="cpu")
    pool.adopt(tiny_backbone, load)
    settings = UiSettings(load=load, lora="off", width=32, out=root / "runs",
                          samples=root / "samples")
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
    """A full-page screenshot in the test's folder (and in $GOODDRAG_UI_SCREENSHOTS when set)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS) / name)
    return path


def upload(page, path: Path) -> None:
    page.locator("#input-editor input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#points-view img")


def brush(page) -> None:
    """One stroke across the middle of the image editor's canvas."""
    box = page.locator("#input-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy)
    page.mouse.down()
    for i in range(25):
        page.mouse.move(cx - 60 + 5 * i, cy + 3 * (i % 2))
    page.mouse.up()


def click(page, fx: float, fy: float, expect_text: str) -> None:
    """Click the points view at a fraction of its size and wait until the page lists the point."""
    img = page.locator("#points-view img")
    box = img.bounding_box()
    img.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
    expect(page.locator("#points-list")).to_contain_text(expect_text)


def set_param(page, kind: str, field: str, value) -> None:
    box = page.locator(f"#param-{kind}-{field} input").first
    box.fill(str(value))
    box.press("Tab")


def download(page, name: str):
    """The download link of one output file."""
    return page.locator(f'#downloads a[href$="/{name}"]')


def run_and_wait(page) -> None:
    page.locator("#run").click()
    expect(download(page, "run.json")).to_be_visible()


def latest_run(settings) -> dict:
    runs = sorted(settings.out.glob("*/run.json"), key=lambda q: q.stat().st_mtime)
    return json.loads(runs[-1].read_text())


def fast(page) -> None:
    """Few steps, so the tiny model edits in seconds."""
    set_param(page, "schedule", "num_inference_steps", 10)
    set_param(page, "schedule", "drag_timesteps", 2)


def test_edit_in_the_browser(page, server, tmp_path):
    _, settings = server
    upload(page, EXAMPLE)
    brush(page)
    click(page, 0.35, 0.45, "click its target")
    click(page, 0.6, 0.5, "Pairs: 1:")
    expect(page.locator("#points-list")).not_to_contain_text("click its target")
    fast(page)
    set_param(page, "schedule", "drags_per_timestep", 3)  # the parameter run.json must record
    snap(page, tmp_path, "ui-before-run.png")
    run_and_wait(page)
    snap(page, tmp_path, "ui-result.png")

    run = latest_run(settings)
    assert run["config"]["schedule_params"]["drags_per_timestep"] == 3
    assert run["config"]["model"] == "tiny-random" and run["lora"] == "off"
    assert run["input"]["mask"] == "brushed" and len(run["input"]["points"]) == 2
    final = run["final_handles_xy"][0]
    expect(page.locator("#status")).to_contain_text(f"final handles ({final[0]}, {final[1]})")
    # the result shown in the page is the result with the final handle drawn (a green ring) on it
    src = page.locator("#result img").get_attribute("src")
    shown = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(int)
    x, y = final
    near = shown[max(0, y - 12):y + 13, max(0, x - 12):x + 13].reshape(-1, 3)
    assert (np.abs(near - (40, 220, 40)).sum(1) == 0).any()
    for name in ("result.png", "points.png", "run.json", "drag.gif"):
        expect(download(page, name)).to_be_visible()
    expect(page.locator("#compare img").first).to_be_visible()

    page.locator("#drag-again").click()  # multi-round editing: the result is the next input
    expect(page.locator("#status")).to_contain_text("The result is the new input")
    expect(page.locator("#points-list")).to_have_text("No points yet.")
    click(page, 0.2, 0.2, "click its target")
    click(page, 0.3, 0.3, "Pairs: 1:")
    page.get_by_text("Save the input as a benchmark sample").click()
    page.locator("#sample-name textarea, #sample-name input").first.fill("cat_1")
    page.locator("#save-sample").click()
    expect(page.locator("#status")).to_contain_text("Saved the input as Drag100 sample")
    from gooddrag.plugins.datasets.drag100 import Drag100

    sample = Drag100.load(settings.samples / "cat_1")
    result = Image.open(sorted(settings.out.glob("*/result.png"), key=lambda q: q.stat().st_mtime)[-1])
    assert np.array_equal(np.asarray(sample.image), np.asarray(result.convert("RGB")))  # the new input
    assert sample.mask.any() and not sample.mask.all() and len(sample.pairs) == 1  # the brushed mask was kept


def test_bad_input_shows_a_message_and_the_next_edit_works(page, server, tmp_path):
    _, settings = server
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    with page.expect_file_chooser() as chooser:
        page.locator("#open-image").click()
    chooser.value.set_files(str(notes))
    expect(page.get_by_text("'notes.png' is not a readable image").first).to_be_visible()

    upload(page, EXAMPLE)
    click(page, 0.3, 0.3, "click its target")
    page.locator("#run").click()
    expect(page.get_by_text("1 point, an odd number").first).to_be_visible()
    snap(page, tmp_path, "ui-bad-input.png")

    click(page, 0.5, 0.4, "Pairs: 1:")
    fast(page)
    before = len(list(settings.out.glob("*/run.json")))
    run_and_wait(page)
    assert len(list(settings.out.glob("*/run.json"))) == before + 1
    expect(page.locator("#result img")).to_be_visible()


def test_a_plugin_component_gets_its_controls(page, server, tmp_path):
    _, settings = server
    expect(page.locator("#param-tracker-probe_window")).to_be_hidden()  # another tracker is selected
    dropdown = page.locator("#pick-tracker input")
    dropdown.click()
    page.get_by_role("option", name="ui-probe").click()
    window = page.locator("#param-tracker-probe_window")
    expect(window).to_be_visible()
    expect(window).to_contain_text("search window of the probe tracker")
    expect(page.locator("#param-tracker-probe_metric")).to_contain_text("distance the probe would use")
    expect(page.locator("#params-tracker-ui-probe").first).to_contain_text("Keeps every handle where it is")
    snap(page, tmp_path, "ui-plugin-params.png")

    upload(page, EXAMPLE)
    click(page, 0.3, 0.3, "click its target")
    click(page, 0.5, 0.4, "Pairs: 1:")
    fast(page)
    set_param(page, "tracker", "probe_window", 7)
    run_and_wait(page)
    run = latest_run(settings)
    assert run["config"]["tracker"] == "ui-probe" and run["config"]["tracker_params"]["probe_window"] == 7
