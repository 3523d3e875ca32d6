"""An event-hook plugin that records what an edit did (used by several tests)."""

from gooddrag.core.hookspecs import hookimpl


class Recorder:
    def __init__(self):
        self.steps, self.tracks, self.stops, self.phases, self.finished = [], [], [], [], []

    @hookimpl
    def gooddrag_drag_step(self, timestep, drag, step, loss, motion, preserve):
        self.steps.append((timestep, drag, step, float(loss)))

    @hookimpl
    def gooddrag_points_tracked(self, timestep, drag, points):
        self.tracks.append((timestep, drag, points.tolist()))

    @hookimpl
    def gooddrag_drag_stopped(self, timestep, reason):
        self.stops.append((timestep, reason))

    @hookimpl
    def gooddrag_phase(self, name, status):
        self.phases.append((name, status))

    @hookimpl
    def gooddrag_edit_finished(self, result):
        self.finished.append(result)
