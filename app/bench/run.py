"""Running a benchmark: ``gooddrag bench`` (edit, then score, every sample) and ``gooddrag score``
(score any method's results), with resume and per-sample failure records.

Bench layout of ``--out DIR``::

    DIR/samples/<sample id>/result.png, points.png, run.json   one edit (written atomically)
    DIR/samples/<sample id>/scores.json                        cached scores of that edit
    DIR/results.csv, summary.json, report.md, plot_*.png

The parts live beside this file, one concern each: ``selection`` (dataset, samples, metrics, runner),
``lock`` (one run per ``--out``), ``progress``, ``worker`` (one sample's edit on a device),
``results`` (rows, tables), ``report`` and ``score``.

Resume rule: a sample whose ``run.json`` is complete (valid JSON with ``final_handles``, next to its
``result.png``) is not edited again unless ``--force``; a failed or missing one is (re)tried.
``results.csv`` and ``summary.json`` are rewritten atomically after every sample, so an interrupted
run leaves consistent files (unfinished samples have status ``missing``) and the next run resumes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable

import attrs

from gooddrag.core.config import LoadOptions
from gooddrag.core.errors import BadInputError, ConfigError, GoodDragError
from gooddrag.core.registry import Registry, default_registry
from gooddrag.core.runners import JobLost
from gooddrag.core.samples import MalformedSample, Sample
from gooddrag.app.bench.report import write_report
from gooddrag.app.bench.results import (METHOD_FIELDS, build_summary, error_line, hash_file, metric_keys, new_row,
                                        placement_and_throughput, read_run_json, sample_dir, score_baseline, score_row,
                                        write_tables)
from gooddrag.app.bench.lock import lock_out
from gooddrag.app.bench.progress import Log, Progress, stderr_log
from gooddrag.app.bench.results import fill_from_report, load_result
from gooddrag.app.bench.selection import load_metrics, load_runner, open_dataset, parse_shard, select_samples
from gooddrag.app.bench.worker import BenchWorker, store_files


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


def run_bench(opts: BenchOptions, *, registry: Registry | None = None, plugins: Iterable[Any] = (),
              log: Log = stderr_log, tty: bool | None = None) -> dict:
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
            fill_from_report(row, report, by_id[sid], folder / "run.json")
            image = load_result(folder / "result.png")
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
    progress = Progress(len(pending), log, sys.stderr.isatty() if tty is None else tty,
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
                store_files(folder, outcome["files"])
                fill_from_report(row, outcome["report"], sample)
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
