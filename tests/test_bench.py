"""`gooddrag bench` and `gooddrag score` end to end on tiny synthetic datasets (tiny-random model,
working width 64, one gradient step), through the in-process CLI entry ``main(argv)``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gooddrag.app.cli import main
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.registry import default_registry
from gooddrag.plugins.runners.local import LocalRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_datasets import write_dragbench_sample, write_drag100_sample  # noqa: E402

FAST = ["--model", "tiny-random", "--lora", "off", "--device", "cpu", "--width", "64",
        "-p", "schedule.drag_timesteps=1", "-p", "schedule.drags_per_timestep=1", "-p", "schedule.steps_per_drag=1",
        "-p", "schedule.num_inference_steps=10"]
FAIL_SIZE = (48, 12)  # the sample with this image size fails in the tests that inject a failure



@pytest.fixture
def d100(tmp_path) -> Path:
    root = tmp_path / "d100"
    write_drag100_sample(root, "cat_0", w=48, h=8, points=((8, 4), (16, 4)), seed=0)
    # the last pair has its handle on its target (as in Drag100's plants_3): kept, not dragged
    write_drag100_sample(root, "nature_1", w=48, h=8, points=((30, 3), (24, 5), (10, 2), (12, 6), (40, 4), (40, 4)),
                         seed=1)
    write_drag100_sample(root, "car_2", w=FAIL_SIZE[0], h=FAIL_SIZE[1], points=((20, 6), (28, 6)), seed=2)
    return root


class Hooks:
    """Counts finished edits; optionally fails or interrupts an edit."""

    def __init__(self, fail_size=None, interrupt_at=None):
        self.started = 0
        self.finished = []
        self.fail_size, self.interrupt_at = fail_size, interrupt_at

    @hookimpl
    def gooddrag_edit_started(self, config, image_size, points):
        self.started += 1
        if self.interrupt_at == self.started:
            raise KeyboardInterrupt
        if self.fail_size is not None and tuple(image_size) == self.fail_size:
            raise RuntimeError("injected failure")

    @hookimpl
    def gooddrag_edit_finished(self, result):
        self.finished.append(result.report["image_size"])


def run_cli(args, hooks=None) -> int:
    pm = default_registry().pm
    if hooks is not None:
        pm.register(hooks)
    try:
        return main([str(a) for a in args])
    finally:
        if hooks is not None:
            pm.unregister(hooks)


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".partial-") or p.name.endswith(".tmp")]


def test_bench_writes_report_records_failures_and_resumes(d100, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", d100, "--out", out, *FAST]
    hooks = Hooks(fail_size=FAIL_SIZE)
    assert run_cli(args, hooks) == 0
    assert len(hooks.finished) == 2
    for name in ("results.csv", "summary.json", "report.md", "plot_dist_dai.png", "plot_time.png",
                 "plot_best_worst.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "results.csv")
    assert list(rows) == ["car_2", "cat_0", "nature_1"]
    assert rows["car_2"]["status"] == "failed" and "injected failure" in rows["car_2"]["error"]
    assert rows["car_2"]["dai_1"] == ""
    for sid in ("cat_0", "nature_1"):
        r = rows[sid]
        assert r["status"] == "ok" and r["error"] == "" and float(r["dai_1"]) > 0 and float(r["dai_pairmean_20"]) > 0
        assert float(r["time_total_s"]) > 0 and float(r["time_drag_s"]) >= 0
        for f in ("result.png", "points.png", "run.json"):
            assert (out / "samples" / sid / f).is_file()
    assert rows["nature_1"]["n_pairs"] == "3"
    finals = json.loads(rows["nature_1"]["final_handles_xy"])
    assert len(finals) == 3 and finals[2] == [40, 4]
    run = json.loads((out / "samples" / "nature_1" / "run.json").read_text())
    assert run["bench"]["dragged_pairs"] == [0, 1] and len(run["final_handles_xy"]) == 2
    assert run["bench"]["final_handles_xy_all_pairs"] == finals and run["bench"]["sample"] == "nature_1"
    assert rows["cat_0"]["group"] == "animal" and rows["car_2"]["group"] == "object"
    assert not (out / "samples" / "car_2").exists()  # a failed edit leaves nothing behind
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "failed": 1, "missing": 0, "total": 3, "skipped": 0, "edited": 3,
                                 "malformed": 0}
    assert summary["failed"] == [{"id": "car_2", "error": "RuntimeError: injected failure"}]
    assert summary["config"]["schedule_params"]["num_inference_steps"] == 10 and summary["config"]["width"] == 64
    overall = summary["aggregate"]["overall"]["dai"]
    assert overall["dai_1"] == pytest.approx(np.mean([float(rows[s]["dai_1"]) for s in ("cat_0", "nature_1")]))
    assert set(summary["aggregate"]["by_group"]) == {"animal", "landscape", "object"}
    report = (out / "report.md").read_text()
    assert "## Failed samples" in report and "car_2" in report and "![dai](plot_dist_dai.png)" in report
    assert "| animal |" in report
    assert Image.open(out / "plot_best_worst.png").size[0] > 100
    mtimes = {s: (out / "samples" / s / "run.json").stat().st_mtime_ns for s in ("cat_0", "nature_1")}
    capsys.readouterr()

    # re-run: finished samples are skipped, the failed one is retried
    hooks = Hooks()
    assert run_cli(args, hooks) == 0
    assert hooks.finished == [list(FAIL_SIZE)]
    assert {s: (out / "samples" / s / "run.json").stat().st_mtime_ns for s in mtimes} == mtimes
    rows2 = read_csv(out / "results.csv")
    assert all(r["status"] == "ok" for r in rows2.values())
    assert rows2["cat_0"]["dai_1"] == rows["cat_0"]["dai_1"] and rows2["cat_0"]["resumed"] == "true"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 3, "failed": 0, "missing": 0, "total": 3, "skipped": 2, "edited": 1,
                                 "malformed": 0}
    assert "resuming: 2 of 3" in capsys.readouterr().err

    # a third run with nothing to do loads no model and edits nothing
    hooks = Hooks()
    assert run_cli(args, hooks) == 0 and hooks.started == 0

    # resuming with another config is refused before any edit
    hooks = Hooks()
    assert run_cli([*args, "--seed", "3"], hooks) == 2 and hooks.started == 0
    assert "was made with another config (seed: 0 there, 3 now)" in capsys.readouterr().err

    # --force redoes the selected samples
    before = (out / "samples" / "car_2" / "run.json").stat().st_mtime_ns
    hooks = Hooks()
    assert run_cli([*args, "--force", "--limit", "1"], hooks) == 0 and hooks.finished == [list(FAIL_SIZE)]
    assert (out / "samples" / "car_2" / "run.json").stat().st_mtime_ns != before
    assert not leftovers(out)


def test_interrupted_bench_leaves_no_partial_files_and_resumes(d100, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", d100, "--out", out, *FAST]
    hooks = Hooks(interrupt_at=2)  # Ctrl-C during the second edit
    assert run_cli(args, hooks) == 130
    assert len(hooks.finished) == 1
    err = capsys.readouterr().err
    assert "interrupted: 1 of 3 samples are recorded" in err and "Traceback" not in err
    assert not leftovers(out)
    assert sorted(p.parent.name for p in (out / "samples").rglob("run.json")) == ["car_2"]
    assert not (out / "samples" / "cat_0").exists()
    rows = read_csv(out / "results.csv")
    assert [rows[s]["status"] for s in ("car_2", "cat_0", "nature_1")] == ["ok", "missing", "missing"]
    assert json.loads((out / "summary.json").read_text())["counts"]["missing"] == 2

    # what a SIGKILL would leave: staging folders in a finished and in a pending sample
    (out / "samples" / "car_2" / ".partial-killed").mkdir()
    (out / "samples" / "cat_0" / ".partial-killed").mkdir(parents=True)
    (out / "samples" / "cat_0" / ".partial-killed" / "result.png").write_bytes(b"half")
    hooks = Hooks()
    assert run_cli(args, hooks) == 0
    assert len(hooks.finished) == 2  # only the two unfinished samples
    assert not list((out / "samples").rglob(".partial-*"))
    rows = read_csv(out / "results.csv")
    assert all(r["status"] == "ok" for r in rows.values())
    assert [rows[s]["resumed"] for s in ("car_2", "cat_0", "nature_1")] == ["true", "false", "false"]


def test_bench_validates_everything_before_the_model_loads(d100, tmp_path, capsys, monkeypatch):
    from gooddrag.core.editor import Editor

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Editor, "from_pretrained", no_load)
    out = tmp_path / "out"
    cases = [
        (["--metrics", "dai,nope"], "unknown metric 'nope'; available: "),
        (["--metric-param", "dai.gammas=x"], "bad value for metric.gammas"),
        (["--shard", "3/3"], "--shard '3/3': need n >= 1 and 0 <= i < n"),
        (["--shard", "1"], "--shard '1': write it as i/n"),
        (["--limit", "0"], "--limit 0: give a positive number"),
        (["-p", "schedule.nope=1"], "unknown parameter schedule.nope"),
        (["--dataset", "dragbench"], "does not look like a dragbench folder (DragBench: <category>/<sample>/"),
        (["--runner", "nope"], "unknown runner 'nope'; available: local, ray"),
        (["--runner-param", "ray.address=auto"], "runner parameter 'ray.address=auto' is for 'ray', but --runner is 'local'"),
        (["--runner-param", "address=auto"], "bad runner parameter 'address=auto'; write it as runner.field=value"),
        (["--runner", "ray", "--runner-param", "ray.workers=-1"], "bad value for runner.workers: 'workers' must be >= 0"),
        (["--runner", "ray", "--runner-param", "ray.nope=1"], "unknown parameter runner.nope for runner 'ray'"),
        (["--dtype", "fp8"], "dtype 'fp8' is not supported"),
        (["--lora", str(tmp_path / "missing-lora")], "no such file or folder"),
        (["--bogus"], "No such option: --bogus"),
    ]
    for extra, message in cases:
        assert run_cli(["bench", d100, "--out", out, *FAST, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (extra, err)
    assert run_cli(["bench", d100, *FAST]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert run_cli(["bench", tmp_path / "nothing-here", "--out", out, *FAST]) == 2
    assert not (out / "samples").exists()


def _copy_originals_flat(dataset, ids, dest: Path, sep: str | None = None) -> dict:
    samples = {s.id: s for s in dataset}
    for sid in ids:
        name = sid if sep is None else sid.replace("/", sep)
        path = dest / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        samples[sid].image.save(path)  # lossless copy of the decoded original
    return samples


def _unchanged_dai(sample, g: int) -> float:
    f = np.asarray(sample.image, dtype=np.float64) / 255.0
    total = 0.0
    for (hx, hy), (tx, ty) in sample.pairs:
        hx, hy, tx, ty = int(hx), int(hy), int(tx), int(ty)
        a = f[hy - g:hy + g + 1, hx - g:hx + g + 1]
        b = f[ty - g:ty + g + 1, tx - g:tx + g + 1]
        total += float(((a - b) ** 2).sum())
    n = len(sample.pairs)
    return total / n / (2 * g + 1) ** 2 / n


def test_score_flat_copies_of_the_originals(tmp_path, capsys):
    from gooddrag.plugins.datasets.drag100 import Drag100

    root = tmp_path / "d100"
    write_drag100_sample(root, "cat_0", w=40, h=30, points=((10, 10), (20, 15), (25, 20), (30, 12)), seed=0)
    write_drag100_sample(root, "dog_1", w=40, h=30, points=((12, 12), (18, 18)), seed=1)
    write_drag100_sample(root, "owl_2", w=40, h=30, seed=2)
    res = tmp_path / "res"
    samples = _copy_originals_flat(Drag100().samples(root), ["cat_0", "dog_1"], res)  # owl_2 has no result
    out = tmp_path / "scored"
    assert run_cli(["score", res, root, "--metric-param", "dai.gammas=1,3", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "2 ok, 0 failed, 1 missing of 3" in printed and "dai_1" in printed
    rows = read_csv(out / "results.csv")
    assert rows["owl_2"]["status"] == "missing" and rows["owl_2"]["dai_1"] == ""
    for sid in ("cat_0", "dog_1"):
        for g in (1, 3):
            assert float(rows[sid][f"dai_{g}"]) == pytest.approx(_unchanged_dai(samples[sid], g), rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["missing"] == 1 and summary["missing"] == ["owl_2"]
    want = np.mean([_unchanged_dai(samples[s], 1) for s in ("cat_0", "dog_1")])
    assert summary["aggregate"]["overall"]["dai"]["dai_1"] == pytest.approx(want, rel=1e-6)
    assert "## Missing samples" in (out / "report.md").read_text()
    assert not (res / "results.csv").exists()


def test_score_our_layout_and_dragbench_ids(tmp_path, capsys):
    from gooddrag.plugins.datasets.dragbench import DragBench

    root = tmp_path / "db"
    write_dragbench_sample(root, "animals", "JH_1", w=40, h=30, seed=0)
    write_dragbench_sample(root, "animals", "JH_2", w=40, h=30, seed=1)
    write_dragbench_sample(root, "art_work", "PJC_1", w=40, h=30, seed=2)
    write_dragbench_sample(root, "art_work", "PJC_2", w=40, h=30, seed=3)
    res = tmp_path / "res"
    samples = _copy_originals_flat(DragBench().samples(root), ["animals/JH_1"], res)  # nested: animals/JH_1.png
    _copy_originals_flat(DragBench().samples(root), ["animals/JH_2"], res, sep="__")  # flat: animals__JH_2.png
    d = res / "art_work" / "PJC_1"  # our layout: <id>/result.png + run.json
    d.mkdir(parents=True)
    samples["art_work/PJC_1"].image.resize((20, 15)).save(d / "result.png")  # wrong size: recorded as failed
    d = res / "art_work" / "PJC_2"
    d.mkdir(parents=True)
    samples["art_work/PJC_2"].image.save(d / "result.png")
    (d / "run.json").write_text(json.dumps({"final_handles": [[5, 8]], "timings_s": {"drag": 1.5}}))
    assert run_cli(["score", res, root, "--dataset", "auto"]) == 0
    rows = read_csv(res / "results.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"animals/JH_1": "ok", "animals/JH_2": "ok",
                                                        "art_work/PJC_1": "failed", "art_work/PJC_2": "ok"}
    assert "result is 20x15 but the original is 40x30" in rows["art_work/PJC_1"]["error"]
    assert rows["art_work/PJC_2"]["final_handles_xy"] == "[[5, 8]]" and rows["art_work/PJC_2"]["time_drag_s"] == "1.5"
    for sid in ("animals/JH_1", "animals/JH_2", "art_work/PJC_2"):
        assert float(rows[sid]["dai_1"]) == pytest.approx(_unchanged_dai(samples[sid], 1), rel=1e-6)
    summary = json.loads((res / "summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and set(summary["aggregate"]["by_group"]) == {"animals", "art_work"}
    capsys.readouterr()
    assert run_cli(["score", tmp_path / "absent", root]) == 2
    assert "results folder" in capsys.readouterr().err
    assert run_cli(["score", res, root, "--metrics", "dai,dai"]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_local_runner_loads_no_worker_without_jobs():
    made = []

    def make_worker():
        made.append(1)
        return lambda job: job * 2

    runner = LocalRunner()
    assert list(runner.run([], make_worker)) == [] and made == []
    assert list(runner.run([1, 2, 3], make_worker)) == [2, 4, 6] and made == [1]
    from gooddrag.testing import check_component

    check_component("runner", LocalRunner)
    assert default_registry().get("runner", "local") is LocalRunner


def test_score_on_a_bench_folder_reads_samples_subfolder(tmp_path):
    from gooddrag.app.bench.score import find_result

    (tmp_path / "samples" / "cat" / "x").mkdir(parents=True)
    (tmp_path / "samples" / "cat" / "x" / "result.png").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "output_image.png").write_bytes(b"")
    assert find_result(tmp_path, "cat/x") == tmp_path / "samples" / "cat" / "x" / "result.png"
    assert find_result(tmp_path, "y") == tmp_path / "y.jpg"
    assert find_result(tmp_path, "z") == tmp_path / "z" / "output_image.png"
    assert find_result(tmp_path, "w") is None


DRAG100 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "drag100"


@pytest.mark.skipif(not (DRAG100 / "index.json").is_file(), reason="../shared/data/drag100 not present")
def test_score_unedited_real_drag100_copies_equals_an_independent_dai(tmp_path, capsys):
    ids = ["antelopes_0", "art_0", "art_1"]
    res = tmp_path / "copies"
    res.mkdir()
    want = {}
    for sid in ids:
        im = Image.open(DRAG100 / sid / "original.jpg").convert("RGB")
        im.save(res / f"{sid}.png")  # lossless copy of the decoded original
        f = np.asarray(im, dtype=np.float64) / 255
        pts = json.loads((DRAG100 / sid / "points.json").read_text())["points"]
        pairs = [(pts[i], pts[i + 1]) for i in range(0, len(pts), 2)]
        n = len(pairs)
        for g in (1, 5, 10, 20):  # the official script: sum over pairs / N / (2g+1)^2 / N
            ssd = sum(((f[hy - g:hy + g + 1, hx - g:hx + g + 1] - f[ty - g:ty + g + 1, tx - g:tx + g + 1]) ** 2).sum()
                      for (hx, hy), (tx, ty) in pairs)
            want[(sid, g)] = ssd / n / (2 * g + 1) ** 2 / n
    assert run_cli(["score", res, DRAG100, "--out", tmp_path / "scored"]) == 0
    rows = read_csv(tmp_path / "scored" / "results.csv")
    assert sum(r["status"] == "missing" for r in rows.values()) == 97
    for (sid, g), value in want.items():
        assert float(rows[sid][f"dai_{g}"]) == pytest.approx(value, rel=1e-6)
    assert want[("antelopes_0", 1)] == pytest.approx(0.16493315, rel=1e-6)  # the value in the closing note


# --- two runs on one --out ------------------------------------------------------------------------

_HOLDER = r"""
import os, sys, time
from pathlib import Path
from gooddrag.core.editor import Editor
from gooddrag.app.cli import main

go, ready = Path(sys.argv[1]), Path(sys.argv[2])
real = Editor.from_pretrained.__func__

def paused(cls, *a, **k):  # holds the lock (taken before any model loads) until the test says go
    ready.write_text(str(os.getpid()))
    for _ in range(1200):  # at most a minute
        if go.exists():
            break
        time.sleep(0.05)
    return real(cls, *a, **k)

Editor.from_pretrained = classmethod(paused)
sys.exit(main(sys.argv[3:]))
"""


def test_second_bench_on_the_same_out_is_refused_naming_the_holder(d100, tmp_path):
    import os
    import subprocess

    out, go, ready = tmp_path / "o", tmp_path / "go", tmp_path / "ready"
    args = ["bench", str(d100), "--out", str(out), "--limit", "1", *FAST]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, str(go), str(ready), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # bounded: the first run is validating, then takes the lock
            if ready.exists() or first.poll() is not None:
                break
            import time
            time.sleep(0.05)
        assert ready.exists(), first.communicate()[1]
        second = subprocess.run([sys.executable, "-c", "import sys; from gooddrag.app.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", *args], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: --out {str(out)!r} is in use by another gooddrag bench "
                                         f"(process {first.pid}); wait for it to finish, or use another --out")
        assert not (out / "samples").exists()  # the refused run touched nothing
    finally:
        first.kill()  # a killed holder leaves no stale lock: the kernel drops it
        first.wait()
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["ok"]


def test_shards_share_one_out_but_a_shard_runs_once(d100, tmp_path):
    from gooddrag.app.bench.lock import lock_out
    from gooddrag.core.errors import BadInputError

    out = tmp_path / "o"
    out.mkdir()
    a, b, c = [], [], []
    lock_out(out, (0, 2), a)
    lock_out(out, (1, 2), b)  # another shard: fine
    import os
    with pytest.raises(BadInputError, match=rf"in use by another gooddrag bench \(process {os.getpid()}\)"):
        lock_out(out, (0, 2), c)
    with pytest.raises(BadInputError, match="in use by another gooddrag bench"):
        lock_out(out, None, c)  # a full run while shards run
    for fh in a + b:
        fh.close()
    lock_out(out, None, c)
    for fh in c:
        fh.close()


# --- malformed samples are recorded, not fatal -------------------------------------------------------


def test_malformed_samples_are_recorded_as_failed_and_the_rest_runs(d100, tmp_path, capsys):
    (d100 / "cat_0" / "points.json").write_text('{"points": [[1, 2]]}')
    (d100 / "car_2" / "points.json").write_text('{"points": [["8", "4"], [16, 4]]}')
    out = tmp_path / "out"
    assert run_cli(["bench", d100, "--out", out, *FAST]) == 0
    err = capsys.readouterr()
    assert "malformed, recorded as failed: sample 'cat_0': points.json: 1 points, an odd number" in err.err
    assert "1 ok, 2 failed (2 malformed), 0 missing of 3 samples" in err.out
    rows = read_csv(out / "results.csv")
    assert rows["cat_0"]["status"] == "failed" and "1 points, an odd number" in rows["cat_0"]["error"]
    assert rows["car_2"]["status"] == "failed" and "point 1 is" in rows["car_2"]["error"]
    assert rows["nature_1"]["status"] == "ok"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 2 and summary["counts"]["malformed"] == 2
    assert {f["id"] for f in summary["failed"]} == {"cat_0", "car_2"}


def test_score_records_a_bad_run_json_or_a_bomb_result_by_sample(d100, tmp_path, capsys, monkeypatch):
    results = tmp_path / "res"
    for sid in ("cat_0", "nature_1", "car_2"):
        (results / sid).mkdir(parents=True)
        Image.new("RGB", (48, 8) if sid != "car_2" else FAIL_SIZE).save(results / sid / "result.png")
    (results / "cat_0" / "run.json").write_text(json.dumps({"final_handles": 3, "timings_s": [1, 2],
                                                             "bench": ["x"]}))
    (results / "nature_1" / "run.json").write_text(json.dumps({"final_handles": [[1, 2]], "timings_s": {"a": "b"}}))
    Image.new("RGB", (200, 200)).save(results / "car_2" / "result.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40000 - 1)
    assert run_cli(["score", results, d100, "--out", tmp_path / "s"]) == 0
    rows = read_csv(tmp_path / "s" / "results.csv")
    assert rows["cat_0"]["status"] == "failed" and "run.json has a field of the wrong type" in rows["cat_0"]["error"]
    assert rows["cat_0"]["error"].startswith("sample 'cat_0': ")
    assert rows["nature_1"]["status"] == "ok"
    assert rows["car_2"]["status"] == "failed" and rows["car_2"]["error"].startswith("sample 'car_2': result ")
    assert "over the limit of 39999 pixels" in rows["car_2"]["error"]


def test_results_csv_never_holds_a_spreadsheet_formula():
    from gooddrag.app.bench.results import results_csv

    rows = [{"id": i, "group": "=g", "status": "failed", "error": "@SUM(A1)", "n_pairs": 1, "scores": {},
             "final_handles": None, "timings": {}, "resumed": False}
            for i in ("=HYPERLINK(\"http://x\")", "+1", "-2", "@a", "plain")]
    got = list(csv.reader(results_csv(rows, []).splitlines()))[1:]
    assert [r[0] for r in got] == ["'=HYPERLINK(\"http://x\")", "'+1", "'-2", "'@a", "plain"]
    assert all(r[1] == "'=g" and r[3] == "'@SUM(A1)" for r in got)


class ExitingPlugin:
    @hookimpl
    def gooddrag_edit_started(self, config, image_size, points):
        if tuple(image_size) == FAIL_SIZE:
            raise SystemExit(0)


def test_a_plugin_calling_sys_exit_fails_its_sample_not_the_bench(d100, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["bench", d100, "--out", out, *FAST], ExitingPlugin()) == 0
    rows = read_csv(out / "results.csv")
    assert rows["car_2"]["status"] == "failed" and rows["car_2"]["error"] == "SystemExit: 0"
    assert rows["cat_0"]["status"] == "ok" and rows["nature_1"]["status"] == "ok"
    assert "2 ok, 1 failed" in capsys.readouterr().out


def test_reports_say_how_dragging_ended_and_show_the_unedited_baseline(d100, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["bench", d100, "--out", out, *FAST, "--baseline", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "unedited input" in printed and "reached their targets" in printed
    rows = read_csv(out / "results.csv")
    summary = json.loads((out / "summary.json").read_text())
    for sid in ("car_2", "cat_0"):
        run = json.loads((out / "samples" / sid / "run.json").read_text())
        r = rows[sid]
        assert r["stop_reason"] == run["stop_reason"] and r["reached"] == str(run["stop_reason"] == "reached").lower()
        sample_pairs = run["bench"]["pairs_xy"]
        want = np.mean([np.hypot(f[0] - t[0], f[1] - t[1])
                        for f, (_, t) in zip(run["bench"]["final_handles_xy_all_pairs"], sample_pairs)])
        assert float(r["final_dist_px"]) == pytest.approx(want, abs=1e-3)
        (s,) = [x for x in summary["samples"] if x["id"] == sid]
        assert s["stop_reason"] == r["stop_reason"] and s["final_dist_px"] == pytest.approx(want, abs=1e-3)
    drag = summary["drag"]
    assert drag["samples"] == 2 and sum(drag["stop_reasons"].values()) == 2
    assert drag["reached_rate"] == drag["reached"] / 2 and drag["final_dist_px"]["n"] == 2
    base = summary["aggregate"]["baseline_unedited"]["dai"]["dai_1"]
    assert base == pytest.approx(np.mean([_unchanged_dai(s, 1) for s in _samples(d100, ("car_2", "cat_0"))]))
    report = (out / "report.md").read_text()
    assert "## Dragging" in report and f"in **{drag['reached']} of 2** samples" in report
    assert "| metric | key | value | unedited input |" in report and "![final handle-to-target distance]" in report
    assert (out / "plot_drag.png").is_file()


def _samples(root, ids):
    from gooddrag.plugins.datasets.drag100 import Drag100

    return [s for s in Drag100().samples(root) if s.id in ids]


def test_score_a_subset(d100, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["bench", d100, "--out", out, *FAST, "--limit", "2"]) == 0
    capsys.readouterr()
    assert run_cli(["score", out, d100, "--limit", "2", "--out", tmp_path / "s1"]) == 0
    assert "2 ok, 0 failed, 0 missing of 2 samples" in capsys.readouterr().out
    assert run_cli(["score", out, d100, "--samples", "cat_0", "--out", tmp_path / "s2"]) == 0
    assert "1 ok, 0 failed, 0 missing of 1 samples" in capsys.readouterr().out
    assert list(read_csv(tmp_path / "s2" / "results.csv")) == ["cat_0"]
    assert run_cli(["score", out, d100, "--samples", "dog_9", "--out", tmp_path / "s3"]) == 2
    assert "sample 'dog_9' is not in" in capsys.readouterr().err
