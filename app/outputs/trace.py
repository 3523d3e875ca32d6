"""``--trace``: trace.jsonl, one JSON object per gradient step, tracking event and the stop."""

from __future__ import annotations

import json
from pathlib import Path

from gooddrag.core.hookspecs import hookimpl


class TraceWriter:
    """Writes trace.jsonl: one object per gradient step, tracking event and the stop, to see how an
    edit converged. An edit plugin: ``with TraceWriter(path) as t: editor.edit(..., plugins=[t])``.
    Points are (row, col) on the feature grid (half the working resolution)."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj) + "\n")

    @hookimpl
    def gooddrag_drag_step(self, timestep, drag, step, loss, motion, preserve):
        self._write({"event": "step", "timestep": timestep, "drag": drag, "step": step, "loss": float(loss),
                     "motion": float(motion), "preserve": float(preserve)})

    @hookimpl
    def gooddrag_points_tracked(self, timestep, drag, points):
        self._write({"event": "track", "timestep": timestep, "drag": drag, "points_grid_rc": points.cpu().tolist()})

    @hookimpl
    def gooddrag_drag_stopped(self, timestep, reason):
        self._write({"event": "stop", "reason": reason, "timestep": timestep})

    def close(self) -> None:
        self.file.close()
