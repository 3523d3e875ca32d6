"""Bench runners: how the samples of ``gooddrag bench`` are spread over workers.

A runner has ``name``, ``Params`` and ``run(jobs, make_worker)``: ``make_worker()`` builds a worker
(it loads the model; a runner calls it once per device) and ``worker(job)`` edits one job and returns
its outcome. ``run`` yields the outcomes as they finish. The local runner is the embedded default: one
worker in this process, jobs in order, and no model is loaded when there is nothing to do.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import attrs

from gooddrag.core.hookspecs import hookimpl


class LocalRunner:
    """Run every sample in this process, one after the other, with one model loaded once."""

    name = "local"

    @attrs.frozen(kw_only=True)
    class Params:
        pass

    def __init__(self, params: "LocalRunner.Params | None" = None):
        self.params = params or LocalRunner.Params()

    def run(self, jobs: Iterable[Any], make_worker: Callable[[], Callable[[Any], Any]]) -> Iterator[Any]:
        worker = None
        for job in jobs:
            if worker is None:
                worker = make_worker()
            yield worker(job)


@hookimpl
def gooddrag_register_runners():
    return [LocalRunner]
