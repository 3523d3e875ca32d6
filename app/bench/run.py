"""Running a benchmark: ``gooddrag bench`` (edit, then score, every sample) and ``gooddrag score``
(score any method's results), with resume and per-sample failure records.

Bench layout of ``--out DIR``::

    DIR/samples/<sample id>/result.png, points.png, run.json   one edit (written atomically)
    DIR/samples/<sample id>/scores.json                        cached scores of that edit
    DIR/results.csv, summary.json, report.md, plot_*.png

Lock: a run holds ``DIR/.lock`` (``fcntl.flock``) for its whole life: exclusively, or shared by the
shards of one run, each of which also holds ``DIR/.lock-shard-<i>-of-<n>`` exclusively and
``DIR/.lock-of-<n>`` shared. A second run on the same samples, or a shard with another ``n``, stops
at once with one line naming the holder's process id (or the other shard count), instead of
deleting the first one's staging folders and overwriting its tables.

Resume rule: a sample whose ``run.json`` is complete (valid JSON with ``final_handles``, next to its
``result.png``) is not edited again unless ``--force``; a failed or missing one is (re)tried.
``results.csv`` and ``summary.json`` are rewritten atomically after every sample, so an interrupted
run leaves consistent files (unfinished samples have status ``missing``) and the next run resumes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import attrs
from PIL import Image

from gooddrag.core.config import EditConfig, LoadOptions
from gooddrag.core.errors import BadInputError, ConfigError, GoodDragError, GoodDragWarning
from gooddrag.core.params import build_params, parse_assignments
from gooddrag.core.registry import Registry, default_registry
from gooddrag.core.runners import JobLost, RunnerEvent
from gooddrag.core.samples import MalformedSample, Sample
from gooddrag.app.bench.report import write_report
from gooddrag.app.bench.results import (METHOD_FIELDS, build_summary, drag_outcome, error_line, final_points, hash_file,
                                        metric_keys, new_row, placement_and_throughput, read_run_json, sample_dir,
                                        score_baseline, score_row,
                                        write_tables)
#: result files accepted by ``score`` inside a per-sample folder, in order of preference
RESULT_NAMES = ("result.png", "output_image.png", "dragged_image.png")
FLAT_EXTS = (".png", ".jpg", ".jpeg", ".webp")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- selection ----------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> (i, n); None -> None."""
    if text is None or text == "":
        return None
    i, sep, n = str(text).partition("/")
    try:
        if not sep:
            raise ValueError
        ii, nn = int(i), int(n)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: write it as i/n, e.g. --shard 0/4 (0-based i < n)") from None
    if nn < 1 or not 0 <= ii < nn:
        raise ConfigError(f"--shard {text!r}: need n >= 1 and 0 <= i < n, e.g. --shard 0/{max(nn, 2)}")
    return ii, nn


def open_dataset(registry: Registry, folder: Path, name: str = "auto") -> tuple[Any, str]:
    """The dataset reader for ``folder``: by name, or the single registered format that detects it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
    if name and name != "auto":
        cls = registry.get("dataset", name)
        if not cls.detect(folder):
            doc = (cls.__doc__ or "").strip().splitlines()
            raise BadInputError(f"{str(folder)!r} does not look like a {name} folder"
                                + (f" ({doc[0].rstrip('.')})" if doc else "") + "; check the path or --dataset")
    else:
        found = [cls for _, cls in registry.items("dataset") if cls.detect(folder)]
        if not found:
            raise BadInputError(f"{str(folder)!r} is not a dataset folder of any known format "
                                f"({', '.join(registry.names('dataset'))}); see docs/evaluation.md")
        if len(found) > 1:
            raise ConfigError(f"{str(folder)!r} looks like several formats ({', '.join(c.name for c in found)}); "
                              "pass --dataset NAME")
        cls = found[0]
    return cls(build_params("dataset", cls, {})), cls.name


def select_samples(dataset: Any, folder: Path, limit: int | None = None,
                   shard: tuple[int, int] | None = None) -> list[Sample]:
    """Samples sorted by id; ``limit`` keeps the first N, then ``shard`` (i, n) keeps every n-th from i."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of samples")
    out: list[Sample] = []
    for s in dataset.samples(Path(folder)):
        if limit is not None and len(out) >= limit:
            break
        out.append(s)
    out.sort(key=lambda s: s.id)
    if shard is not None:
        i, n = shard
        out = out[i::n]
    return out


def load_metrics(registry: Registry, names: str | Sequence[str], metric_params: Sequence[str] = ()) -> list[Any]:
    """Metric instances for a comma-separated list; ``metric_params`` are ``name.field=value``.
    Each metric's ``check()`` runs here (before any model loads)."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise ConfigError("--metrics is empty; pass e.g. --metrics dai")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--metrics {','.join(wanted)}: a metric is listed twice")
    given = parse_assignments(metric_params, "metric parameter", "metric.field=value, e.g. dai.gammas=1,5")
    for metric in given:
        if metric not in wanted:
            item = next(i for i in metric_params if i.strip().startswith(f"{metric}."))
            raise ConfigError(f"metric parameter {item!r} is for {metric!r}, which is not in --metrics")
    out = []
    for name in wanted:
        cls = registry.get("metric", name)
        metric = cls(build_params("metric", cls, given.get(name, {})))
        metric.check()
        out.append(metric)
    return out


def load_runner(registry: Registry, name: str, runner_params: Sequence[str] = ()) -> Any:
    """The runner instance; ``runner_params`` are ``name.field=value`` (e.g. ray.address=auto). Its
    ``check()`` runs here (before any model loads)."""
    cls = registry.get("runner", name)
    parsed = parse_assignments(runner_params, "runner parameter", "runner.field=value, e.g. ray.address=auto")
    for runner in parsed:
        if runner != name:
            item = next(i for i in runner_params if i.strip().startswith(f"{runner}."))
            raise ConfigError(f"runner parameter {item!r} is for {runner!r}, but --runner is {name!r}")
    runner = cls(build_params("runner", cls, parsed.get(name, {})))
    check = getattr(runner, "check", None)
    if check is not None:
        check()
    return runner


# --- bench ----------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class BenchOptions:
    """Everything ``gooddrag bench`` takes (the CLI fills it)."""

    dataset_dir: Path
    out: Path
    dataset: str = "auto"
    limit: int | None = None
    shard: str | None = None
    metrics: str = "dai"
    metric_params: tuple[str, ...] = ()
    force: bool = False
    runner: str = "local"
    runner_params: tuple[str, ...] = ()
    load: LoadOptions = attrs.field(factory=LoadOptions)
    preset: str = "gooddrag"
    schedule: str | None = None
    loss: str | None = None
    tracker: str | None = None
    params: tuple[str, ...] = ()
    lora: str = "auto"
    seed: int = 0
    width: int = 512
    prompts: bool = True
    baseline: bool = False  # also score the unedited inputs, shown beside the method in the report


def _method_diff(want: dict, have: dict) -> str | None:
    for f in METHOD_FIELDS:
        if f not in want or f not in have:
            continue
        a, b = want[f], have[f]
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b and a[k] != b[k]:
                    return f"{f}.{k}: {b[k]!r} there, {a[k]!r} now"
        elif a != b:
            return f"{f}: {b!r} there, {a!r} now"
    return None


class _Progress:
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


def _holders(paths: Iterable[Path]) -> list[str]:
    """Live process ids written in these lock files (a shared holder writes none: a full run
    blocked by shards finds them in the shards' files)."""
    pids: list[str] = []
    for f in paths:
        try:
            pid = int(f.read_text().strip() or 0)
            if pid > 0:
                os.kill(pid, 0)  # raises ProcessLookupError when it is gone
        except PermissionError:  # alive, another user's
            pass
        except (OSError, ValueError):
            continue
        if pid > 0 and str(pid) not in pids:
            pids.append(str(pid))
    return pids


def lock_out(out: Path, shard: tuple[int, int] | None, held: list) -> None:
    """Take the bench lock of ``out`` (see the module docstring); the open files go to ``held``
    (closing them releases the lock). Raises a one-line error naming the holder's process id."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        return
    names = [(".lock", fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH)]
    if shard is not None:
        names.append((f".lock-shard-{shard[0]}-of-{shard[1]}", fcntl.LOCK_EX))
    start = len(held)
    for name, mode in names:
        fh = open(out / name, "a+")
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            while len(held) > start:  # what this call took so far
                held.pop().close()
            pids = _holders(sorted(out.glob(".lock*")) if name == ".lock" else [out / name])
            who = f"process {', '.join(pids)}" if pids else "another process"
            raise BadInputError(f"--out {str(out)!r} is in use by another gooddrag bench ({who}); wait for it to "
                                "finish, or use another --out") from None
        held.append(fh)
        if mode == fcntl.LOCK_EX:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
    if shard is not None:
        _one_shard_count(out, shard[1], held, start)


def _one_shard_count(out: Path, n: int, held: list, start: int) -> None:
    """Shards of one run split the samples the same way: a shard of ``--shard i/m`` (m != n) running
    on the same ``out`` would edit other samples' mix and overwrite the tables, so it is refused.
    Each shard holds ``.lock-of-<n>`` shared; a held ``.lock-of-<m>`` cannot be taken exclusively."""
    import fcntl

    fh = open(out / f".lock-of-{n}", "a+")
    fcntl.flock(fh, fcntl.LOCK_SH)
    held.append(fh)
    for other in sorted(out.glob(".lock-of-*")):
        if other.name == f".lock-of-{n}":
            continue
        with open(other, "a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                while len(held) > start:
                    held.pop().close()
                m = other.name.rsplit("-", 1)[1]
                raise BadInputError(f"--out {str(out)!r} is in use by a gooddrag bench split into {m} shards; "
                                    f"--shard i/{n} cannot run beside it (use the same n, or another --out)") from None
            fcntl.flock(probe, fcntl.LOCK_UN)


def run_bench(opts: BenchOptions, *, registry: Registry | None = None, plugins: Iterable[Any] = (),
              log: Log = _stderr, tty: bool | None = None) -> dict:
    """Validate everything, then edit and score the selected samples. Returns the summary dict."""
    held: list = []
    try:
        return _run_bench(opts, held, registry=registry, plugins=plugins, log=log, tty=tty)
    finally:
        for fh in held:
            fh.close()


def _run_bench(opts: BenchOptions, held: list, *, registry: Registry | None, plugins: Iterable[Any],
               log: Log, tty: bool | None) -> dict:
    from gooddrag.core.config import resolve_config

    reg = registry or default_registry()
    t_start = time.perf_counter()
    # 1. everything that can be checked without a model
    cfg = resolve_config(reg, preset=opts.preset, schedule=opts.schedule, loss=opts.loss, tracker=opts.tracker,
                         overrides=list(opts.params), load=opts.load, lora=opts.lora, seed=opts.seed, width=opts.width)
    metrics = load_metrics(reg, opts.metrics, opts.metric_params)
    runner = load_runner(reg, opts.runner, opts.runner_params)
    shard = parse_shard(opts.shard)
    dataset, dataset_name = open_dataset(reg, opts.dataset_dir, opts.dataset)
    samples = select_samples(dataset, opts.dataset_dir, opts.limit, shard)
    if not samples:
        raise BadInputError(f"no samples selected in {str(opts.dataset_dir)!r}"
                            + (f" (--shard {opts.shard})" if shard else ""))
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock_out(out, shard, held)
    root = out / "samples"
    want = cfg.to_dict()
    rows = {s.id: new_row(s) for s in samples}
    by_id = {s.id: s for s in samples}
    pending: list[Sample] = []
    done_reports: dict[str, dict] = {}
    for s in samples:
        if isinstance(s, MalformedSample):
            rows[s.id].update(status="failed", error=s.error, malformed=True)
            log(f"malformed, recorded as failed: {s.error}")
            continue
        folder = sample_dir(root, s.id)
        report = None if opts.force else read_run_json(folder)
        if report is None:
            pending.append(s)
            continue
        diff = _method_diff(want, report.get("config") or {})
        if diff:
            raise ConfigError(f"{folder / 'run.json'} was made with another config ({diff}); "
                              "use another --out, or --force to redo every sample")
        done_reports[s.id] = report
    dataset_info = {"name": dataset_name, "folder": str(opts.dataset_dir), "selected": len(samples),
                    "limit": opts.limit, "shard": opts.shard}
    config_info = {**want, "runner": opts.runner, "prompts": "sample" if opts.prompts else "empty"}
    ordered = [rows[s.id] for s in samples]

    edit_clock: dict[str, float] = {}
    workers: set[str] = set()

    def flush(base: dict | None = None) -> dict:
        wall = edit_clock["end"] - edit_clock["start"] if "end" in edit_clock else None
        extra = placement_and_throughput(ordered, opts.runner, workers, wall)
        summary = build_summary(ordered, metrics, command="bench", dataset=dataset_info, config=config_info,
                                extra=extra, wall_s=time.perf_counter() - t_start, baseline=base)
        write_tables(out, ordered, metrics, summary)
        return summary

    out.mkdir(parents=True, exist_ok=True)
    # 2. resumed samples: reuse their edit, score (cached in scores.json)
    from gooddrag.app.outputs.files import clear_partials

    for sid, report in done_reports.items():
        row, folder = rows[sid], sample_dir(root, sid)
        clear_partials(folder)  # staging left by a process killed after this sample was finished
        row["resumed"], row["result_path"] = True, folder / "result.png"
        try:
            _fill_from_report(row, report, by_id[sid], folder / "run.json")
            image = _load_result(folder / "result.png")
            score_row(row, metrics, by_id[sid], image, row["final_handles"], folder / "scores.json",
                      hash_file(folder / "run.json"))
        except GoodDragError as exc:
            row["status"], row["error"] = "failed", error_line(exc)
    if done_reports:
        log(f"resuming: {len(done_reports)} of {len(samples)} samples already edited"
            + ("" if pending else "; nothing to edit (use --force to redo them)"))
    flush()
    # 3. edit the rest: the runner spreads the samples over its workers (each loads the model once);
    # this process writes every file, so a worker on another machine needs no shared folder
    first_key = None
    progress = _Progress(len(pending), log, sys.stderr.isatty() if tty is None else tty,
                         show_workers=opts.runner != "local", workers=workers)
    edit_clock["start"] = time.perf_counter()
    results = runner.run(pending, BenchWorker(opts, cfg, plugins, dataset_name, registry=reg), progress.event)
    try:
        for outcome in results:
            if isinstance(outcome, JobLost):
                outcome = {"sample": outcome.job, "error": outcome.error}
            sample = outcome["sample"]
            row = rows[sample.id]
            row["edited"] = True
            clear_partials(sample_dir(root, sample.id))  # staging left by a killed earlier run
            if outcome["error"] is not None:
                row["status"], row["error"] = "failed", outcome["error"]
            else:
                folder = sample_dir(root, sample.id)
                _store(folder, outcome["files"])
                _fill_from_report(row, outcome["report"], sample)
                row["result_path"] = folder / "result.png"
                score_row(row, metrics, sample, outcome["image"], row["final_handles"], folder / "scores.json",
                          hash_file(folder / "run.json"))
            if outcome.get("where") or sample.id in progress.worker_of:
                row["placement"] = {**(outcome.get("where") or {}), "worker": progress.worker_of.get(sample.id)}
            if first_key is None:
                keys = metric_keys(ordered, metrics)
                first_key = keys[0] if keys else None
            progress.step(row, first_key)
            edit_clock["end"] = time.perf_counter()
            flush()
    except KeyboardInterrupt:
        progress.stop()
        flush()
        n_done = sum(r["status"] != "missing" for r in ordered)
        log(f"interrupted: {n_done} of {len(ordered)} samples are recorded in {out / 'results.csv'}; "
            "run the same command again to resume")
        raise
    finally:
        progress.stop()
        close = getattr(results, "close", None)
        if close:
            close()
    summary = flush(score_baseline(ordered, metrics, by_id) if opts.baseline else None)
    head = [f"Dataset: {dataset_name} `{opts.dataset_dir}`, {len(samples)} samples"
            + (f" (--limit {opts.limit})" if opts.limit else "") + (f" (--shard {opts.shard})" if shard else ""),
            "",
            f"Method: preset `{cfg.preset}` ({' + '.join(x for x in (cfg.schedule, cfg.loss, cfg.tracker) if x)}), "
            f"model `{cfg.load.model}`, lora `{cfg.lora}`, {cfg.load.dtype}, width {cfg.width}, seed {cfg.seed}, prompts: "
            f"{'the samples' if opts.prompts else 'empty'}; full config in summary.json", ""]
    write_report(out, ordered, metrics, summary, by_id, "gooddrag bench report", head)
    return summary


def _load_result(path: Path) -> Image.Image:
    """A result image, decoded like every input (regular file, size limit, 16-bit, orientation)."""
    from gooddrag.core.inputs import open_image

    return open_image(path, "result").convert("RGB")


def _fill_from_report(row: dict, report: dict, sample: Sample, path: Path | None = None) -> None:
    """Final handles and timings from an edit's run.json; a field of the wrong type is an error
    naming the file (a hand-edited or foreign run.json must not crash the whole run)."""
    try:
        row["final_handles"] = final_points(report, len(sample.pairs))
        where = (report.get("bench") or {}).get("worker")
        row["placement"] = dict(where) if isinstance(where, dict) else None
        t = report.get("timings_s") or {}
        row["timings"] = {str(k): float(v) for k, v in t.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
        drag_outcome(row, report, sample)
    except (AttributeError, TypeError, ValueError) as exc:
        row["final_handles"], row["timings"], row["placement"] = None, {}, None
        raise BadInputError(f"{path or 'run.json'} has a field of the wrong type ({type(exc).__name__}); "
                            "delete it to edit the sample again") from None


class BenchWorker:
    """Builds the edit function of one device (it loads the model once). Picklable, so that a runner
    can build it in another process or on another machine, where it uses that process's registry."""

    def __init__(self, opts: BenchOptions, cfg: EditConfig, plugins: Iterable[Any], dataset_name: str,
                 registry: Registry | None = None):
        self.opts, self.cfg, self.plugins, self.dataset_name = opts, cfg, tuple(plugins), dataset_name
        self.registry = registry

    def __getstate__(self) -> dict:
        return {**self.__dict__, "registry": None}  # a plugin manager does not travel

    def __call__(self) -> Callable[[Sample], dict]:
        from gooddrag.core.devices import describe_device
        from gooddrag.core.editor import Editor

        editor = Editor.from_pretrained(self.cfg.load, registry=self.registry)
        where = {"node": socket.gethostname(), "device": describe_device(editor.backbone.device)}
        return functools.partial(_edit_one, editor, opts=self.opts, cfg=self.cfg, plugins=list(self.plugins),
                                 dataset_name=self.dataset_name, where=where)


def _edit_one(editor: Any, sample: Sample, *, opts: BenchOptions, cfg: EditConfig, plugins: list,
              dataset_name: str, where: dict) -> dict:
    """Edit one sample; its files come back as bytes (the caller writes them atomically), failures as
    an error line."""
    from gooddrag.core.inputs import prepare_input
    from gooddrag.app.outputs.files import result_files

    # A pair whose handle is its own target (Drag100 plants_3 has four) is not dragged: the engine
    # refuses it. Its final handle is the handle itself; every pair still counts in the metrics.
    keep = [i for i, (h, t) in enumerate(sample.pairs) if tuple(h) != tuple(t)]
    try:
        if not keep:
            raise BadInputError(f"sample {sample.id!r}: every pair has its handle on its target; nothing to drag")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GoodDragWarning)  # the sample's input notes go to run.json only
            inp = prepare_input(sample.image, [sample.pairs[i] for i in keep], sample.mask, width=cfg.width)
            res = editor.run(inp, cfg, prompt=sample.prompt if opts.prompts else "", plugins=plugins)
        finals = [[float(c) for c in h] for h, _ in sample.pairs]
        for i, f in zip(keep, res.points):
            finals[i] = list(f)
        res.report["bench"] = {"sample": sample.id, "group": sample.group, "dataset": dataset_name,
                               "dataset_folder": str(opts.dataset_dir),
                               "pairs_xy": [[list(h), list(t)] for h, t in sample.pairs],
                               "dragged_pairs": keep, "final_handles_xy_all_pairs": finals,
                               "prompt": sample.prompt if opts.prompts else "", "worker": where}
        files = result_files(sample.image, res)
        return {"sample": sample, "error": None, "image": res.image, "report": res.report, "files": files,
                "where": where}
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the bench silently
        return {"sample": sample, "error": error_line(exc), "image": None, "report": None, "files": None,
                "where": where}


def _store(folder: Path, files: dict[str, bytes]) -> None:
    """One sample's files, all or none (a killed earlier attempt may have left a staging folder)."""
    from gooddrag.app.outputs.files import clear_partials, staging, write_files

    clear_partials(folder)
    with staging(folder) as tmp:
        write_files(tmp, files)


# --- score ----------------------------------------------------------------------------------------


def find_result(results_dir: Path, sample_id: str) -> Path | None:
    """The result image of ``sample_id`` under ``results_dir`` (see docs/evaluation.md), or None."""
    roots = [results_dir / "samples", results_dir] if (results_dir / "samples").is_dir() else [results_dir]
    parts = sample_id.split("/")
    for root in roots:
        folder = root.joinpath(*parts)
        for name in RESULT_NAMES:
            if (folder / name).is_file():
                return folder / name
        for stem in dict.fromkeys([sample_id, sample_id.replace("/", "__")]):
            for ext in FLAT_EXTS:
                path = root / (stem + ext)
                if path.is_file():
                    return path
    return None


def run_score(results_dir: Path, dataset_dir: Path, *, dataset: str = "auto", metrics: str = "dai",
              metric_params: Sequence[str] = (), out: Path | None = None, registry: Registry | None = None,
              log: Log = _stderr, limit: int | None = None, sample_ids: Sequence[str] = (),
              baseline: bool = False) -> dict:
    """Score a folder of results of any method against the dataset. Returns the summary dict.
    ``limit`` keeps the first N samples (sorted by id, as ``bench --limit``), ``sample_ids`` only
    those ids; ``baseline`` also scores the unedited inputs."""
    reg = registry or default_registry()
    t_start = time.perf_counter()
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise BadInputError(f"results folder {str(results_dir)!r} does not exist or is not a folder")
    mets = load_metrics(reg, metrics, metric_params)
    ds, ds_name = open_dataset(reg, dataset_dir, dataset)
    samples = select_samples(ds, dataset_dir, limit)
    if sample_ids:
        known = {s.id for s in samples}
        unknown = [i for i in sample_ids if i not in known]
        if unknown:
            raise BadInputError(f"sample {unknown[0]!r} is not in {str(dataset_dir)!r}"
                                + (f" (within the first {limit})" if limit else "") + "; check the id")
        samples = [s for s in samples if s.id in set(sample_ids)]
    if not samples:
        raise BadInputError(f"no samples found in {str(dataset_dir)!r}")
    out = Path(out) if out is not None else results_dir
    rows = [new_row(s) for s in samples]
    config = None
    for s, row in zip(samples, rows):
        if isinstance(s, MalformedSample):
            row.update(status="failed", error=s.error, malformed=True)
            continue
        path = find_result(results_dir, s.id)
        if path is None:
            continue
        row["result_path"] = path
        try:
            report = None
            if path.name in RESULT_NAMES and (path.parent / "run.json").is_file():
                with contextlib.suppress(OSError, ValueError):
                    report = json.loads((path.parent / "run.json").read_text())
                if isinstance(report, dict):
                    _check_report_matches(report, s, path.parent / "run.json")
                    _fill_from_report(row, report, s, path.parent / "run.json")
                    cfg = report.get("config")
                    config = config or (cfg if isinstance(cfg, dict) else None)
            image = _load_result(path)
        except GoodDragError as exc:
            row["status"], row["error"] = "failed", f"sample {s.id!r}: {error_line(exc)}"
            continue
        score_row(row, mets, s, image, row["final_handles"])
    found = sum(r["status"] != "missing" for r in rows)
    scored = sum(r["status"] == "ok" for r in rows)
    dataset_info = {"name": ds_name, "folder": str(dataset_dir), "selected": len(samples), "limit": limit,
                    "samples": list(sample_ids) or None}
    by_id = {s.id: s for s in samples}
    summary = build_summary(rows, mets, command="score", dataset=dataset_info, config=config,
                            extra={"results_dir": str(results_dir)}, wall_s=time.perf_counter() - t_start,
                            baseline=score_baseline(rows, mets, by_id) if baseline else None)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, rows, mets, summary)
    write_report(out, rows, mets, summary, by_id, "gooddrag score report",
                 [f"Results: `{results_dir}`", "", f"Dataset: {ds_name} `{dataset_dir}`, {len(samples)} samples", ""])
    if not found:
        raise BadInputError(f"nothing could be scored: no result image found for any of the {len(samples)} samples "
                            f"in {str(results_dir)!r}; see docs/evaluation.md for the accepted layouts")
    if not scored:
        raise BadInputError(f"nothing could be scored: all {found} results found in {str(results_dir)!r} failed "
                            f"(see the error column of {out / 'results.csv'})")
    return summary


def _check_report_matches(report: dict, sample: Sample, path: Path) -> None:
    """Refuse a run.json that belongs to another sample (its bench sample id) or to other points
    (its pair count): scoring it against this sample would measure the wrong drag."""
    bench = report.get("bench") if isinstance(report.get("bench"), dict) else {}
    other = bench.get("sample")
    if other is not None and other != sample.id:
        raise BadInputError(f"{path} is the run of sample {other!r}; put each result in its own sample's folder")
    pairs = bench.get("pairs_xy") if isinstance(bench.get("pairs_xy"), list) else report.get("handles_xy")
    if isinstance(pairs, list) and len(pairs) != len(sample.pairs):
        raise BadInputError(f"{path} has {len(pairs)} pairs but the sample has {len(sample.pairs)}; it is the run "
                            "of other points")
