"""The files of one edit (result.png, points.png, run.json, and whatever the writers add), written
atomically: all go to a hidden temporary folder first and are moved into place only after the edit
succeeded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from gooddrag.app.outputs.draw import draw_points
from gooddrag.core.errors import BadInputError

#: what :func:`write_result_files` writes
RESULT_FILES = ("result.png", "points.png", "run.json")


def to_pil(x: Any) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL."""
    arr = (x[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


def points_figure(original: Image.Image, result: Image.Image, report: dict) -> Image.Image:
    """Input with handles/targets beside the result with final handles."""
    left = draw_points(original, report["handles_xy"], report["targets_xy"])
    right = draw_points(result, report["handles_xy"], report["targets_xy"], current=report["final_handles_xy"])
    w, h = original.size
    fig = Image.new("RGB", (2 * w + 8, h), (255, 255, 255))
    fig.paste(left, (0, 0))
    fig.paste(right, (w + 8, 0))
    return fig


#: every file or folder an edit may write into its output folder; a new edit into the same folder
#: replaces the whole set, so no file of an earlier edit is left beside the new result
OUTPUT_NAMES = ("result.png", "points.png", "run.json", "trace.jsonl", "drag.gif", "drag.mp4", "frames")


def check_output_set(out_dir: Path, names: Any, inputs: dict[str, Any]) -> None:
    """Refuse, before any model loads, an ``--out`` that is a file, that cannot be written, or where
    one of the output ``names`` would replace one of the ``inputs`` ({what: path or None}): the
    outputs are moved into place by rename, which would silently destroy that input."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a file; give a folder (result.png, points.png and run.json go there)")
    if out.is_dir():
        for what, src in inputs.items():
            if src is None:
                continue
            src = Path(src)
            if src.name in names and src.parent.exists() and os.path.samefile(src.parent, out):
                raise BadInputError(f"--out {str(out)!r} would replace the input {what} {str(src)!r} with the "
                                    f"output {src.name}; choose another --out folder")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise BadInputError(f"--out {str(out)!r}: {str(probe)!r} is a file, not a folder; give a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-test-"))
    except OSError as exc:
        raise BadInputError(f"--out {str(out)!r} is not writable ({str(probe)!r}: {exc.strerror or type(exc).__name__}); "
                            "give a folder you can write to") from None


@contextlib.contextmanager
def staging(out_dir: Path, replaces: tuple[str, ...] = (), removed: list[str] | None = None) -> Iterator[Path]:
    """A hidden temporary folder inside ``out_dir``; on success its files replace those in
    ``out_dir`` (each by an atomic rename); on failure it is removed and nothing is left behind.

    Names in ``replaces`` that the new edit did not write are removed from ``out_dir`` after the
    move (and appended to ``removed``), so the folder holds one edit's outputs, not a mix of two.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".partial-{os.getpid()}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    written = sorted(tmp.iterdir())
    for f in written:
        dest = out_dir / f.name
        if f.is_dir() and dest.is_dir():
            shutil.rmtree(dest)  # a folder (frames/) cannot be renamed over a non-empty one
        os.replace(f, dest)
    tmp.rmdir()
    names = {f.name for f in written}
    for name in replaces:
        stale = out_dir / name
        if name not in names and (stale.exists() or stale.is_symlink()):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
            if removed is not None:
                removed.append(name)


def clear_partials(out_dir: Path) -> None:
    """Remove staging folders that a killed process (SIGKILL, power loss) could not clean up; one
    whose process (named in it) is still running is another edit's, and is left alone."""
    for stale in Path(out_dir).glob(".partial-*"):
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def result_files(original: Image.Image, result: Any) -> dict[str, bytes]:
    """result.png, points.png and run.json as bytes: a worker on another machine sends them back and
    the process that owns the output folder writes them."""
    files = {}
    for name, image in (("result.png", result.image), ("points.png", points_figure(original, result.image,
                                                                                   result.report))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files[name] = buf.getvalue()
    files["run.json"] = (json.dumps(result.report, indent=2) + "\n").encode()
    return files


def write_files(tmp: Path, files: dict[str, bytes]) -> None:
    """Files by name into the staging folder."""
    for name, data in files.items():
        (Path(tmp) / name).write_bytes(data)


def write_result_files(tmp: Path, original: Image.Image, result: Any) -> None:
    """result.png, points.png and run.json into the staging folder."""
    write_files(tmp, result_files(original, result))
