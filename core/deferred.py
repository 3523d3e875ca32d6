"""Writes that wait until an edit's result is out, on background threads.

A backbone may leave slow or device-reading work (caching a freshly trained LoRA reads every LoRA
tensor back from the GPU) until the result is returned. Anything that reads what such a write
produces waits for it first: the next LoRA lookup, and a LoRA path given to an edit."""

from __future__ import annotations

import threading
from typing import Callable

_WRITERS: list[threading.Thread] = []
_LOCK = threading.Lock()


def start(write: Callable[[], None], name: str) -> None:
    """Run ``write`` on a thread. Not a daemon: the interpreter's exit waits for it, so a command
    that ends right after its edit still leaves the write complete."""
    writer = threading.Thread(target=write, name=name)
    with _LOCK:
        _WRITERS.append(writer)
    writer.start()


def wait() -> None:
    """Return once every write started so far has finished (written, or failed and warned)."""
    while True:
        with _LOCK:
            if not _WRITERS:
                return
            writer = _WRITERS.pop(0)
        writer.join()
