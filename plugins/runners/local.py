"""The local runner, the embedded default: one worker in this process, jobs in order.

The runner contract (``run(jobs, make_worker, on_event)``) is described in ``gooddrag.core.runners``.
No model is loaded when there is nothing to do.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import attrs

from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.runners import RunnerEvent


class LocalRunner:
    """Run every sample in this process, one after the other, with one model loaded once."""

    name = "local"

    @attrs.frozen(kw_only=True)
    class Params:
        pass

    def __init__(self, params: "LocalRunner.Params | None" = None):
        self.params = params or LocalRunner.Params()

    def check(self) -> None:
        """Needs nothing beyond gooddrag itself."""

    def run(self, jobs: Iterable[Any], make_worker: Callable[[], Callable[[Any], Any]],
            on_event: Callable[[RunnerEvent], None] | None = None) -> Iterator[Any]:
        emit = on_event or (lambda event: None)
        worker = None
        for job in jobs:
            if worker is None:
                worker = make_worker()
                emit(RunnerEvent("ready", self.name, detail="this process"))
            emit(RunnerEvent("start", self.name, job))
            outcome = worker(job)
            emit(RunnerEvent("done", self.name, job))
            yield outcome


@hookimpl
def gooddrag_register_runners():
    return [LocalRunner]
