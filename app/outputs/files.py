"""The files of one edit (result.png, points.png, run.json, and whatever the writers add), written
atomically: all go to a hidden temporary folder first and are moved into place only after the edit
succeeded. The move is a swap: the old set is first moved aside, and put back if any move fails,
so a failed move never leaves half of a new set beside half of the old one. An OS error while
writing (disk full, file too large, read-only) is one line naming the path and the cause."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from gooddrag.app.outputs.draw import draw_points
from gooddrag.core.errors import BadInputError, OutputError

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
#: the names of OUTPUT_NAMES that are folders (the others are files)
OUTPUT_FOLDERS = ("frames",)
#: errno values that mean "this cannot be written" (disk full, quota, file too large, read-only, ...)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE}


def check_output_set(out_dir: Path, names: Any, inputs: dict[str, Any], folders: Any = OUTPUT_FOLDERS) -> None:
    """Refuse, before any model loads, an ``--out`` that is a file, that cannot be written, where an
    output name is taken by another kind of entry (a folder named ``run.json``, a file named
    ``frames``), or where one of the ``inputs`` ({what: path or None}) lies in the output set: the
    path as given or the file it resolves to (through links), at any depth under one of ``names``.
    The outputs replace (or remove) the whole set, which would silently destroy that input."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a file; give a folder (result.png, points.png and run.json go there)")
    real_out = Path(os.path.realpath(out))
    for what, src in inputs.items():
        if src is None:
            continue
        src = Path(src)
        # where the path itself lives (a link in the set is replaced) and where it resolves to
        for where in (Path(os.path.realpath(src.parent)) / src.name, Path(os.path.realpath(src))):
            try:
                first = where.relative_to(real_out).parts[:1]
            except ValueError:
                continue
            if first and first[0] in names:
                raise BadInputError(f"--out {str(out)!r} would replace the input {what} {str(src)!r} "
                                    f"(it lies in the output {first[0]}); move it out of --out or choose "
                                    "another --out folder")
    if out.is_dir():
        for name in names:
            entry = out / name
            if entry.is_symlink() or not entry.exists():
                continue
            if name in folders and not entry.is_dir():
                raise BadInputError(f"--out {str(out)!r}: {name} there is a file, but the edit's {name}/ is a folder; "
                                    "move it away or choose another --out folder")
            if name not in folders and entry.is_dir():
                raise BadInputError(f"--out {str(out)!r}: {name} there is a folder, but the edit's {name} is a file; "
                                    "move it away or choose another --out folder")
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
    ``out_dir``; on failure it is removed and nothing is left behind.

    Names in ``replaces`` that the new edit did not write are removed from ``out_dir`` too (and
    appended to ``removed``), so the folder holds one edit's outputs, not a mix of two. The swap
    moves the old entries into a hidden ``.previous-*`` folder, then the new ones in (renames in
    one folder); if a move fails the old set is put back. An OS error while writing is an
    :class:`OutputError` naming the path and the cause; the previous set is kept.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    with _writing(out_dir, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".partial-{os.getpid()}-"))
    try:
        with _writing(tmp, out_dir):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    with _writing(tmp, out_dir):
        gone = _swap(out_dir, tmp, replaces)
    if removed is not None:
        removed.extend(gone)


def _swap(out_dir: Path, tmp: Path, replaces: tuple[str, ...]) -> list[str]:
    """Move ``tmp``'s entries into ``out_dir``, old entries of the same names or of ``replaces`` aside
    first; all or nothing. Returns the names of ``replaces`` removed without a replacement."""
    new = sorted(f.name for f in tmp.iterdir())
    old = [n for n in dict.fromkeys([*new, *replaces]) if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    try:
        aside = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".previous-{os.getpid()}-"))
        (aside / SWAP_MANIFEST).write_text(json.dumps({"new": new}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in old:
            os.replace(out_dir / name, aside / name)
            moved_old.append(name)
        for name in new:
            os.replace(tmp / name, out_dir / name)
            moved_new.append(name)
    except BaseException:
        for name in moved_new:  # back to the old set
            _remove(out_dir / name)
        for name in moved_old:
            with contextlib.suppress(OSError):
                os.replace(aside / name, out_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    tmp.rmdir()
    done = out_dir / aside.name.replace(".previous-", ".discard-", 1)
    os.replace(aside, done)  # the swap is complete: the old set is no longer needed
    shutil.rmtree(done, ignore_errors=True)
    return [n for n in old if n not in new]


SWAP_MANIFEST = ".swap.json"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _writing(tmp: Path, out_dir: Path) -> Iterator[None]:
    """OS errors that mean "cannot write" become one OutputError naming the path (as it will be in
    ``out_dir``, not in the hidden staging folder) and the cause."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        name = exc.filename
        inside = False
        if name:
            with contextlib.suppress(ValueError):
                name = str(out_dir / Path(name).relative_to(tmp))
                inside = True
        if not (inside or exc.errno in WRITE_ERRNOS):
            raise
        raise OutputError(f"cannot write {name or str(out_dir)}: {exc.strerror or type(exc).__name__}; nothing "
                          f"of this edit was kept and the previous results in {str(out_dir)!r} are unchanged") from None


def clear_partials(out_dir: Path) -> None:
    """Remove staging folders that a killed process (SIGKILL, power loss) could not clean up; one
    whose process (named in it) is still running is another edit's, and is left alone. A swap that
    was cut short (a ``.previous-*`` folder left) is undone: the old set is put back."""
    for stale in sorted(Path(out_dir).glob(".partial-*")) + sorted(Path(out_dir).glob(".previous-*")) + \
            sorted(Path(out_dir).glob(".discard-*")):
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if stale.name.startswith(".previous-"):
            with contextlib.suppress(OSError, ValueError):
                new = json.loads((stale / SWAP_MANIFEST).read_text())["new"]
                for name in new:
                    if Path(name).name == name and not (stale / name).exists():
                        _remove(Path(out_dir) / name)
                for entry in stale.iterdir():
                    if entry.name != SWAP_MANIFEST:
                        _remove(Path(out_dir) / entry.name)
                        os.replace(entry, Path(out_dir) / entry.name)
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
        path = Path(tmp) / name
        try:
            path.write_bytes(data)
        except OSError as exc:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from None


@contextlib.contextmanager
def output_lock(out_dir: Path, command: str = "edit") -> Iterator[None]:
    """Hold ``out_dir`` for one command (``fcntl.flock`` on the folder itself, so nothing is added to
    it): a second command on the same folder stops at once with one line, instead of both writing
    and one result being silently lost. A folder created here and left empty is removed again."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise BadInputError(f"--out {str(out_dir)!r} cannot be used ({exc.strerror or type(exc).__name__}); "
                            "give a folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(f"--out {str(out_dir)!r} is in use by another gooddrag {command}; wait for it to "
                                "finish, or use another --out") from None
        try:
            yield
        finally:
            if created:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # only when empty
    finally:
        os.close(fd)


def write_result_files(tmp: Path, original: Image.Image, result: Any) -> None:
    """result.png, points.png and run.json into the staging folder."""
    write_files(tmp, result_files(original, result))
