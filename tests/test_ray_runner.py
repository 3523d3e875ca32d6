"""The Ray runner (``gooddrag bench --runner ray``) on a local 2-CPU Ray instance with the tiny-random
model: same files as the local runner, a crashed actor replaced, interrupt and resume.

Ray binds on every interface and advertises the machine's own address, so its cluster may only run
inside a network namespace that has nothing but loopback. Run normally, this module re-runs itself
under ``unshare -rn`` (test_ray_cases_in_a_loopback_only_namespace); in there (GOODDRAG_RAY_NETNS=1)
the cases marked ``in_netns`` run against one Ray instance shared by all of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from gooddrag.core.config import LoadOptions
from PIL import Image

from gooddrag.app.bench.run import BenchOptions, run_bench
from gooddrag.core.hookspecs import hookimpl

sys.path.insert(0, str(Path(__file__).parent))
from test_bench import FAST, leftovers, read_csv, run_cli  # noqa: E402
from test_datasets import write_drag100_sample  # noqa: E402

IN_NETNS = os.environ.get("GOODDRAG_RAY_NETNS") == "1"
in_netns = pytest.mark.skipif(not IN_NETNS, reason="runs in the loopback-only network namespace that "
                                                   "test_ray_cases_in_a_loopback_only_namespace starts")
#: the four samples: id -> image size (w, h); the hooks below pick samples by image size
SIZES = {"cat_0": (48, 8), "dog_1": (40, 8), "car_2": (48, 12), "owl_3": (40, 12)}
#: the tests marked in_netns: the inner run runs exactly these, and all must pass
INNER = ("test_ray_bench_writes_what_the_local_runner_writes",
         "test_a_killed_actor_is_replaced_and_every_sample_comes_back_once",
         "test_an_interrupted_ray_bench_resumes_without_redoing_finished_samples",
         "test_a_worker_that_cannot_load_the_model_stops_the_run_with_its_error")


# --- outside: start the namespace ----------------------------------------------------------------


def _unshare_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=60)
    return probe.returncode == 0


def test_ray_cases_in_a_loopback_only_namespace(tmp_path):
    if IN_NETNS:
        pytest.skip("already inside the namespace")
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[test]' installs it)")
    if not _unshare_works():
        pytest.skip("'unshare -rn' (a user + network namespace) is not permitted here, and Ray may only run "
                    "with loopback alone")
    env = {**os.environ, "GOODDRAG_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
           *(f"{Path(__file__).resolve()}::{name}" for name in INNER)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500,
                       cwd=Path(__file__).resolve().parents[1])
    out = r.stdout + r.stderr
    print(out[-6000:])
    assert r.returncode == 0, out[-6000:]
    assert f"{len(INNER)} passed" in out and "skipped" not in out and "deselected" not in out, out[-3000:]


# --- inside: one Ray instance for every case ----------------------------------------------------------


def _interfaces() -> list[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]  # this process's network namespace
    return sorted(line.split(":")[0].strip() for line in lines)


@pytest.fixture(scope="session")
def ray_instance():
    if _interfaces() != ["lo"]:
        pytest.fail(f"refusing to start Ray: this network namespace has {_interfaces()}, not loopback alone")
    import ray

    temp = tempfile.mkdtemp(prefix="gdray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below travel to the actors
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_cluster(ray_instance):
    """The shared instance; after the test, no actor of the bench may still hold a CPU slot."""
    yield ray_instance
    deadline = time.monotonic() + 60
    while ray_instance.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_instance.available_resources().get("CPU", 0) == 2, "the bench left actors behind"


@pytest.fixture
def d4(tmp_path) -> Path:
    root = tmp_path / "d4"
    pts = {"cat_0": ((8, 4), (16, 4)), "dog_1": ((30, 3), (24, 5)), "car_2": ((20, 6), (28, 6)),
           "owl_3": ((10, 6), (18, 4))}
    for i, (sid, (w, h)) in enumerate(SIZES.items()):
        write_drag100_sample(root, sid, w=w, h=h, points=pts[sid], seed=i)
    return root


def _opts(d4: Path, out: Path, **kw) -> BenchOptions:
    params = tuple(FAST[i + 1] for i, a in enumerate(FAST) if a == "-p")
    return BenchOptions(dataset_dir=d4, out=out, load=LoadOptions(model="tiny-random", device="cpu"), lora="off", width=64,
                        params=params, **kw)


class Faults:
    """Runs in the actors. Logs each edit's start to ``log_dir/<sample>`` (one line per attempt, with
    the pid); kills the actor on the first attempt at ``crash_once``, on every attempt at
    ``crash_always``, and raises at ``fail``."""

    def __init__(self, log_dir: Path, crash_once=None, crash_always=None, fail=None):
        self.log_dir, self.crash_once, self.crash_always, self.fail = str(log_dir), crash_once, crash_always, fail

    @hookimpl
    def gooddrag_edit_started(self, config, image_size, points):
        size = tuple(image_size)
        sid = next(k for k, v in SIZES.items() if v == size)
        path = Path(self.log_dir) / sid
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        attempts = len(path.read_text().splitlines())
        if size == self.crash_always or (size == self.crash_once and attempts == 1):
            os._exit(3)  # the actor process dies mid-sample, as on a segfault or OOM kill
        if size == self.fail:
            raise RuntimeError("injected failure")


def _attempts(log_dir: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().split() for p in sorted(log_dir.iterdir())}


def _run_json_without_runtime(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("timings_s", "peak_memory_mb", "peak_rss_mb"):
        data.pop(key, None)
    data["bench"].pop("worker")
    return data


@in_netns
def test_ray_bench_writes_what_the_local_runner_writes(d4, tmp_path, ray_cluster, capsys):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert run_cli(["bench", d4, "--out", local, *FAST]) == 0
    assert run_cli(["bench", d4, "--out", remote, *FAST, "--runner", "ray"]) == 0
    a, b = read_csv(local / "results.csv"), read_csv(remote / "results.csv")
    assert list(a) == list(b) == sorted(SIZES)
    for sid in SIZES:
        assert a[sid]["status"] == "ok"
        same = {k: v for k, v in a[sid].items() if not k.startswith("time_")}
        assert {k: v for k, v in b[sid].items() if not k.startswith("time_")} == same, sid
        sa, sb = local / "samples" / sid, remote / "samples" / sid
        assert sorted(p.name for p in sb.iterdir()) == sorted(p.name for p in sa.iterdir())
        for name in ("result.png", "points.png"):
            assert np.array_equal(np.asarray(Image.open(sa / name)), np.asarray(Image.open(sb / name))), (sid, name)
        assert _run_json_without_runtime(sb / "run.json") == _run_json_without_runtime(sa / "run.json")
    summary = json.loads((remote / "summary.json").read_text())
    assert summary["counts"] == json.loads((local / "summary.json").read_text())["counts"]
    assert summary["config"]["runner"] == "ray"
    # both actors started; each takes a sample as soon as its model is loaded, so on a loaded machine
    # one may finish all four before the other is ready: which ones edited is timing, not asserted
    # (that once made this test flaky); node and device are recorded for every sample
    assert {p["worker"] for p in summary["placement"].values()} <= {"w0", "w1"}
    assert all(p["device"] == "cpu" and p["node"] for p in summary["placement"].values())
    tp = summary["throughput"]
    assert tp["workers"] == 2 and tp["edited"] == 4 and tp["samples_per_hour_per_worker"] > 0
    report = (remote / "report.md").read_text()
    assert "## Workers and throughput" in report and "samples/hour/worker" in report
    assert "| cat_0 | w" in report
    assert not leftovers(remote)


@in_netns
def test_a_killed_actor_is_replaced_and_every_sample_comes_back_once(d4, tmp_path, ray_cluster):
    log_dir = tmp_path / "attempts"
    log_dir.mkdir()
    faults = Faults(log_dir, crash_once=SIZES["dog_1"], crash_always=SIZES["owl_3"], fail=SIZES["car_2"])
    lines: list[str] = []
    out = tmp_path / "out"
    summary = run_bench(_opts(d4, out, runner="ray", runner_params=("ray.max_retries=1",)), plugins=[faults],
                        log=lines.append, tty=False)
    tries = _attempts(log_dir)
    # dog_1: killed its actor once, edited by the restarted actor (another process)
    assert len(tries["dog_1"]) == 2 and tries["dog_1"][0] != tries["dog_1"][1]
    # car_2 raised: recorded as failed once, never retried
    assert len(tries["car_2"]) == 1
    # owl_3 kills its actor every time: tried 1 + max_retries times, then recorded as failed once
    assert len(tries["owl_3"]) == 2
    assert len(tries["cat_0"]) == 1
    rows = read_csv(out / "results.csv")
    assert sorted(rows) == sorted(SIZES)  # every sample exactly once
    assert {k: r["status"] for k, r in rows.items()} == {"cat_0": "ok", "dog_1": "ok", "car_2": "failed",
                                                        "owl_3": "failed"}
    assert rows["car_2"]["error"] == "RuntimeError: injected failure"
    assert rows["owl_3"]["error"].startswith("the Ray worker died editing it (1 retries)")
    assert summary["counts"] == {"ok": 2, "failed": 2, "missing": 0, "total": 4, "skipped": 0, "edited": 4,
                                 "malformed": 0}
    assert sum("died and was restarted" in line for line in lines) >= 2, lines
    assert sum(line.startswith("[") and "/4] " in line for line in lines) == 4  # one progress line per sample
    for sid in ("cat_0", "dog_1"):
        assert sorted(p.name for p in (out / "samples" / sid).iterdir()) == ["points.png", "result.png", "run.json",
                                                                             "scores.json"]
    assert not (out / "samples" / "car_2").exists() and not (out / "samples" / "owl_3").exists()
    assert not leftovers(out)


@in_netns
def test_an_interrupted_ray_bench_resumes_without_redoing_finished_samples(d4, tmp_path, ray_cluster):
    out = tmp_path / "out"

    def ctrl_c_after_two(line: str) -> None:  # the driver is interrupted once two samples are recorded
        if line.startswith("[2/4]"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(_opts(d4, out, runner="ray"), log=ctrl_c_after_two, tty=False)
    rows = read_csv(out / "results.csv")
    done = sorted(k for k, r in rows.items() if r["status"] == "ok")
    assert len(done) == 2 and sorted(r["status"] for r in rows.values()) == ["missing", "missing", "ok", "ok"]
    assert sorted(p.parent.name for p in (out / "samples").rglob("run.json")) == done
    assert not leftovers(out)
    mtimes = {s: (out / "samples" / s / "run.json").stat().st_mtime_ns for s in done}

    log_dir = tmp_path / "attempts"
    log_dir.mkdir()
    lines: list[str] = []
    summary = run_bench(_opts(d4, out, runner="ray"), plugins=[Faults(log_dir)], log=lines.append, tty=False)
    assert sorted(_attempts(log_dir)) == sorted(set(SIZES) - set(done))  # only the unfinished ones
    assert {s: (out / "samples" / s / "run.json").stat().st_mtime_ns for s in done} == mtimes
    assert summary["counts"] == {"ok": 4, "failed": 0, "missing": 0, "total": 4, "skipped": 2, "edited": 2,
                                 "malformed": 0}
    assert "resuming: 2 of 4 samples already edited" in lines
    rows = read_csv(out / "results.csv")
    assert [rows[s]["resumed"] for s in sorted(SIZES)] == ["true" if s in done else "false" for s in sorted(SIZES)]
    assert summary["throughput"]["edited"] == 2


class _CannotLoad:
    """A worker factory that fails as a model load does (in the actor)."""

    def __call__(self):
        from gooddrag.core.errors import ModelNotFoundError

        raise ModelNotFoundError("model 'nope' was not found; give a local folder")


@in_netns
def test_a_worker_that_cannot_load_the_model_stops_the_run_with_its_error(ray_cluster):
    from gooddrag.core.errors import ModelNotFoundError
    from gooddrag.plugins.runners.ray import RayRunner

    events = []
    with pytest.raises(ModelNotFoundError, match="model 'nope' was not found"):
        list(RayRunner().run(["a", "b", "c"], _CannotLoad(), events.append))
    assert not [e for e in events if e.kind in ("ready", "start")]


# --- anywhere: no Ray ----------------------------------------------------------------------------------


def test_without_ray_the_ray_runner_names_the_extra_before_any_model_loads(d4, tmp_path, capsys, monkeypatch):
    from gooddrag.core.editor import Editor

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Editor, "from_pretrained", no_load)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert run_cli(["bench", d4, "--out", tmp_path / "out", *FAST, "--runner", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --runner ray needs Ray, which cannot be imported")
    assert "pip install 'gooddrag[ray]'" in err
    assert not (tmp_path / "out").exists()


class _FakeRay:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_ray_runner_is_registered_and_plans_one_actor_per_gpu_or_cpu_slot():
    from gooddrag.core.errors import RunnerError
    from gooddrag.core.registry import default_registry
    from gooddrag.plugins.runners.ray import RayRunner
    from gooddrag.testing import check_component

    check_component("runner", RayRunner)
    assert default_registry().get("runner", "ray") is RayRunner
    plan = lambda n_jobs, **kw: RayRunner(RayRunner.Params(**kw))._plan(_FakeRay(**cluster), n_jobs)  # noqa: E731
    cluster = {"CPU": 64.0, "GPU": 8.0}
    assert plan(100) == (8, 1.0, 1.0)  # one actor per GPU
    assert plan(3) == (3, 1.0, 1.0)  # never more actors than samples
    assert plan(100, gpus_per_worker=2.0) == (4, 2.0, 1.0)
    assert plan(100, workers=5) == (5, 1.0, 1.0)
    cluster = {"CPU": 6.0}
    assert plan(100) == (6, 0.0, 1.0)  # no GPU: one actor per CPU slot
    assert plan(100, cpus_per_worker=4.0) == (1, 0.0, 4.0)
    with pytest.raises(RunnerError, match="too few for one worker of 1 GPUs"):
        plan(100, gpus_per_worker=1.0)
