"""The Ray runner: ``gooddrag bench --runner ray`` spreads the samples over a Ray cluster.

One long-lived actor per GPU (per CPU slot when the cluster has no GPU) builds the bench worker once
(it loads the model) and edits sample after sample; outcomes stream back to the bench, which writes
every file, so nothing depends on a shared file system. Faults use Ray's own machinery: an actor that
dies is restarted (``max_restarts``) and the sample it was editing is retried there
(``max_task_retries``); a Python exception is not retried by Ray. A sample whose worker kept dying
comes back as ``JobLost`` once. Ray is the optional extra ``gooddrag[ray]`` and is imported only
when this runner runs. See docs/scale-out.md.

Without an address (and no ``RAY_ADDRESS``, no cluster already running on this machine) the runner
starts a private local instance: it sends no usage statistics (``RAY_USAGE_STATS_ENABLED=0``),
starts no dashboard, keeps its session files in a fresh folder under /tmp that is removed when the
run ends, and warns in one line that Ray's own servers listen on every interface: Ray 2.60 binds
its gRPC servers to all addresses and replaces a loopback node address by the machine's own, so
there is no setting that keeps them on loopback.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

import attrs

from gooddrag.core.errors import GoodDragWarning, RequirementError, RunnerError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p
from gooddrag.core.runners import JobLost, RunnerEvent

EXTRA = "pip install 'gooddrag[ray]'"
#: how often the driver wakes up while waiting (keeps it responsive to Ctrl-C); not a limit
POLL_S = 1.0
#: fetching a finished result (images and files of one sample, possibly from another node)
FETCH_TIMEOUT_S = 600.0
#: said once when the runner starts its own local Ray instance
LISTENS_WARNING = ("the local Ray instance started for this bench listens on the network (Ray cannot bind its "
                   "servers to loopback); on an untrusted network, start Ray yourself behind a firewall and pass "
                   "--runner-param ray.address=HOST:PORT (docs/scale-out.md)")


def _non_negative(inst: Any, attr: Any, value: Any) -> None:
    if value < 0:
        raise ValueError(f"'{attr.name}' must be >= 0, got {value!r}", attr)


def _restarts(inst: Any, attr: Any, value: Any) -> None:
    if value < -1:
        raise ValueError(f"'{attr.name}' must be -1 (no limit) or >= 0, got {value!r}", attr)


def _positive(inst: Any, attr: Any, value: Any) -> None:
    if not value > 0:
        raise ValueError(f"'{attr.name}' must be > 0, got {value!r}", attr)


def import_ray() -> Any:
    """``ray``, or a one-line RequirementError naming the extra."""
    try:
        import ray
    except ImportError as exc:
        raise RequirementError(f"--runner ray needs Ray, which cannot be imported ({_line(exc)}); "
                               f"install the extra: {EXTRA}") from None
    return ray


class _Actor:
    """One device's worker, kept for the whole run: builds the bench worker on first use (after a
    restart too), then edits job after job."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]]):
        self.make_worker, self.worker = make_worker, None

    def setup(self) -> dict:
        if self.worker is None:
            self.worker = self.make_worker()
        return self.info()

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "node_id": ctx.get_node_id()}

    def run(self, job: Any) -> tuple[Any, dict]:
        self.setup()
        return self.worker(job), self.info()


@attrs.define
class _Slot:
    handle: Any
    info: dict | None = None
    job: Any = None


class RayRunner:
    """Spread the samples over a Ray cluster: one actor per GPU (or CPU slot) loads the model once;
    an actor that dies is restarted and its sample retried, a bounded number of times."""

    name = "ray"

    @attrs.frozen(kw_only=True)
    class Params:
        address: str = p("", "cluster to use: '' = RAY_ADDRESS, else a cluster started on this machine, else a new "
                             "local one; 'auto' = the running cluster; HOST:PORT; ray://HOST:10001")
        workers: int = p(0, "number of actors; 0 = one per GPU of the cluster, or per CPU slot without GPUs",
                         _non_negative)
        gpus_per_worker: float = p(-1.0, "GPUs each actor holds; -1 = 1 when the cluster has GPUs, else 0", finite)
        cpus_per_worker: float = p(1.0, "CPUs each actor holds", finite, _non_negative)
        max_retries: int = p(2, "a sample whose actor died is retried this many times (Ray max_task_retries)",
                             _non_negative)
        max_restarts: int = p(4, "an actor that died is restarted this many times, -1 = no limit "
                                 "(Ray max_restarts)", _restarts)
        start_timeout_s: float = p(900.0, "give up when no actor has loaded the model after this long "
                                          "(e.g. the cluster lacks the GPUs asked for)", finite, _positive)

    def __init__(self, params: "RayRunner.Params | None" = None):
        self.params = params or RayRunner.Params()

    def check(self) -> None:
        """Ray must be importable; checked before any model loads."""
        import_ray()

    # --- cluster ---------------------------------------------------------------------------------

    def _connect(self, ray: Any) -> bool:
        """Join (or start) the cluster; True when this call started the connection (so ends it)."""
        self._temp = None
        if ray.is_initialized():
            return False
        address = self.params.address or os.environ.get("RAY_ADDRESS") or None
        if address in (None, "local"):
            if address is None:
                try:  # a cluster already started on this machine ('ray start')
                    ray.init(address="auto", log_to_driver=False, logging_level="WARNING")
                    return True
                except ConnectionError:
                    pass
            self._start_local(ray)
            return True
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level="WARNING")
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError depending on the address form
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunnerError(f"cannot join the Ray cluster at {self.params.address or 'the default address'!r}: "
                              f"{msg}; start one with 'ray start --head' or fix --runner-param "
                              "ray.address=HOST:PORT") from None
        return True

    def _start_local(self, ray: Any) -> None:
        """A private local instance (see the module docstring); its session folder is ``self._temp``."""
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no report to the usage-stats server
        self._temp = tempfile.mkdtemp(prefix="gdray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        try:
            ray.init(address="local", _temp_dir=self._temp, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
        except Exception as exc:
            self._cleanup()
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunnerError(f"cannot start a local Ray instance: {msg}") from None
        warnings.warn(LISTENS_WARNING, GoodDragWarning, stacklevel=3)

    def _cleanup(self) -> None:
        if getattr(self, "_temp", None):
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def _plan(self, ray: Any, n_jobs: int) -> tuple[int, float, float]:
        """(actors, GPUs each, CPUs each) from the cluster's resources and the params."""
        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        gpw = self.params.gpus_per_worker
        if gpw < 0:
            gpw = 1.0 if gpus >= 1 else 0.0
        cpw = self.params.cpus_per_worker
        if self.params.workers:
            n = self.params.workers
        elif gpw > 0:
            n = math.floor(gpus / gpw + 1e-9)
        else:
            n = math.floor(cpus / cpw + 1e-9) if cpw > 0 else 1
        if n < 1 or (gpw > 0 and gpus < gpw) or cpus < cpw:
            raise RunnerError(f"the Ray cluster has {gpus:g} GPUs and {cpus:g} CPUs, too few for one worker of "
                              f"{gpw:g} GPUs and {cpw:g} CPUs; add nodes or lower ray.gpus_per_worker / "
                              "ray.cpus_per_worker")
        return min(n, n_jobs), gpw, cpw

    # --- run ---------------------------------------------------------------------------------------

    def run(self, jobs: Iterable[Any], make_worker: Callable[[], Callable[[Any], Any]],
            on_event: Callable[[RunnerEvent], None] | None = None) -> Iterator[Any]:
        queue = collections.deque(jobs)
        if not queue:
            return
        ray = import_ray()
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        emit = on_event or (lambda event: None)
        started = self._connect(ray)
        slots: dict[str, _Slot] = {}
        try:
            n, gpw, cpw = self._plan(ray, len(queue))
            actor_cls = ray.remote(num_gpus=gpw, num_cpus=cpw, max_restarts=self.params.max_restarts,
                                   max_task_retries=self.params.max_retries)(_Actor)
            inflight: dict[Any, str] = {}
            for i in range(n):
                name = f"w{i}"
                # passed by value (it is small): a restarted actor must not depend on an object-store copy
                slots[name] = _Slot(actor_cls.remote(make_worker))
                inflight[slots[name].handle.setup.remote()] = name
            t0, any_ready = time.monotonic(), False

            def submit(name: str) -> None:
                slot = slots[name]
                slot.job = queue.popleft() if queue else None
                if slot.job is not None:
                    inflight[slot.handle.run.remote(slot.job)] = name
                    emit(RunnerEvent("start", name, slot.job))

            def drop(name: str, why: str) -> None:
                slot = slots.pop(name)
                ray.kill(slot.handle, no_restart=True)
                emit(RunnerEvent("lost", name, detail=why))
                if not slots and queue:
                    raise RunnerError(f"every Ray worker died ({why}); {len(queue)} samples are left; "
                                      "run the same command again to resume")

            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
                if not ready:
                    if not any_ready and time.monotonic() - t0 > self.params.start_timeout_s:
                        raise RunnerError(f"no Ray worker loaded the model within {self.params.start_timeout_s:g} s "
                                          f"(each asks for {gpw:g} GPUs and {cpw:g} CPUs; see 'ray status'); "
                                          "raise ray.start_timeout_s or free resources")
                    continue
                ref = ready[0]
                name = inflight.pop(ref)
                slot = slots[name]
                job = slot.job
                try:
                    value = ray.get(ref, timeout=FETCH_TIMEOUT_S)
                except RayTaskError as exc:  # a Python exception, not a crash: as fatal as in one process
                    cause = exc.cause if isinstance(exc.cause, Exception) else None
                    if cause is None:
                        raise RunnerError(f"Ray worker {name} failed: {_line(exc)}") from None
                    raise cause from None
                except RayActorError as exc:  # the actor died and Ray's retries are spent
                    if job is not None:
                        slot.job = None
                        yield JobLost(job, f"the Ray worker died editing it ({self.params.max_retries} retries): "
                                           f"{_line(exc)}")
                    try:  # restarted? then it goes on; dead for good? then without it
                        slot.info = ray.get(slot.handle.info.remote(), timeout=self.params.start_timeout_s)
                    except (RayActorError, GetTimeoutError) as dead:
                        drop(name, _line(dead))
                        continue
                    emit(RunnerEvent("restart", name, detail=_where(slot.info)))
                    submit(name)
                    continue
                if job is None:  # setup finished: the model is loaded
                    slot.info, any_ready = value, True
                    emit(RunnerEvent("ready", name, detail=_where(value)))
                    submit(name)
                    continue
                outcome, info = value
                if slot.info is not None and info["pid"] != slot.info["pid"]:
                    emit(RunnerEvent("restart", name, job, f"{_where(info)}; the sample was retried"))
                slot.info = info
                submit(name)  # keep the actor busy while the caller stores this outcome
                emit(RunnerEvent("done", name, job))
                yield outcome
        finally:
            for slot in slots.values():
                ray.kill(slot.handle, no_restart=True)
            if started:
                ray.shutdown()
                self._cleanup()  # the local instance's session folder


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(info: dict) -> str:
    gpus = info.get("gpus") or []
    return f"{info['host']} ({info['ip']}) pid {info['pid']}" + (f" GPU {','.join(gpus)}" if gpus else "")


@hookimpl
def gooddrag_register_runners():
    return [RayRunner]
