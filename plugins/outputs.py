"""Output writers of one edit: trace, GIF and progress are event-hook plugins; the files
(result.png, points.png, run.json, trace.jsonl, drag.gif) are written atomically: all go to a
hidden temporary folder first and are moved into place only after the edit succeeded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw

from gooddrag.core.hookspecs import hookimpl


class TraceWriter:
    """Writes trace.jsonl: one object per gradient step, tracking event and the stop."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj) + "\n")

    @hookimpl
    def gooddrag_drag_step(self, timestep, drag, step, loss, motion, preserve):
        self._write({"event": "step", "timestep": timestep, "drag": drag, "step": step, "loss": float(loss),
                     "motion": float(motion), "preserve": float(preserve)})

    @hookimpl
    def gooddrag_points_tracked(self, timestep, drag, points):
        self._write({"event": "track", "timestep": timestep, "drag": drag, "points": points.cpu().tolist()})

    @hookimpl
    def gooddrag_drag_stopped(self, timestep, reason):
        self._write({"event": "stop", "reason": reason, "timestep": timestep})

    def close(self) -> None:
        self.file.close()


class GifWriter:
    """Collects a decoded frame after every drag, for drag.gif (decoding costs time: only with --gif)."""

    def __init__(self, backbone: Any, size: tuple[int, int], every: int = 1):
        self.backbone, self.size, self.every, self.frames, self.n = backbone, size, every, [], 0

    @hookimpl
    def gooddrag_preview(self, timestep, drag, latent):
        self.n += 1
        if (self.n - 1) % self.every == 0:
            self.frames.append(to_pil(self.backbone.decode(latent)).resize(self.size))

    def save(self, path: Path, final: Image.Image) -> None:
        frames = self.frames + [final] * 5
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


class ProgressDisplay:
    """A rich progress line: current phase, gradient steps and tracked distance."""

    def __init__(self, console: Any = None):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.task = None
        self.steps = 0

    @hookimpl
    def gooddrag_phase(self, name, status):
        if status == "start":
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task(name)
            self.progress.update(self.task, description=f"[bold]{name}[/]")
        elif name == "decode":
            self.progress.update(self.task, description="done")
            self.progress.stop()

    @hookimpl
    def gooddrag_drag_step(self, timestep, drag, step, loss, motion, preserve):
        self.steps += 1
        if self.steps % 3 == 0 and self.task is not None:
            self.progress.update(self.task, description=f"[bold]drag[/] t={timestep} step {self.steps}")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


def to_pil(x: Any) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL."""
    arr = (x[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


def draw_points(image: Image.Image, handles, targets, finals=None) -> Image.Image:
    """Handles red, targets blue, arrows white, final handles green."""
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    r = max(3, min(im.size) // 100)
    for i, (h, t) in enumerate(zip(handles, targets)):
        d.line([tuple(h), tuple(t)], fill=(255, 255, 255), width=max(1, r // 2))
        d.ellipse([h[0] - r, h[1] - r, h[0] + r, h[1] + r], fill=(230, 40, 40))
        d.ellipse([t[0] - r, t[1] - r, t[0] + r, t[1] + r], fill=(40, 90, 230))
        if finals is not None:
            f = finals[i]
            d.ellipse([f[0] - r, f[1] - r, f[0] + r, f[1] + r], outline=(40, 220, 40), width=max(1, r // 2))
    return im


def points_figure(original: Image.Image, result: Image.Image, report: dict) -> Image.Image:
    """Input with handles/targets beside the result with final handles."""
    left = draw_points(original, report["handles"], report["targets"])
    right = draw_points(result, report["handles"], report["targets"], report["final_handles"])
    w, h = original.size
    fig = Image.new("RGB", (2 * w + 8, h), (255, 255, 255))
    fig.paste(left, (0, 0))
    fig.paste(right, (w + 8, 0))
    return fig


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden temporary folder inside ``out_dir``; on success its files replace those in
    ``out_dir`` (each by an atomic rename); on failure it is removed and nothing is left behind."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".partial-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def clear_partials(out_dir: Path) -> None:
    """Remove staging folders that a killed process (SIGKILL, power loss) could not clean up."""
    for stale in Path(out_dir).glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_result_files(tmp: Path, original: Image.Image, result: Any) -> None:
    """result.png, points.png and run.json into the staging folder."""
    result.image.save(tmp / "result.png")
    points_figure(original, result.image, result.report).save(tmp / "points.png")
    (tmp / "run.json").write_text(json.dumps(result.report, indent=2) + "\n")
