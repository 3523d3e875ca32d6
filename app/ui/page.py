"""The drag editor page (gradio Blocks), built panel by panel: header, input (open + brush), points
(drawn and kept in the browser, see points.py), result and compare, the action bar (Preview, Run,
Cancel, Drag again) with one progress bar per phase, downloads, then the method, LoRA, run and
sample settings. ``build_page`` lays the panels out and wires their events."""

from __future__ import annotations

import ipaddress
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import gradio as gr
from PIL import Image

from gooddrag.app.ui import work
from gooddrag.app.ui.controls import ParamControls
from gooddrag.app.ui.points import (compare_component, compare_update, parse_points, points_component,
                                    points_update, result_component, result_update)
from gooddrag.app.ui.security import check_lora_path
from gooddrag.core.config import LORA_PATH_FIELDS, STRATEGY_KINDS, LoadOptions, resolve_config
from gooddrag.core.errors import BadInputError, GoodDragError
from gooddrag.core.inputs import prepare_input
from gooddrag.core.lora import LoraParams
from gooddrag.core.registry import Registry

LORA_MODES = ["auto", "off", "path"]
MASK_COLOR = "rgba(34, 197, 94, 0.55)"  # translucent: the image stays visible under the brushed region
IMAGE_HEIGHT = 380
PREVIEW_PRESET = "instant"  # what the Preview button runs (a fast preset; the button is off without it)
UPDATE_EVERY_S = 0.25  # at most this often a progress update goes to the page (phase changes at once)

#: page CSS (passed to launch): the action bar stays in view while the panels scroll, and the
#: progress bars are labelled rows
CSS = """
#actions { position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
           border-top: 1px solid var(--border-color-primary); padding: 6px 0; }
.gd-progress { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 4px 12px; }
.gd-phase { display: flex; flex-direction: column; font-size: 13px; }
.gd-phase progress { width: 100%; height: 10px; }
.gd-phase.gd-waiting, .gd-phase.gd-skipped { opacity: 0.55; }
.gd-phase.gd-running .gd-phase-label { font-weight: 600; }
#warnings { color: #b45309; }
@media (max-width: 900px) { #input-editor { max-height: 320px; } }
"""


@attrs.frozen(kw_only=True)
class UiSettings:
    """What `gooddrag ui` was started with: the model (loaded once), defaults and folders."""

    load: LoadOptions  # the editor pool's key
    width: int = 512
    lora: str = "auto"
    preset: str = "gooddrag"
    out: Path = attrs.field(converter=Path)
    samples: Path = attrs.field(converter=Path)
    #: the only folders the LoRA path field may read (app/ui/security.py), besides the --lora given at start
    lora_dirs: tuple[Path, ...] = attrs.field(default=(), converter=lambda v: tuple(Path(x) for x in v))


def _doc(comp: Any) -> str:
    lines = (comp.__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""


class _Lora:
    """The per-image LoRA settings, shown with the same generated controls as the components."""

    name = "lora"
    Params = LoraParams


def _xy(p: Any) -> str:
    return f"({p[0]:g}, {p[1]:g})"


# ---- what the header says -------------------------------------------------------------------------


def device_words(device: str) -> str:
    """The device the edits run on, named (``auto`` resolved: ``cpu`` or ``cuda:0 (GPU 0, H100 ...)``)."""
    from gooddrag.core.devices import describe_device, resolve_device

    try:
        return describe_device(resolve_device(device))
    except GoodDragError:
        return device


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_warnings(settings: UiSettings, host: str, device: str) -> list[str]:
    """What the person at the page should know before the first Run: a server reachable from
    other machines, and defaults that take many minutes on a CPU."""
    out = []
    if not is_loopback(host):
        out.append(f"Served on {host}, not only on this machine: anyone who can reach this address can use the "
                   "editor and its compute (no login). Use --host 127.0.0.1 unless that is what you want.")
    if device.startswith("cpu") and settings.load.model != "tiny-random" and (settings.lora == "auto" or settings.width > 256):
        out.append("Running on the CPU: with LoRA auto (training on each new image) and a working width of "
                   f"{settings.width}, one edit takes many minutes. For a quick look use Preview, LoRA off or a "
                   "width of 256.")
    return out


# ---- panels -------------------------------------------------------------------------------------


@attrs.define
class Panels:
    """The page's components, by panel (filled in by the panel functions)."""

    image_state: Any = None
    token: Any = None
    result_state: Any = None
    reuse_state: Any = None
    opener: Any = None
    gen_prompt: Any = None
    gen_seed: Any = None
    gen_steps: Any = None
    gen_guidance: Any = None
    gen_btn: Any = None
    editor: Any = None
    points: Any = None
    result_view: Any = None
    compare: Any = None
    preview_btn: Any = None
    run_btn: Any = None
    cancel_btn: Any = None
    again_btn: Any = None
    progress: Any = None
    status: Any = None
    files: Any = None
    preset_dd: Any = None
    pickers: dict = attrs.Factory(dict)
    groups: dict = attrs.Factory(dict)
    controls: list = attrs.Factory(list)
    lora_mode: Any = None
    lora_path: Any = None
    lora_pc: Any = None
    width: Any = None
    seed: Any = None
    prompt: Any = None
    previews: Any = None
    sample_name: Any = None
    save_btn: Any = None


def header_panel(settings: UiSettings, device: str, warnings_: list[str]) -> None:
    gr.Markdown(f"## gooddrag: drag editing\nModel `{settings.load.model}` on **{device}** ({settings.load.dtype}). "
                "Open an image, brush the region that may change (optional), click a handle then its target "
                "(repeat for more pairs), then Preview or Run.", elem_id="header")
    if warnings_:
        gr.Markdown("\n".join(f"- ⚠ {w}" for w in warnings_), elem_id="warnings")


def input_panels(ui: Panels) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            ui.opener = gr.UploadButton("Open an image file", type="filepath", size="sm", elem_id="open-image")
            with gr.Accordion("...or generate one from a prompt (dragged without inversion)", open=False,
                              elem_id="generate-section"):
                ui.gen_prompt = gr.Textbox("", label="prompt", placeholder="e.g. a photo of a cat on a sofa",
                                           elem_id="gen-prompt")
                with gr.Row():
                    ui.gen_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="gen-seed", min_width=80)
                    ui.gen_steps = gr.Number(50, label="steps", precision=0, minimum=1, elem_id="gen-steps",
                                             info="the drag uses the same", min_width=80)
                    ui.gen_guidance = gr.Number(7.5, label="guidance", minimum=1, elem_id="gen-guidance", min_width=80)
                ui.gen_btn = gr.Button("Generate", size="sm", elem_id="generate")
            ui.editor = gr.ImageEditor(
                label="1. Editable region (brush; erase; nothing painted = whole image)",
                type="numpy", image_mode="RGBA", format="png", sources=[], transforms=[], layers=False,
                elem_id="input-editor", height=IMAGE_HEIGHT + 60, buttons=[],
                brush=gr.Brush(colors=[MASK_COLOR], default_color=MASK_COLOR, color_mode="fixed"),
                eraser=gr.Eraser())
        with gr.Column(min_width=300):
            gr.Markdown("**2. Points**: click a handle (red), then its target (blue); the fixed region is dimmed")
            ui.points = points_component(elem_id="points-view")
        with gr.Column(min_width=300):
            gr.Markdown("**3. Result** (live while dragging; yellow/black rings = final handles)")
            ui.result_view = result_component(elem_id="result")
            ui.compare = compare_component(elem_id="compare")


def action_panel(ui: Panels, registry: Registry) -> None:
    has_preview = PREVIEW_PRESET in registry.names("preset")
    with gr.Column(elem_id="actions"):
        with gr.Row():
            ui.preview_btn = gr.Button("Preview (fast)", elem_id="preview", interactive=has_preview)
            ui.run_btn = gr.Button("Run", variant="primary", elem_id="run")
            ui.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            ui.again_btn = gr.Button("Drag again (result becomes the input)", elem_id="drag-again")
        if not has_preview:
            gr.Markdown(f"Preview needs the `{PREVIEW_PRESET}` preset, which is not installed in this version.",
                        elem_id="preview-note")
        ui.progress = gr.HTML(work.EditProgress().html(), elem_id="progress")
        ui.status = gr.Markdown("Starting...", elem_id="status", min_height=30)
    ui.files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads", height=120)


def method_panel(ui: Panels, settings: UiSettings, registry: Registry) -> None:
    preset0 = registry.get("preset", settings.preset)
    with gr.Accordion("Method and parameters", open=False):
        with gr.Row():
            ui.preset_dd = gr.Dropdown(registry.names("preset"), value=settings.preset, label="preset",
                                       info=preset0.doc, elem_id="preset")
            ui.pickers = {kind: gr.Dropdown(registry.names(kind), value=getattr(preset0, kind), label=kind,
                                            elem_id=f"pick-{kind}") for kind in STRATEGY_KINDS}
        ui.groups = {k: [] for k in STRATEGY_KINDS}
        for kind in STRATEGY_KINDS:
            for name, comp in registry.items(kind):
                shown = name == getattr(preset0, kind)
                with gr.Group(visible=shown, elem_id=f"params-{kind}-{name}") as group:
                    gr.Markdown(f"**{kind} `{name}`** ({registry.owner(kind, name)}): {_doc(comp)}")
                    with gr.Row():
                        pc = ParamControls(kind, comp, preset0)
                ui.groups[kind].append((name, group))
                ui.controls.append((kind, name, pc))
    with gr.Accordion(f"LoRA: {settings.lora} (per image; trained once, then cached on disk)", open=False):
        with gr.Row():
            ui.lora_mode = gr.Radio(LORA_MODES, value=settings.lora if settings.lora in ("auto", "off") else "path",
                                    label="LoRA", info="auto: train or reuse the cached one; off; path: a LoRA file/folder",
                                    elem_id="lora-mode")
            ui.lora_path = gr.Textbox(value="" if settings.lora in ("auto", "off") else settings.lora,
                                      label="LoRA path", elem_id="lora-path")
        with gr.Row():
            ui.lora_pc = ParamControls("lora", _Lora, preset0)
    with gr.Accordion(f"Run settings: working width {settings.width}", open=False):
        with gr.Row():
            ui.width = gr.Number(settings.width, label="working width", precision=0, minimum=16, step=8,
                                 info="multiple of 8; the method uses 512", elem_id="width")
            ui.seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
            ui.prompt = gr.Textbox("", label="prompt", info="the method uses the empty prompt", elem_id="prompt")
            ui.previews = gr.Checkbox(True, label="live previews and animation",
                                      info="one extra UNet pass and a decode per drag", elem_id="previews")


def sample_panel(ui: Panels) -> None:
    with gr.Accordion("Save the input as a benchmark sample (Drag100 folder format)", open=False):
        with gr.Row():
            ui.sample_name = gr.Textbox("", label="sample name", placeholder="e.g. cat_1",
                                        info="written to the server's samples folder as <name>/",
                                        elem_id="sample-name")
            ui.save_btn = gr.Button("Save as sample", elem_id="save-sample")


# ---- the page -------------------------------------------------------------------------------------


def build_page(settings: UiSettings, registry: Registry, pool: work.EditorPool, host: str = "127.0.0.1") -> gr.Blocks:
    """The whole page; every registered schedule, loss and tracker gets a group of controls generated
    from its Params, shown while it is selected."""
    device = device_words(settings.load.device)
    ui = Panels()
    with gr.Blocks(title="gooddrag", analytics_enabled=False) as page:
        ui.image_state = gr.State(None)  # the input image (PIL RGB) at its original size
        ui.result_state = gr.State(None)  # the last result: {"image": PIL, "lora": path or None}
        ui.reuse_state = gr.State(None)  # what the next edit reuses (after Drag again)
        ui.token = gr.State(None)  # this page's id: Cancel stops the edits this page started
        header_panel(settings, device, start_warnings(settings, host, device))
        input_panels(ui)
        action_panel(ui, registry)
        method_panel(ui, settings, registry)
        sample_panel(ui)
        _wire_inputs(ui)
        _wire_method(ui, registry)
        _wire_run(ui, settings, registry, pool)
        _wire_sample(ui, settings)
        page.load(lambda: ("Ready.", uuid.uuid4().hex), None, [ui.status, ui.token],
                  show_progress="hidden")  # the page's events are connected
    return page


def _show(image: Image.Image | None, ed: dict | None) -> Image.Image | None:
    """The picture of the point editor: the image, the fixed region dimmed."""
    if image is None:
        return None
    mask = work.mask_from_layers((ed or {}).get("layers"), image.size)
    return image if mask is None else work.draw_clicks(image, [], mask)


def _wire_inputs(ui: Panels) -> None:
    def on_open(path: str | None):
        """Any file may be picked; what is not a (sane) image gets a message and changes nothing."""
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            image = work.open_image(path)
        except GoodDragError as exc:
            msg = work.one_line(exc)
            gr.Warning(msg)
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                    f"**{msg}** The current image, mask and points are kept.")
        value = {"background": image, "layers": [], "composite": None}
        return (value, image, points_update(image), None,
                f"Opened {Path(path).name} ({image.size[0]}x{image.size[1]}): click a handle, then its target.")

    ui.opener.upload(on_open, ui.opener, [ui.editor, ui.image_state, ui.points, ui.reuse_state, ui.status],
                     show_progress="hidden")

    def on_brush(image, ed):
        """The brushed layer changed: the point editor shows the new fixed region (points kept)."""
        if image is None or (ed or {}).get("background") is None:
            return gr.skip()
        return points_update(image, _show(image, ed), keep_points=True)

    ui.editor.change(on_brush, [ui.image_state, ui.editor], ui.points, show_progress="hidden")


def _wire_method(ui: Panels, registry: Registry) -> None:
    for kind in STRATEGY_KINDS:
        names = [n for n, _ in ui.groups[kind]]
        ui.pickers[kind].change(lambda chosen, names=names: [gr.Group(visible=n == chosen) for n in names],
                                ui.pickers[kind], [g for _, g in ui.groups[kind]], show_progress="hidden")

    all_controls = [c for _, _, pc in ui.controls for c in pc.controls] + ui.lora_pc.controls

    def on_preset(name: str):
        pre = registry.get("preset", name)
        values = [v for _, _, pc in ui.controls for v in pc.values_for(pre)] + ui.lora_pc.values_for(pre)
        return [gr.Dropdown(info=pre.doc)] + [getattr(pre, k) for k in STRATEGY_KINDS] + values

    ui.preset_dd.input(on_preset, ui.preset_dd, [ui.preset_dd, *ui.pickers.values(), *all_controls],
                       show_progress="hidden")


def _options(ui: Panels, settings: UiSettings, registry: Registry, preset, schedule, loss, tracker, mode, path,
             width_, seed_, prompt_, values, reuse) -> tuple[dict, str, Any]:
    """The edit's options from the controls (every config error raised here, before the model loads),
    and what it reuses, in words."""
    chosen = {"schedule": schedule, "loss": loss, "tracker": tracker}
    overrides: dict[str, dict] = {}
    i = 0
    for kind, name, pc in ui.controls:
        vals = values[i:i + len(pc.controls)]
        i += len(pc.controls)
        if chosen[kind] == name:
            overrides[kind] = pc.overrides(list(vals))
    lora = (path or "").strip() if mode == "path" else mode
    # the page sends every LoRA control: pass on only those that apply, so the log stays quiet
    overrides["lora"] = {k: v for k, v in ui.lora_pc.overrides(list(values[i:])).items()
                         if mode == "auto" or (mode == "path" and k in LORA_PATH_FIELDS)}
    if mode == "path" and not lora:
        raise BadInputError("LoRA 'path' is selected but no path is given; type one or pick auto/off")
    if mode == "path":
        lora = check_lora_path(lora, [*settings.lora_dirs, *([settings.lora] if settings.lora not in
                                                             ("auto", "off") else [])])
    reused = []
    if reuse and reuse.get("lora") and mode == "auto":
        lora = reuse["lora"]
        reused.append("the LoRA of the previous round (no training)")
    start = (reuse or {}).get("start")
    if start is not None:  # a generated image: its sampler and size are the drag's
        overrides.setdefault("schedule", {})["num_inference_steps"] = start.num_steps
        width_ = start.info.get("width", width_)
        reused.append("the generation's latents (no inversion)")
    options = dict(preset=preset, schedule=schedule, loss=loss, tracker=tracker, overrides=overrides,
                   lora=lora, prompt=prompt_ or "", seed=int(seed_ or 0), width=int(width_ or 0))
    cfg = resolve_config(registry, preset=preset, schedule=schedule, loss=loss, tracker=tracker, overrides=overrides,
                         load=settings.load, lora=lora, seed=options["seed"], width=options["width"])
    return options, "; ".join(reused), cfg


def _wire_run(ui: Panels, settings: UiSettings, registry: Registry, pool: work.EditorPool) -> None:
    cancels: dict[str, set[threading.Event]] = {}
    all_controls = [c for _, _, pc in ui.controls for c in pc.controls] + ui.lora_pc.controls
    outputs = [ui.progress, ui.status, ui.result_view, ui.compare, ui.result_state, ui.files]
    idle = work.EditProgress().html()

    def failed(msg: str, progress_html: str | None = None) -> dict:
        gr.Warning(msg)
        return {ui.status: f"**Error:** {msg}", ui.progress: progress_html or idle}

    def edit(image, points_value, ed, preset, schedule, loss, tracker, mode, path, width_, seed_, prompt_,
             previews_, reuse, values, token, label: str):
        if image is None:
            yield failed("no image: open one first")
            return
        start = (reuse or {}).get("start")
        if start is not None:  # a generated image is dragged at its own size
            width_ = start.info.get("width", width_)
        try:
            points = parse_points(points_value)
            pairs = work.pairs_from_clicks(points)
            inp = prepare_input(image, pairs, work.mask_from_layers((ed or {}).get("layers"), image.size),
                                width=int(width_ or 0))
            options, reused, cfg = _options(ui, settings, registry, preset, schedule, loss, tracker, mode, path,
                                            width_, seed_, prompt_, values, reuse)
        except GoodDragError as exc:
            yield failed(work.one_line(exc))
            return
        session = token or "local"
        cancel = threading.Event()
        cancels.setdefault(session, set()).add(cancel)
        lora_kind = "off" if cfg.lora == "off" else "auto" if cfg.lora == "auto" else "path"
        if start is not None:
            lora_kind = "off"  # the generation's latents belong to the model without a LoRA
        progress = work.EditProgress(lora_mode=lora_kind, drag_budget=work.max_gradient_steps(cfg.schedule_params),
                                     inversion_note="skipped: the generation's latents" if start is not None else "")
        try:
            if not pool.loaded(settings.load):
                yield {ui.status: f"Loading `{settings.load.model}` (once per server)...", ui.progress: progress.html()}
            try:
                editor_ = pool.get(settings.load)
            except Exception as exc:
                yield failed(work.one_line(exc))
                return
            yield {ui.status: f"{label}: starting" + (f" (reusing {reused})" if reused else ""),
                   ui.progress: progress.html(), ui.result_view: result_update(None), ui.files: None}
            last = 0.0
            for ev in work.run_edit(editor_, inp, cfg, options["prompt"], cancel, previews=bool(previews_),
                                    start_latents=(reuse or {}).get("start"),
                                    label=f"{label.lower()} from another tab", progress=progress):
                kind = ev[0]
                if kind == "queued":
                    yield {ui.status: f"Queued: waiting for the device, behind {ev[1]}.", ui.progress: progress.html()}
                elif kind == "error":
                    if isinstance(ev[1], work.EditCancelled):
                        yield {ui.status: "Cancelled; nothing was written. Ready.", ui.progress: idle}
                    else:
                        yield failed(work.one_line(ev[1]), progress.html())
                    return
                elif kind == "done":
                    yield _finished(ui, settings, image, inp, points, ev[1], ev[2], progress, label, reused,
                                    generated=start is not None)
                    return
                elif kind == "preview" or kind == "phase" or time.monotonic() - last >= UPDATE_EVERY_S:
                    last = time.monotonic()
                    out = {ui.status: f"{label}: {progress.line()}", ui.progress: progress.html()}
                    if kind == "preview":
                        out[ui.result_view] = result_update(ev[3])
                    yield out
        finally:
            cancels.get(session, set()).discard(cancel)

    def run(image, points_value, ed, preset, schedule, loss, tracker, mode, path, width_, seed_, prompt_, previews_,
            reuse, token, *values):
        yield from edit(image, points_value, ed, preset, schedule, loss, tracker, mode, path, width_, seed_, prompt_,
                        previews_, reuse, values, token, "Run")

    def preview(image, points_value, ed, mode, path, width_, seed_, prompt_, previews_, reuse, token):
        pre = registry.get("preset", PREVIEW_PRESET)
        values = [v for _, _, pc in ui.controls for v in pc.values_for(pre)] + ui.lora_pc.values_for(pre)
        yield from edit(image, points_value, ed, PREVIEW_PRESET, pre.schedule, pre.loss, pre.tracker, mode, path,
                        width_, seed_, prompt_, previews_, reuse, values, token, "Preview")

    common = dict(show_progress="hidden", concurrency_limit=8, trigger_mode="multiple", api_visibility="private")
    ui.run_btn.click(
        run, [ui.image_state, ui.points, ui.editor, ui.preset_dd, *ui.pickers.values(), ui.lora_mode, ui.lora_path,
              ui.width, ui.seed, ui.prompt, ui.previews, ui.reuse_state, ui.token, *all_controls], outputs, **common)
    ui.preview_btn.click(
        preview, [ui.image_state, ui.points, ui.editor, ui.lora_mode, ui.lora_path, ui.width, ui.seed, ui.prompt,
                  ui.previews, ui.reuse_state, ui.token], outputs, **common)

    def on_cancel(token):
        events = cancels.get(token or "local", set())
        for ev in list(events):
            ev.set()
        if not events:
            return "Nothing to cancel. Ready.", idle
        return "Cancelling...", gr.skip()

    # no gradio ``cancels=``: killing the stream leaves an "Error" pill on its outputs; the edit's own
    # stream sees the flag, says "Cancelled" and ends (its worker stops at its next step)
    ui.cancel_btn.click(on_cancel, ui.token, [ui.status, ui.progress], concurrency_limit=None, trigger_mode="multiple",
                        show_progress="hidden")

    def on_again(result, ed):
        if result is None:
            yield {ui.status: "**Error:** no result yet: run an edit first"}
            return
        image = result["image"]
        layers = (ed or {}).get("layers") or []
        reuse = {"lora": result.get("lora")}
        kept = "the brushed region" + (" and the LoRA of this round (no training)" if reuse["lora"] else "")
        yield {ui.image_state: image, ui.reuse_state: reuse,
               ui.editor: {"background": image, "layers": layers, "composite": None},
               ui.points: points_update(image, _show(image, ed)),
               ui.status: f"Drag again: the result is the new input; kept {kept}. Click new points and Run."}

    def on_generate(prompt_, seed_, steps_, guidance_, width_):
        """An image from the prompt, its latents kept: Run drags it from them (no inversion)."""
        prompt_ = (prompt_ or "").strip()
        if not prompt_:
            yield {ui.status: "**Error:** type a prompt to generate an image"}
            return
        width_ = int(width_ or 0)
        if width_ % 8 or width_ < 16:
            yield {ui.status: f"**Error:** working width {width_}: give a multiple of 8, at least 16 (Run settings)"}
            return
        if not pool.loaded(settings.load):
            yield {ui.status: f"Loading `{settings.load.model}` (once per server)..."}
        yield {ui.status: f"Generating ({int(steps_ or 50)} steps)..."}
        try:
            editor_ = pool.get(settings.load)
            image, latents = editor_.generate(prompt_, seed=int(seed_ or 0), steps=int(steps_ or 50),
                                              guidance=float(guidance_ or 1.0), width=width_, height=width_)
        except Exception as exc:
            yield {ui.status: f"**Error:** {work.one_line(exc)}"}
            return
        yield {ui.image_state: image, ui.reuse_state: {"start": latents},
               ui.editor: {"background": image, "layers": [], "composite": None},
               ui.points: points_update(image), ui.prompt: prompt_,
               ui.status: (f"Generated {image.size[0]}x{image.size[1]} from the prompt; its latents are kept, so the "
                           "drag starts from them (no inversion). Click a handle, then its target.")}

    ui.gen_btn.click(on_generate, [ui.gen_prompt, ui.gen_seed, ui.gen_steps, ui.gen_guidance, ui.width],
                     [ui.image_state, ui.reuse_state, ui.editor, ui.points, ui.prompt, ui.status],
                     show_progress="hidden", concurrency_limit=1, api_visibility="private")

    ui.again_btn.click(on_again, [ui.result_state, ui.editor],
                       [ui.image_state, ui.reuse_state, ui.editor, ui.points, ui.status], show_progress="hidden")


def _lora_folder(status: str) -> str | None:
    """The LoRA folder an edit used (``trained <folder>`` / ``cached <folder>``), reusable next round."""
    for prefix in ("trained ", "cached ", "loaded "):
        if status.startswith(prefix) and status != "trained (not cached)":
            return status[len(prefix):]
    return None


def _finished(ui: Panels, settings: UiSettings, image, inp, points, result, frames, progress, label, reused,
              generated: bool = False) -> dict:
    result.report["input"] = {"image": "generated in gooddrag ui" if generated else "uploaded in gooddrag ui",
                              "mask": "brushed" if inp.mask is not None else None, "points": points}
    paths = work.write_outputs(work.new_run_dir(settings.out), inp, result, frames)
    r = result.report
    lora = r["lora"] if not str(r["lora"]).startswith(("trained /", "cached /", "loaded /")) \
        else str(r["lora"]).split(" ", 1)[0]
    reuse_note = f" Reused {reused}." if reused else ""
    return {ui.result_view: result_update(work.draw_clicks(result.image, [p for pair in inp.pairs for p in pair],
                                                           finals=result.points), final=True),
            ui.compare: compare_update(image, result.image),
            ui.result_state: {"image": result.image, "lora": _lora_folder(str(r["lora"]))},
            ui.files: [str(p) for p in paths], ui.progress: progress.html(),
            ui.status: (f"{label} done: {r['stop_reason']} after {r['gradient_steps']} gradient steps; final handles "
                        f"{', '.join(map(_xy, result.points))} (targets {', '.join(_xy(t) for _, t in inp.pairs)}); "
                        f"LoRA {lora}; {sum(r['timings_s'].values()):.1f} s.{reuse_note}")}


def _wire_sample(ui: Panels, settings: UiSettings) -> None:
    def on_save(image, points_value, ed, name):
        if image is None:
            return "**Error:** no image: open one first"
        try:
            folder = work.save_sample(settings.samples, name, image, work.pairs_from_clicks(parse_points(points_value)),
                                      work.mask_from_layers((ed or {}).get("layers"), image.size))
        except GoodDragError as exc:
            return f"**Error:** {work.one_line(exc).replace(str(settings.samples), 'the samples folder')}"
        return f"Saved the input as Drag100 sample `{folder.name}` in the samples folder."

    ui.save_btn.click(on_save, [ui.image_state, ui.points, ui.editor, ui.sample_name], ui.status,
                      show_progress="hidden")
