"""What a bench runner and its caller exchange, beyond the jobs and outcomes they pass through.

A runner (registered with ``gooddrag_register_runners``) has ``name``, ``Params``, optionally
``check()`` (raises RequirementError before anything loads, e.g. when its package is missing) and
``run(jobs, make_worker, on_event=None)``, a generator of outcomes as they finish:

- ``make_worker()`` builds a worker (it loads the model), once per device; ``worker(job)`` edits one
  job and returns its outcome, with any per-job failure inside the outcome. ``make_worker`` is
  picklable, so a runner may build it in another process or on another machine.
- A runner that loses a job (its worker died on it more often than the runner retries) yields
  ``JobLost(job, error)`` for it instead of an outcome: every job comes back exactly once.
- ``on_event(RunnerEvent)`` is called in the caller's process, for its progress display.

An exception raised by ``make_worker`` or a worker (not a per-job failure) ends the run, as it
would in one process.
"""

from __future__ import annotations

from typing import Any

import attrs

#: RunnerEvent kinds: a worker is ``ready`` (model loaded), ``start``s or is ``done`` with a job, was
#: ``restart``ed after it died (its job is retried), or is ``lost`` for good
EVENT_KINDS = ("ready", "start", "done", "restart", "lost")


@attrs.frozen
class RunnerEvent:
    """Something a worker did, for the caller's progress display (``detail`` is one line)."""

    kind: str
    worker: str
    job: Any = None
    detail: str = ""


@attrs.frozen
class JobLost:
    """Yielded for a job no worker could finish (its worker kept dying); ``error`` is one line."""

    job: Any
    error: str
