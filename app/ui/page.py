"""The drag editor page (gradio Blocks): upload and brush, click points, choose the method and its
parameters, run with live progress and previews, compare, download, drag again, save as sample."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import attrs
import gradio as gr
import numpy as np
from PIL import Image

from gooddrag.app.ui import work
from gooddrag.app.ui.controls import ParamControls
from gooddrag.app.ui.security import check_lora_path
from gooddrag.core.config import LORA_PATH_FIELDS, STRATEGY_KINDS, LoadOptions, resolve_config
from gooddrag.core.lora import LoraParams
from gooddrag.core.errors import GoodDragError
from gooddrag.core.hookspecs import PHASES
from gooddrag.core.inputs import prepare_input
from gooddrag.core.registry import Registry

LORA_MODES = ["auto", "off", "path"]
MASK_COLOR = "rgba(34, 197, 94, 0.55)"  # translucent: the image stays visible under the brushed region
IMAGE_HEIGHT = 380


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


def build_page(settings: UiSettings, registry: Registry, pool: work.EditorPool) -> gr.Blocks:
    """The whole page; every registered schedule, loss and tracker gets a group of controls generated
    from its Params, shown while it is selected."""
    cancels: dict[str, threading.Event] = {}
    preset0 = registry.get("preset", settings.preset)

    with gr.Blocks(title="gooddrag", analytics_enabled=False) as page:
        gr.Markdown(f"## gooddrag: drag editing\nModel `{settings.load.model}` on `{settings.load.device}` ({settings.load.dtype}). "
                    "1. upload an image and (optionally) brush the region that may change; 2. click a handle, "
                    "then its target (repeat for more pairs); 3. Run.")
        image_state = gr.State(None)  # the input image (PIL RGB) at its original size
        points_state = gr.State([])  # clicked [x, y] in image px: handle, target, handle, ...
        result_state = gr.State(None)  # the last result (PIL), for "drag again"
        with gr.Row(equal_height=False):
            with gr.Column():
                editor = gr.ImageEditor(
                    label="1. Image and editable region (brush; erase; nothing painted = whole image)",
                    type="numpy", image_mode="RGBA", format="png", sources=["upload", "clipboard"],
                    transforms=[], layers=False, elem_id="input-editor", height=IMAGE_HEIGHT + 60,
                    brush=gr.Brush(colors=[MASK_COLOR], default_color=MASK_COLOR, color_mode="fixed"),
                    eraser=gr.Eraser())
                opener = gr.UploadButton("Open an image file", type="filepath", size="sm", elem_id="open-image")
            with gr.Column():
                view = gr.Image(label="2. Click handle (red), then target (blue)", type="pil", format="png",
                                interactive=False, elem_id="points-view", buttons=[],
                                height=IMAGE_HEIGHT)
                with gr.Row():
                    undo = gr.Button("Undo last point", size="sm", elem_id="undo")
                    clear = gr.Button("Clear points", size="sm", elem_id="clear")
                points_md = gr.Markdown("No points yet.", elem_id="points-list")
            with gr.Column():
                result_view = gr.Image(label="3. Result (live preview while dragging; green = final handles)",
                                       type="pil", format="png", interactive=False, elem_id="result",
                                       height=IMAGE_HEIGHT)
                compare = gr.ImageSlider(label="Compare input | result", type="pil", format="png",
                                         interactive=False, elem_id="compare")
        with gr.Row():
            run_btn = gr.Button("Run", variant="primary", elem_id="run")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            again_btn = gr.Button("Drag again (result becomes the input)", elem_id="drag-again")
        status = gr.Markdown("Starting...", elem_id="status", min_height=40)
        files = gr.File(label="Downloads", file_count="multiple",
                        interactive=False, elem_id="downloads")

        with gr.Accordion("Method and parameters", open=True):
            with gr.Row():
                preset_dd = gr.Dropdown(registry.names("preset"), value=settings.preset, label="preset",
                                        info=preset0.doc, elem_id="preset")
                pickers = {kind: gr.Dropdown(registry.names(kind), value=getattr(preset0, kind), label=kind,
                                             elem_id=f"pick-{kind}") for kind in STRATEGY_KINDS}
            groups: dict[str, list[tuple[str, Any]]] = {k: [] for k in STRATEGY_KINDS}
            controls: list[tuple[str, str, ParamControls]] = []
            for kind in STRATEGY_KINDS:
                for name, comp in registry.items(kind):
                    shown = name == getattr(preset0, kind)
                    with gr.Group(visible=shown, elem_id=f"params-{kind}-{name}") as group:
                        gr.Markdown(f"**{kind} `{name}`** ({registry.owner(kind, name)}): {_doc(comp)}")
                        with gr.Row():
                            pc = ParamControls(kind, comp, preset0)
                    groups[kind].append((name, group))
                    controls.append((kind, name, pc))
        with gr.Accordion("LoRA (per image; trained once, then cached on disk)", open=False):
            with gr.Row():
                lora_mode = gr.Radio(LORA_MODES, value=settings.lora if settings.lora in ("auto", "off") else "path",
                                     label="LoRA", info="auto: train or reuse the cached one; off; path: a LoRA file/folder",
                                     elem_id="lora-mode")
                lora_path = gr.Textbox(value="" if settings.lora in ("auto", "off") else settings.lora,
                                       label="LoRA path", elem_id="lora-path")
            with gr.Row():
                lora_pc = ParamControls("lora", _Lora, preset0)
        with gr.Accordion("Run settings", open=False):
            with gr.Row():
                width = gr.Number(settings.width, label="working width", precision=0, minimum=16, step=8,
                                  info="multiple of 8; the method uses 512", elem_id="width")
                seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                prompt = gr.Textbox("", label="prompt", info="the method uses the empty prompt", elem_id="prompt")
                previews = gr.Checkbox(True, label="live previews and animation",
                                       info="one extra UNet pass and a decode per drag", elem_id="previews")
        with gr.Accordion("Save the input as a benchmark sample (Drag100 folder format)", open=False):
            with gr.Row():
                sample_name = gr.Textbox("", label="sample name", placeholder="e.g. cat_1",
                                         info=f"written to {settings.samples}/<name>/", elem_id="sample-name")
                save_btn = gr.Button("Save as sample", elem_id="save-sample")

        # ---- points and image ------------------------------------------------------------------
        def show(image: Image.Image | None, points: list, ed: dict | None) -> Any:
            if image is None:
                return None
            return work.draw_clicks(image, points, work.mask_from_layers((ed or {}).get("layers"), image.size))

        def describe(points: list) -> str:
            if not points:
                return "No points yet."
            rows = [f"{i // 2 + 1}: {_xy(points[i])} → "
                    + (_xy(points[i + 1]) if i + 1 < len(points) else "(click its target)")
                    for i in range(0, len(points), 2)]
            return "Pairs: " + "; ".join(rows)

        def on_editor(image, points, ed):
            """A background that differs from the current input is a new image (its upload event can
            arrive before the background does, so uploads and changes both come here); otherwise the
            brushed layer changed and the points view shows the new mask."""
            bg = (ed or {}).get("background")
            if bg is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()  # the empty change on page load
            new = Image.fromarray(bg).convert("RGB")
            if image is not None and new.size == image.size and np.array_equal(np.asarray(new), np.asarray(image)):
                return gr.skip(), gr.skip(), show(image, points, ed), gr.skip()
            try:
                new = work.check_image(new)
            except GoodDragError as exc:
                gr.Warning(str(exc))
                return None, [], None, f"**{exc}**"
            return new, [], show(new, [], ed), describe([])

        for trigger in (editor.upload, editor.change):
            trigger(on_editor, [image_state, points_state, editor], [image_state, points_state, view, points_md],
                    show_progress="hidden")

        def on_open(path: str | None):
            """Any file may be picked here; what is not a (sane) image gets a message instead of silence."""
            if not path:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                image = work.open_image(path)
            except GoodDragError as exc:
                gr.Warning(work.one_line(exc))
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"**{work.one_line(exc)}**"
            value = {"background": image, "layers": [], "composite": None}
            return value, image, [], show(image, [], None), describe([])

        opener.upload(on_open, opener, [editor, image_state, points_state, view, points_md])

        def on_click(image, points, ed, evt: gr.SelectData):
            if image is None:
                return gr.skip(), gr.skip(), gr.skip()
            points = [*points, [int(evt.index[0]), int(evt.index[1])]]
            return points, show(image, points, ed), describe(points)

        view.select(on_click, [image_state, points_state, editor], [points_state, view, points_md])
        undo.click(lambda im, pts, ed: (pts[:-1], show(im, pts[:-1], ed), describe(pts[:-1])),
                   [image_state, points_state, editor], [points_state, view, points_md])
        clear.click(lambda im, ed: ([], show(im, [], ed), describe([])),
                    [image_state, editor], [points_state, view, points_md])

        # ---- method choice ---------------------------------------------------------------------
        for kind in STRATEGY_KINDS:
            names = [n for n, _ in groups[kind]]
            pickers[kind].change(lambda chosen, names=names: [gr.Group(visible=n == chosen) for n in names],
                                 pickers[kind], [g for _, g in groups[kind]], show_progress="hidden")

        all_controls = [c for _, _, pc in controls for c in pc.controls] + lora_pc.controls

        def on_preset(name: str):
            pre = registry.get("preset", name)
            values = [v for _, _, pc in controls for v in pc.values_for(pre)] + lora_pc.values_for(pre)
            return [gr.Dropdown(info=pre.doc)] + [getattr(pre, k) for k in STRATEGY_KINDS] + values

        preset_dd.input(on_preset, preset_dd, [preset_dd, *pickers.values(), *all_controls], show_progress="hidden")

        # ---- run ---------------------------------------------------------------------------------
        def run(image, points, ed, preset, schedule, loss, tracker, mode, path, width_, seed_, prompt_, previews_,
                *values, progress=gr.Progress(), request: gr.Request = None):
            if image is None:
                raise gr.Error("no image: upload one first", print_exception=False)
            try:
                pairs = work.pairs_from_clicks(points)
                inp = prepare_input(image, pairs, work.mask_from_layers((ed or {}).get("layers"), image.size),
                                    width=int(width_ or 0))
                chosen = {"schedule": schedule, "loss": loss, "tracker": tracker}
                overrides: dict[str, dict] = {}
                i = 0
                for kind, name, pc in controls:
                    vals = values[i:i + len(pc.controls)]
                    i += len(pc.controls)
                    if chosen[kind] == name:
                        overrides[kind] = pc.overrides(list(vals))
                # the page sends every LoRA control: pass on only those that apply, so the log stays quiet
                overrides["lora"] = {k: v for k, v in lora_pc.overrides(list(values[i:])).items()
                                     if mode == "auto" or (mode == "path" and k in LORA_PATH_FIELDS)}
                lora = (path or "").strip() if mode == "path" else mode
                if mode == "path" and not lora:
                    raise work.BadInputError("LoRA 'path' is selected but no path is given; type one or pick auto/off")
                if mode == "path":
                    lora = check_lora_path(lora, [*settings.lora_dirs, *([settings.lora] if settings.lora not in
                                                                         ("auto", "off") else [])])
                cfg = resolve_config(registry, preset=preset, schedule=schedule, loss=loss, tracker=tracker,
                                     overrides=overrides, load=settings.load, lora=lora, seed=int(seed_ or 0),
                                     width=int(width_ or 0))  # every config error before the model loads
            except GoodDragError as exc:
                raise gr.Error(work.one_line(exc), print_exception=False) from None
            session = getattr(request, "session_hash", None) or "local"
            cancel = cancels[session] = threading.Event()
            if not pool.loaded(settings.load):
                progress(0.0, desc="loading the model (once per server)")
                yield {status: f"Loading `{settings.load.model}` (once per server)..."}
            try:
                editor_ = pool.get(settings.load)
            except Exception as exc:
                raise gr.Error(work.one_line(exc), print_exception=False) from None
            yield {status: "Editing...", result_view: None, files: None}
            done = 0
            for ev in work.run_edit(editor_, inp, cfg, prompt_ or "", cancel, previews=bool(previews_)):
                if ev[0] == "phase" and ev[2] == "start":
                    done = PHASES.index(ev[1]) if ev[1] in PHASES else done
                    label = "LoRA: training or loading the cached one" if ev[1] == "lora" else ev[1]
                    progress(done / len(PHASES), desc=f"{label} ({done + 1}/{len(PHASES)})")
                elif ev[0] == "step":
                    progress(3 / len(PHASES), desc=f"drag: t={ev[1]}, gradient step {ev[2]}")
                elif ev[0] == "preview":
                    yield {result_view: ev[3], status: f"Dragging: t={ev[1]}, drag {ev[2] + 1}"}
                elif ev[0] == "error":
                    raise gr.Error(work.one_line(ev[1]), print_exception=False)
                elif ev[0] == "done":
                    result, animation = ev[1], ev[2]
                    result.report["input"] = {"image": "uploaded in gooddrag ui",
                                              "mask": "brushed" if inp.mask is not None else None, "points": points}
                    paths = work.write_outputs(work.new_run_dir(settings.out), inp, result, animation)
                    r = result.report
                    yield {result_view: work.draw_clicks(result.image, [p for pair in inp.pairs for p in pair],
                                                         finals=result.points),
                           compare: (image, result.image), result_state: result.image,
                           files: [str(p) for p in paths],
                           status: (f"Done: {r['stop_reason']} after {r['gradient_steps']} gradient steps; final handles "
                                    f"{', '.join(map(_xy, result.points))} (targets {', '.join(_xy(t) for _, t in inp.pairs)}); LoRA {r['lora']}; "
                                    f"{sum(r['timings_s'].values()):.1f} s. Files in `{paths[0].parent}`.")}

        run_event = run_btn.click(
            run, [image_state, points_state, editor, preset_dd, *pickers.values(), lora_mode, lora_path, width, seed,
                  prompt, previews, *all_controls],
            [status, result_view, compare, result_state, files],
            show_progress_on=[status], concurrency_limit=1, concurrency_id=f"edit-{settings.load.device}",
            api_visibility="private")

        def on_cancel(request: gr.Request = None):
            ev = cancels.get(getattr(request, "session_hash", None) or "local")
            if ev is not None:
                ev.set()
            return "Cancelled: the edit stops at its next step; nothing was written."

        cancel_btn.click(on_cancel, None, status, cancels=[run_event], queue=False)

        def on_again(result, ed):
            if result is None:
                raise gr.Error("no result yet: run an edit first", print_exception=False)
            layers = (ed or {}).get("layers") or []
            return (result, [], {"background": result, "layers": layers, "composite": None},
                    show(result, [], ed), describe([]), "The result is the new input: click new points and Run.")

        again_btn.click(on_again, [result_state, editor], [image_state, points_state, editor, view, points_md, status])

        def on_save(image, points, ed, name):
            if image is None:
                raise gr.Error("no image: upload one first", print_exception=False)
            try:
                folder = work.save_sample(settings.samples, name, image, work.pairs_from_clicks(points),
                                          work.mask_from_layers((ed or {}).get("layers"), image.size))
            except GoodDragError as exc:
                raise gr.Error(work.one_line(exc), print_exception=False) from None
            gr.Info(f"saved {folder}")
            return f"Saved the input as Drag100 sample `{folder}`."

        save_btn.click(on_save, [image_state, points_state, editor, sample_name], status)
        page.load(lambda: "Ready.", None, status, show_progress="hidden")  # the page's events are connected
    return page
