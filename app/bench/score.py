"""``gooddrag score``: score any method's results against a benchmark; missing results are counted."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Sequence

from gooddrag.core.errors import BadInputError, GoodDragError
from gooddrag.core.registry import Registry, default_registry
from gooddrag.core.samples import MalformedSample, Sample
from gooddrag.app.bench.report import write_report
from gooddrag.app.bench.results import (build_summary, error_line, new_row, score_baseline, score_row, write_tables)
from gooddrag.app.bench.progress import Log, stderr_log
from gooddrag.app.bench.results import fill_from_report, load_result
from gooddrag.app.bench.selection import load_metrics, open_dataset, select_samples


#: result files accepted by ``score`` inside a per-sample folder, in order of preference
RESULT_NAMES = ("result.png", "output_image.png", "dragged_image.png")


FLAT_EXTS = (".png", ".jpg", ".jpeg", ".webp")


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
              log: Log = stderr_log, limit: int | None = None, sample_ids: Sequence[str] = (),
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
                    fill_from_report(row, report, s, path.parent / "run.json")
                    cfg = report.get("config")
                    config = config or (cfg if isinstance(cfg, dict) else None)
            image = load_result(path)
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
