"""The engine side of the UI, without gradio: loaded editors, point drawing, the brushed mask, one
edit in a worker thread with live events and cancellation, result files and "save as sample"."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from pathlib import Path
from html import escape
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from gooddrag.core.config import EditConfig, LoadOptions
from gooddrag.core.editor import Editor
from gooddrag.core.errors import BadInputError, GoodDragError
from gooddrag.core.hookspecs import PHASES, hookimpl
from gooddrag.core.inputs import EditInput, Pair
from gooddrag.core.inputs import open_image as core_open_image
from gooddrag.core.registry import Registry
from gooddrag.app.outputs.draw import draw_points
from gooddrag.app.outputs.files import staging, write_result_files
from gooddrag.app.outputs.gif import GifWriter

#: longest side accepted from an upload (the edit itself runs at the working width; this bounds the
#: original-size work: mask, drawing, resizing, files)
MAX_SIDE = 4096



class EditorPool:
    """One loaded :class:`Editor` per ``LoadOptions``, for the server's life: the model loads on the first
    edit and never again."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._editors: dict[LoadOptions, Editor] = {}
        self._lock = threading.Lock()

    def get(self, load: LoadOptions) -> Editor:
        with self._lock:
            if load not in self._editors:
                self._editors[load] = Editor.from_pretrained(load, registry=self.registry)
            return self._editors[load]

    def adopt(self, backbone: Any, load: LoadOptions) -> None:
        """Use an already loaded backbone for these options (tests share one tiny model)."""
        with self._lock:
            self._editors[load] = Editor(backbone, self.registry, load=load)

    def loaded(self, load: LoadOptions) -> bool:
        return load in self._editors


def check_image(image: Image.Image) -> Image.Image:
    """An uploaded image as RGB, refused (one line) when it is too large to edit comfortably."""
    w, h = image.size
    if max(w, h) > MAX_SIDE:
        raise BadInputError(f"the image is {w}x{h}; the editor takes up to {MAX_SIDE} px on a side, "
                            "downscale it first")
    if min(w, h) < 8:
        raise BadInputError(f"the image is {w}x{h}; give an image at least 8 px on each side")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """An uploaded file as a checked RGB image, read exactly as the CLI reads it (EXIF orientation,
    16-bit scaling: ``core.inputs.open_image``); a one-line message naming the file when it is not one."""
    name = Path(path).name  # the page never shows server paths
    try:
        image = core_open_image(path)
    except BadInputError as exc:
        why = "has too many pixels; downscale it" if "over the limit" in str(exc) else \
            "is not a readable image; open a PNG or JPEG file"
        raise BadInputError(f"{name!r} {why}") from None
    return check_image(image)


def pairs_from_clicks(points: Sequence[Sequence[float]]) -> list[Pair]:
    """Clicked points (handle, target, handle, ...) -> pairs; one-line errors for none or an odd count."""
    if not points:
        raise BadInputError("no points: click a handle (red) on the image, then its target (blue)")
    if len(points) % 2:
        raise BadInputError(f"{len(points)} point{'s' if len(points) > 1 else ''}, an odd number: handle {len(points) // 2 + 1} has no target; "
                            "click its target or undo the last point")
    return [((float(points[i][0]), float(points[i][1])), (float(points[i + 1][0]), float(points[i + 1][1])))
            for i in range(0, len(points), 2)]


def mask_from_layers(layers: Sequence[Any] | None, size: tuple[int, int]) -> np.ndarray | None:
    """Brush layers of the image editor -> (H, W) bool mask (painted = editable); None when nothing is
    painted (the whole image is editable)."""
    painted = None
    for layer in layers or []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        alpha = arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[2] == 4 else arr.reshape(arr.shape[:2] + (-1,)).any(-1)
        painted = alpha if painted is None or painted.shape != alpha.shape else painted | alpha
    if painted is None or not painted.any():
        return None
    w, h = size
    if painted.shape != (h, w):
        painted = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    return painted


def draw_clicks(image: Image.Image, points: Sequence[Sequence[float]], mask: np.ndarray | None = None,
                finals: Sequence[Sequence[float]] | None = None) -> Image.Image:
    """The clicked points (handle, target, handle, ...) drawn numbered, the locked region dimmed, and
    final handles when given (the shared drawing of ``app.outputs.draw``)."""
    return draw_points(image, points[0::2], points[1::2], current=finals, numbered=True, mask=mask)


class EditCancelled(GoodDragError):
    """The user pressed Cancel; the edit stops at its next step (of any phase)."""


class LiveRun:
    """Event-hook plugin of one UI edit: reports phases and steps to the page's queue and stops the
    edit when Cancel was pressed (checked after every step of every phase)."""

    def __init__(self, events: "queue.Queue[tuple]", cancel: threading.Event):
        self.events, self.cancel, self.steps = events, cancel, 0

    def _check(self) -> None:
        if self.cancel.is_set():
            raise EditCancelled("edit cancelled; nothing was written")

    @hookimpl
    def gooddrag_phase(self, name, status):
        self._check()
        self.events.put(("phase", name, status))

    @hookimpl
    def gooddrag_phase_step(self, name, step, total):
        self._check()
        self.events.put(("phase_step", name, step, total))

    @hookimpl
    def gooddrag_drag_step(self, timestep, drag, step):
        self._check()
        self.steps += 1
        self.events.put(("step", timestep, self.steps, drag))

    @hookimpl
    def gooddrag_points_tracked(self, timestep, drag, points):
        self._check()


class LivePreview(LiveRun):
    """Adds a decoded preview of what the image is becoming after each drag, with the current
    handles, to the page's queue; the frames are the drag animation's (``GifWriter``)."""

    def __init__(self, events: "queue.Queue[tuple]", cancel: threading.Event, backbone: Any, inp: EditInput):
        super().__init__(events, cancel)
        self.animation = GifWriter(backbone, inp, max_side=max(inp.size))

    @hookimpl
    def gooddrag_preview(self, timestep, drag, x0, handles):
        self._check()
        self.events.put(("preview", timestep, drag, self.animation.add_frame(timestep, drag, x0, handles)))


PHASE_LABELS = {"lora": "LoRA", "inversion": "inversion", "reference": "reference", "drag": "drag",
                "finish": "finish", "decode": "decode"}


def max_gradient_steps(params: Any) -> int | None:
    """The most gradient steps a schedule can take (AlDD: timesteps x drags x steps; single-step:
    steps), or None when its parameters do not say."""
    names = ("drag_timesteps", "drags_per_timestep", "steps_per_drag")
    if all(hasattr(params, n) for n in names):
        return int(np.prod([getattr(params, n) for n in names]))
    steps = getattr(params, "steps", None)
    return int(steps) if isinstance(steps, int) else None


class EditProgress:
    """What one edit has done so far, phase by phase, from the LiveRun events: drawn as one bar
    per phase (with its steps and an ETA) and said as one line (the current state only)."""

    def __init__(self, lora_mode: str = "auto", drag_budget: int | None = None, skip: Sequence[str] = (),
                 inversion_note: str = "", clock: Any = time.monotonic):
        self.clock, self.lora_mode, self.drag_budget = clock, lora_mode, drag_budget
        self.inversion_note = inversion_note  # e.g. skipped: a generated image's latents are known
        self.rows: dict[str, dict[str, Any]] = {p: {"state": "waiting", "step": 0, "total": None, "t0": None,
                                                    "elapsed": None, "note": ""} for p in PHASES}
        for p in skip:
            self.rows[p]["state"] = "skipped"
        self.current: str | None = None
        self.drag_info = ""

    def update(self, ev: tuple) -> None:
        kind = ev[0]
        now = self.clock()
        if kind == "phase":
            row = self.rows.get(ev[1])
            if row is None:
                return
            if ev[2] == "start":
                row.update(state="running", t0=now, step=0)
                self.current = ev[1]
            else:
                row.update(state="done", elapsed=now - (now if row["t0"] is None else row["t0"]))
                if ev[1] == "inversion" and self.inversion_note:
                    row["note"] = self.inversion_note
                if ev[1] == "lora" and row["step"] == 0:  # no training step: cached, given or off
                    row["note"] = {"off": "off", "auto": "cached LoRA reused (no training)"}.get(
                        self.lora_mode, "loaded from the given path")
        elif kind == "phase_step":
            row = self.rows.get(ev[1])
            if row is not None:
                row.update(step=ev[2], total=ev[3])
        elif kind == "step":
            row = self.rows["drag"]
            row.update(step=ev[2], total=self.drag_budget)
            self.drag_info = f"t={ev[1]}, drag {ev[3] + 1}" if len(ev) > 3 else f"t={ev[1]}"

    def eta(self, row: dict[str, Any]) -> float | None:
        if row["state"] != "running" or not row["step"] or not row["total"] or row["t0"] is None:
            return None
        per = (self.clock() - row["t0"]) / row["step"]
        return per * (row["total"] - row["step"])

    def describe(self, phase: str) -> str:
        row, label = self.rows[phase], PHASE_LABELS[phase]
        if row["state"] == "skipped":
            return f"{label}: skipped"
        if row["state"] == "waiting":
            return f"{label}: waiting"
        if row["state"] == "done":
            note = f" ({row['note']})" if row["note"] else ""
            return f"{label}: done in {row['elapsed']:.1f} s{note}"
        text = f"{label}"
        if phase == "drag" and row["step"]:
            budget = f" of at most {row['total']}" if row["total"] else ""
            text += f" gradient step {row['step']}{budget} ({self.drag_info})"
        elif row["step"] and row["total"]:
            text += f" step {row['step']}/{row['total']}"
        elif phase == "lora" and self.lora_mode == "auto":
            text += ": preparing (trains on the first edit of an image, then cached)"
        else:
            text += ": running"
        eta = self.eta(row)
        if eta is not None:
            text += f", ETA {eta:.0f} s"
        return text

    def line(self) -> str:
        """The current state in one line."""
        return self.describe(self.current) if self.current else "starting"

    def fraction(self, phase: str) -> float:
        row = self.rows[phase]
        if row["state"] in ("done", "skipped"):
            return 1.0
        if row["state"] == "running" and row["step"] and row["total"]:
            return min(1.0, row["step"] / row["total"])
        return 0.0

    def html(self) -> str:
        """One labelled bar per phase (rendered by the page as is)."""
        rows = []
        for p in PHASES:
            state = self.rows[p]["state"]
            frac = self.fraction(p)
            rows.append(f'<div class="gd-phase gd-{state}" data-phase="{p}" data-state="{state}">'
                        f'<span class="gd-phase-label">{escape(self.describe(p))}</span>'
                        f'<progress max="1000" value="{round(frac * 1000)}"></progress></div>')
        return '<div class="gd-progress">' + "".join(rows) + "</div>"


class DeviceQueue:
    """One edit at a time per device, with a word on what runs: a Run that has to wait says behind
    what (another tab's edit, or a cancelled one still stopping at its next step)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: str = ""  # what holds the lock, in words
        self.progress: EditProgress | None = None
        self.waiting = 0

    def behind(self) -> str:
        what = self.running or "another edit"
        if self.progress is not None:
            what += f", now at {self.progress.line()}"
        return what


_QUEUES: dict[str, DeviceQueue] = {}
_QUEUES_LOCK = threading.Lock()


def device_queue(device: str) -> DeviceQueue:
    with _QUEUES_LOCK:
        return _QUEUES.setdefault(str(device), DeviceQueue())


def run_edit(editor: Editor, inp: EditInput, cfg: EditConfig, prompt: str, cancel: threading.Event,
             previews: bool = True, label: str = "an edit", progress: EditProgress | None = None,
             poll_s: float = 0.5, start_latents: Any = None) -> Iterator[tuple]:
    """Run one edit in a worker thread. While another edit holds the device, yield ``("queued",
    behind)`` every ``poll_s``; then ``("phase", name, status)``, ``("phase_step", name, k, n)``,
    ``("step", t, n, drag)``, ``("preview", t, drag, image)`` events, then ``("done", result,
    animation)`` (a GifWriter, or None without previews) or ``("error", exc)``. Closing the iterator
    early (the page cancelled) cancels the edit; a cancelled edit stops at its next step and frees
    the device."""
    events: "queue.Queue[tuple]" = queue.Queue()
    plugin = LivePreview(events, cancel, editor.backbone, inp) if previews else LiveRun(events, cancel)
    dq = device_queue(str(editor.backbone.device))
    dq.waiting += 1
    try:
        while not dq.lock.acquire(timeout=poll_s):
            if cancel.is_set():
                yield ("error", EditCancelled("cancelled while queued; nothing was written"))
                return
            yield ("queued", dq.behind())
    finally:
        dq.waiting -= 1
    dq.running, dq.progress = label, progress

    def work() -> None:
        try:
            if cancel.is_set():
                raise EditCancelled("edit cancelled; nothing was written")
            result = editor.run(inp, cfg, prompt=prompt, plugins=[plugin], start_latents=start_latents)
            events.put(("done", result, getattr(plugin, "animation", None)))
        except BaseException as exc:  # handed to the page, which shows it as one line
            events.put(("error", exc))
        finally:
            dq.running = "a cancelled edit stopping at its next step" if cancel.is_set() else ""
            dq.progress = None
            dq.lock.release()

    thread = threading.Thread(target=work, name="gooddrag-ui-edit", daemon=True)
    thread.start()
    try:
        while True:
            try:
                ev = events.get(timeout=poll_s)
            except queue.Empty:
                if cancel.is_set():  # the page is free at once; the worker stops at its next step
                    yield ("error", EditCancelled("edit cancelled; nothing was written"))
                    return
                continue
            if progress is not None:
                progress.update(ev)
            yield ev
            if ev[0] in ("done", "error"):
                return
    finally:
        if thread.is_alive():
            cancel.set()
            dq.running = "a cancelled edit stopping at its next step"


def one_line(exc: BaseException) -> str:
    """An exception as the one-line message the page shows."""
    if isinstance(exc, GoodDragError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"the edit failed: {type(exc).__name__}{': ' + text if text else ''}"


def new_run_dir(root: Path) -> Path:
    """A fresh folder for one edit's files."""
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def write_outputs(run_dir: Path, inp: EditInput, result: Any, animation: GifWriter | None = None) -> list[Path]:
    """result.png, points.png, run.json, mask.png (the brushed region, 255 = editable; only when one
    was brushed) and (with previews) drag.gif, written atomically."""
    with staging(run_dir) as tmp:
        write_result_files(tmp, inp.image, result)
        if inp.mask is not None:
            Image.fromarray(np.asarray(inp.mask, bool).astype(np.uint8) * 255, "L").save(tmp / "mask.png")
        if animation is not None:
            animation.save_gif(tmp / "drag.gif", result.image, result.points)
    names = ("result.png", "points.png", "mask.png", "run.json", "drag.gif")
    return [run_dir / n for n in names if (run_dir / n).exists()]


_SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def save_sample(root: Path, name: str, image: Image.Image, pairs: Sequence[Pair], mask: np.ndarray | None) -> Path:
    """Write the input as a Drag100 sample folder ``root/name`` (original.png, mask.png with 255 =
    editable, points.json, image_with_points.png) so ``gooddrag bench root`` can run it."""
    name = (name or "").strip()
    if not _SAMPLE_NAME.fullmatch(name):
        raise BadInputError(f"sample name {name!r}: use letters, digits, '_', '-' or '.', e.g. cat_1 "
                            "(Drag100 derives the content group from it)")
    folder = Path(root) / name
    if folder.exists():
        raise BadInputError(f"sample {name!r} already exists in {root}; choose another name")
    w, h = image.size
    keep = np.ones((h, w), bool) if mask is None else mask
    flat = [list(p) for pair in pairs for p in pair]
    with staging(folder) as tmp:
        image.convert("RGB").save(tmp / "original.png")
        Image.fromarray(keep.astype(np.uint8) * 255, "L").save(tmp / "mask.png")
        (tmp / "points.json").write_text(json.dumps({"points": flat}) + "\n")
        draw_clicks(image, flat, mask).save(tmp / "image_with_points.png")
    return folder
