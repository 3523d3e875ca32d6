"""The terminal progress line of ``gooddrag edit`` (an event-hook plugin)."""

from __future__ import annotations

from typing import Any

from gooddrag.core.hookspecs import hookimpl


class ProgressDisplay:
    """A live terminal line (rich): the current phase and, while dragging, the timestep and gradient
    steps, so a long edit shows it is alive. An edit plugin; call ``stop()`` after the edit."""

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
