"""One run per ``--out``: a run holds ``DIR/.lock`` (``fcntl.flock``) for its whole life, exclusively,
or shared by the shards of one run, each of which also holds ``DIR/.lock-shard-<i>-of-<n>``
exclusively and ``DIR/.lock-of-<n>`` shared. A second run on the same samples, or a shard with
another ``n``, stops at once with one line naming the holder's process id (or the other shard count),
instead of deleting the first one's staging folders and overwriting its tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from gooddrag.core.errors import BadInputError


def _holders(paths: Iterable[Path]) -> list[str]:
    """Live process ids written in these lock files (a shared holder writes none: a full run
    blocked by shards finds them in the shards' files)."""
    pids: list[str] = []
    for f in paths:
        try:
            pid = int(f.read_text().strip() or 0)
            if pid > 0:
                os.kill(pid, 0)  # raises ProcessLookupError when it is gone
        except PermissionError:  # alive, another user's
            pass
        except (OSError, ValueError):
            continue
        if pid > 0 and str(pid) not in pids:
            pids.append(str(pid))
    return pids


def lock_out(out: Path, shard: tuple[int, int] | None, held: list) -> None:
    """Take the bench lock of ``out`` (see the module docstring); the open files go to ``held``
    (closing them releases the lock). Raises a one-line error naming the holder's process id."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        return
    names = [(".lock", fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH)]
    if shard is not None:
        names.append((f".lock-shard-{shard[0]}-of-{shard[1]}", fcntl.LOCK_EX))
    start = len(held)
    for name, mode in names:
        fh = open(out / name, "a+")
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            while len(held) > start:  # what this call took so far
                held.pop().close()
            pids = _holders(sorted(out.glob(".lock*")) if name == ".lock" else [out / name])
            who = f"process {', '.join(pids)}" if pids else "another process"
            raise BadInputError(f"--out {str(out)!r} is in use by another gooddrag bench ({who}); wait for it to "
                                "finish, or use another --out") from None
        held.append(fh)
        if mode == fcntl.LOCK_EX:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
    if shard is not None:
        _one_shard_count(out, shard[1], held, start)


def _one_shard_count(out: Path, n: int, held: list, start: int) -> None:
    """Shards of one run split the samples the same way: a shard of ``--shard i/m`` (m != n) running
    on the same ``out`` would edit other samples' mix and overwrite the tables, so it is refused.
    Each shard holds ``.lock-of-<n>`` shared; a held ``.lock-of-<m>`` cannot be taken exclusively."""
    import fcntl

    fh = open(out / f".lock-of-{n}", "a+")
    fcntl.flock(fh, fcntl.LOCK_SH)
    held.append(fh)
    for other in sorted(out.glob(".lock-of-*")):
        if other.name == f".lock-of-{n}":
            continue
        with open(other, "a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                while len(held) > start:
                    held.pop().close()
                m = other.name.rsplit("-", 1)[1]
                raise BadInputError(f"--out {str(out)!r} is in use by a gooddrag bench split into {m} shards; "
                                    f"--shard i/{n} cannot run beside it (use the same n, or another --out)") from None
            fcntl.flock(probe, fcntl.LOCK_UN)
