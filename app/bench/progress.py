"""What a bench run says while it works: one line per sample, or a live bar on a terminal."""

from __future__ import annotations

import sys
from typing import Any, Callable

from gooddrag.core.runners import RunnerEvent


Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A rich progress bar with ETA on a terminal (plus a line per worker when the runner has several);
    one line per sample otherwise. Runner events arrive through ``event``."""

    def __init__(self, total: int, log: Log, tty: bool, show_workers: bool = False, workers: set | None = None):
        self.total, self.log, self.done, self.bar = total, log, 0, None
        self.show_workers = show_workers
        self.workers = workers if workers is not None else set()  # names of the workers that got ready
        self.worker_of: dict[str, str] = {}  # sample id -> worker that edited it
        self.lines: dict[str, Any] = {}  # worker -> its rich task
        if tty and total:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("bench", total=total)
            self.bar.start()

    def event(self, ev: RunnerEvent) -> None:
        """Per-worker state from the runner: which sample each worker edits, restarts, losses."""
        sid = getattr(ev.job, "id", None)
        if ev.kind == "ready":
            self.workers.add(ev.worker)
        if ev.kind == "start" and sid is not None:
            self.worker_of[sid] = ev.worker
        if self.bar is not None and self.show_workers:
            if ev.worker not in self.lines:
                self.lines[ev.worker] = self.bar.add_task(f"  {ev.worker}", total=None)
            task = self.lines[ev.worker]
            if ev.kind == "start":
                self.bar.update(task, description=f"  {ev.worker} {sid}")
            elif ev.kind == "done":
                self.bar.update(task, advance=1)
            elif ev.kind in ("lost", "restart"):
                self.bar.console.print(f"{ev.worker} {'lost' if ev.kind == 'lost' else 'restarted'}: {ev.detail}")
        elif ev.kind in ("ready", "restart", "lost") and ev.detail and self.show_workers:
            what = {"ready": "ready", "restart": "died and was restarted", "lost": "lost"}[ev.kind]
            self.log(f"worker {ev.worker} {what}: {ev.detail}")

    def step(self, row: dict, first_key: tuple[str, str] | None) -> None:
        self.done += 1
        val = ""
        if first_key and row["status"] == "ok":
            v = row["scores"].get(first_key[0], {}).get(first_key[1])
            val = f" {first_key[1]}={v:.4g}" if v is not None else ""
        t = sum(row["timings"].values()) if row["timings"] else 0.0
        where = f" on {self.worker_of[row['id']]}" if self.show_workers and row["id"] in self.worker_of else ""
        msg = f"[{self.done}/{self.total}] {row['id']}: {row['status']}{val} ({t:.1f} s){where}" + (
            f" - {row['error']}" if row["error"] else "")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=row["id"])
            if row["status"] != "ok":
                self.bar.console.print(msg)
        else:
            self.log(msg)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
