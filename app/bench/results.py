"""Result tables of a benchmark: one row per sample, its scores (cached per edit), ``results.csv``,
``summary.json`` and the terminal summary. Every file is replaced atomically."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from gooddrag.core.errors import BadInputError, GoodDragError
from gooddrag.core.hookspecs import PHASES
from gooddrag.core.metrics import mean_aggregate
from gooddrag.core.params import params_to_dict
from gooddrag.core.samples import Sample

#: config fields that change the result: a resumed sample must have been made with the same values
METHOD_FIELDS = ("model", "preset", "schedule", "loss", "tracker", "schedule_params", "loss_params",
                 "tracker_params", "lora", "lora_params", "backbone_params", "seed", "dtype", "precision", "width")


def sample_dir(root: Path, sample_id: str) -> Path:
    """``root/<id>`` (ids with '/' become nested folders); ids that would escape ``root`` are refused."""
    parts = sample_id.split("/")
    if not sample_id or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise BadInputError(f"sample id {sample_id!r} cannot be used as a folder name")
    return Path(root).joinpath(*parts)


# --- small file helpers -------------------------------------------------------------------------


def atomic_write(path: Path, write: Any, suffix: str = ".tmp") -> None:
    """Call ``write(tmp_name)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path`` and rename it into place."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def read_run_json(folder: Path) -> dict | None:
    """The edit report of a finished sample folder, or None when it is not complete."""
    path = folder / "run.json"
    if not (path.is_file() and (folder / "result.png").is_file()):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(data, dict) and ("final_handles_xy" in data or "final_handles" in data)  # (or the earlier key)
          and isinstance(data.get("config", {}), dict))
    return data if ok else None


def error_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, GoodDragError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def final_points(report: dict | None, n_pairs: int) -> list[list[float]] | None:
    """The final handles of all pairs in a run.json, or None when absent or not [[x, y], ...]."""
    if not isinstance(report, dict):
        return None
    bench = report.get("bench")
    bench = bench if isinstance(bench, dict) else {}
    for pts in (bench.get("final_handles_xy_all_pairs"), report.get("final_handles_xy"),
                bench.get("final_handles_all_pairs"), report.get("final_handles")):  # (the last two: earlier keys)
        if (isinstance(pts, list) and len(pts) == n_pairs
                and all(isinstance(p, list) and len(p) == 2
                        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p) for p in pts)):
            return pts
    return None


# --- rows and scoring ---------------------------------------------------------------------------


#: the flag of a sample whose mask has no editable pixel: the whole image is held to the input, so
#: its scores say how well nothing moved (results.csv's ``flags`` column)
EMPTY_MASK_FLAG = "mask has no editable pixel"


def new_row(sample: Sample) -> dict[str, Any]:
    mask = getattr(sample, "mask", None)
    flags = [EMPTY_MASK_FLAG] if mask is not None and not bool(mask.any()) else []
    return {"id": sample.id, "group": sample.group, "status": "missing", "error": "", "n_pairs": len(sample.pairs),
            "scores": {}, "final_handles": None, "timings": {}, "resumed": False, "result_path": None,
            "stop_reason": None, "final_dist_px": None, "reached": None, "flags": flags}


def drag_outcome(row: dict, report: dict | None, sample: Sample) -> None:
    """How the dragging ended for one sample: the engine's stop reason, the mean distance (image px)
    from each final handle to its target, and whether every handle reached its target (the engine
    stopped with ``reached``: all handles within the schedule's reach distance)."""
    finals = row["final_handles"]
    if finals is not None:
        d = [math.dist(f, t) for f, (_, t) in zip(finals, sample.pairs)]
        row["final_dist_px"] = round(sum(d) / len(d), 3) if d else None
    reason = (report or {}).get("stop_reason")
    if isinstance(reason, str):
        row["stop_reason"], row["reached"] = reason, reason == "reached"


def drag_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Over the scored samples with an edit report: the reached rate, the stop reasons and the
    distribution of final handle-to-target distances (image px)."""
    ok = [r for r in rows if r["status"] == "ok"]
    told = [r for r in ok if r["stop_reason"] is not None]
    dists = sorted(r["final_dist_px"] for r in ok if r["final_dist_px"] is not None)
    out: dict[str, Any] = {"samples": len(told), "reached": sum(bool(r["reached"]) for r in told),
                           "reached_rate": round(sum(bool(r["reached"]) for r in told) / len(told), 4) if told else None,
                           "stop_reasons": {k: sum(r["stop_reason"] == k for r in told)
                                            for k in sorted({r["stop_reason"] for r in told})},
                           "final_dist_px": None}
    if dists:
        q = lambda f: dists[min(len(dists) - 1, int(round(f * (len(dists) - 1))))]  # noqa: E731 (nearest rank)
        out["final_dist_px"] = {"n": len(dists), "mean": round(sum(dists) / len(dists), 3), "min": dists[0],
                                "median": round(statistics.median(dists), 3), "p90": q(0.9), "max": dists[-1]}
    return out


def score_baseline(rows: Sequence[dict], metrics: Sequence[Any], samples: dict[str, Sample]) -> dict[str, dict]:
    """The metrics of the unedited input (result = original, final handles = the handles) over the
    samples the method was scored on: what a method must beat to have moved anything."""
    base = []
    for r in rows:
        if r["status"] != "ok" or r["id"] not in samples:
            continue
        s = samples[r["id"]]
        row = {**new_row(s), "group": r["group"]}
        score_row(row, metrics, s, s.image, [list(h) for h, _ in s.pairs])
        base.append(row)
    return {m.name: _aggregate(m, base) for m in metrics}


def _metric_sig(metric: Any) -> dict[str, Any]:
    """Name and parameters as recorded in summary.json and scores.json: URLs lose their
    ``user:password@`` (a judge endpoint may carry credentials; they must not reach the results)."""
    return {"name": metric.name, "params": _no_userinfo(_jsonable(params_to_dict(metric.params)))}


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")


def _no_userinfo(obj: Any) -> Any:
    if isinstance(obj, str):
        return _USERINFO.sub(r"\1", obj)
    if isinstance(obj, dict):
        return {k: _no_userinfo(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_userinfo(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def score_row(row: dict, metrics: Sequence[Any], sample: Sample, image: Image.Image,
              final_points: list[list[float]] | None, cache: Path | None = None, run_key: str = "") -> None:
    """Fill ``row['scores']`` (per metric) and set status ok/failed. Scores are cached in ``cache``
    (a scores.json tied to ``run_key``, the hash of the run.json they were computed for)."""
    cached: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            data = json.loads(cache.read_text())
            if data.get("run") == run_key and isinstance(data.get("metrics"), dict):
                cached = data["metrics"]
    errors = []
    fresh: dict[str, Any] = {}
    for metric in metrics:
        sig = _metric_sig(metric)
        hit = cached.get(metric.name)
        if hit and hit.get("params") == sig["params"] and isinstance(hit.get("scores"), dict):
            row["scores"][metric.name] = {k: float(v) for k, v in hit["scores"].items()}
            fresh[metric.name] = hit
            continue
        try:
            values = metric.score(sample, image, final_points)
        except KeyboardInterrupt:
            raise
        except (Exception, SystemExit) as exc:  # a metric's sys.exit() must not end the run silently
            errors.append(f"{metric.name}: {error_line(exc)}")
            continue
        values = {k: float(v) for k, v in values.items()}
        row["scores"][metric.name] = values
        fresh[metric.name] = {"params": sig["params"], "scores": values}
    if cache is not None and fresh and fresh != cached:
        atomic_write_text(cache, json.dumps({"run": run_key, "metrics": fresh}, indent=1, default=str) + "\n")
    if errors:
        row["status"], row["error"] = "failed", "; ".join(errors)
    else:
        row["status"], row["error"] = "ok", ""


def hash_file(path: Path) -> str:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return ""


# --- outputs ------------------------------------------------------------------------------------


def metric_keys(rows: Sequence[dict], metrics: Sequence[Any]) -> list[tuple[str, str]]:
    """(metric, key) in metric order, keys in first-seen order."""
    out: list[tuple[str, str]] = []
    for m in metrics:
        for r in rows:
            for k in r["scores"].get(m.name, {}):
                if (m.name, k) not in out:
                    out.append((m.name, k))
    return out


def fmt_cell(v: Any, spec: str = ".8g", none: str = "") -> str:
    """A table cell: floats with ``spec`` (csv: 8 significant digits), None as ``none``."""
    if v is None:
        return none
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def csv_text(v: Any) -> str:
    """A text cell that a spreadsheet will not run: one starting with = + - @ (or a tab or CR) gets a
    leading apostrophe (a sample id or error such as ``=HYPERLINK(...)`` would be a formula)."""
    s = str(v)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def results_csv(rows: Sequence[dict], metrics: Sequence[Any], resumed: bool = True) -> str:
    keys = metric_keys(rows, metrics)
    phases = [p for p in PHASES if any(p in r["timings"] for r in rows)]
    phases += sorted({p for r in rows for p in r["timings"]} - set(phases))
    header = (["id", "group", "status", "error", "n_pairs"] + [k for _, k in keys]
              + ["stop_reason", "reached", "final_dist_px", "final_handles_xy", "time_total_s"]
              + [f"time_{p}_s" for p in phases] + (["resumed"] if resumed else []))
    flagged = any(r.get("flags") for r in rows)
    header += ["flags"] if flagged else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        t = r["timings"]
        w.writerow([csv_text(r["id"]), csv_text(r["group"]), r["status"], csv_text(r["error"]), r["n_pairs"]]
                   + [fmt_cell(r["scores"].get(m, {}).get(k)) for m, k in keys]
                   + [r.get("stop_reason") or "", "" if r.get("reached") is None else str(r["reached"]).lower(),
                      fmt_cell(r.get("final_dist_px"))]
                   + [json.dumps(r["final_handles"]) if r["final_handles"] is not None else "",
                      fmt_cell(round(sum(t.values()), 4)) if t else ""]
                   + [fmt_cell(t.get(p)) for p in phases] + ([str(r["resumed"]).lower()] if resumed else [])
                   + (["; ".join(r.get("flags") or [])] if flagged else []))
    return buf.getvalue()


def _aggregate(metric: Any, rows: list[dict]) -> dict[str, float]:
    per = [r["scores"][metric.name] for r in rows if r["status"] == "ok" and metric.name in r["scores"]]
    if not per:
        return {}
    agg = getattr(metric, "aggregate", None)
    if agg is None:
        return mean_aggregate(per)
    return {k: float(v) for k, v in agg(per).items()}


def _counts(rows: Sequence[dict]) -> dict[str, int]:
    c = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "missing")}
    c["total"] = len(rows)
    c["skipped"] = sum(bool(r["resumed"]) for r in rows)
    c["edited"] = sum(bool(r.get("edited")) for r in rows)
    c["malformed"] = sum(bool(r.get("malformed")) for r in rows)
    return c


def build_summary(rows: list[dict], metrics: Sequence[Any], *, command: str, dataset: dict, config: Any,
                  extra: dict | None = None, wall_s: float | None = None, baseline: dict | None = None) -> dict:
    groups = sorted({r["group"] for r in rows})
    overall = {m.name: _aggregate(m, rows) for m in metrics}
    by_group = {g: {m.name: _aggregate(m, [r for r in rows if r["group"] == g]) for m in metrics} for g in groups}
    ok_times = [sum(r["timings"].values()) for r in rows if r["status"] == "ok" and r["timings"]]
    return _jsonable({
        "command": command,
        "dataset": dataset,
        "config": config,
        "metrics": {m.name: {"params": _metric_sig(m)["params"],
                             "higher_is_better": bool(getattr(m, "higher_is_better", False))} for m in metrics},
        "counts": _counts(rows),
        "groups": {g: _counts([r for r in rows if r["group"] == g]) for g in groups},
        "aggregate": {"overall": overall, "by_group": by_group,
                      **({"baseline_unedited": baseline} if baseline is not None else {})},
        "drag": drag_summary(rows),
        "totals": {"edit_time_s": round(sum(ok_times), 3),
                   "mean_edit_time_s": round(sum(ok_times) / len(ok_times), 3) if ok_times else None,
                   "wall_time_s": None if wall_s is None else round(wall_s, 3)},
        "failed": [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"],
        "samples": [{"id": r["id"], "status": r["status"], "stop_reason": r["stop_reason"], "reached": r["reached"],
                     "final_dist_px": r["final_dist_px"]} for r in rows],
        "missing": [r["id"] for r in rows if r["status"] == "missing"],
        **(extra or {}),
    })


def placement_and_throughput(rows: Sequence[dict], runner: str, workers: Sequence[str] | set,
                             edit_wall_s: float | None) -> dict:
    """Summary entries: where each sample was edited (node, device and, for this run's edits, the
    runner's worker) and this run's throughput, in samples per hour per worker (a worker holds one GPU,
    or one CPU slot without GPUs). The wall time runs from the runner's start (model loading included)
    to the last sample, so the figure is what a user waits for."""
    placement = {r["id"]: r["placement"] for r in rows if r.get("placement")}
    edited = sum(1 for r in rows if r.get("edited") and r.get("result_path") is not None)
    n = len(workers)
    throughput = None
    if edit_wall_s and n:
        per_hour = edited / edit_wall_s * 3600
        devices = {(r.get("placement") or {}).get("device", "") for r in rows if r.get("edited")}
        unit = "GPU" if devices and all(d.startswith("cuda") for d in devices) else "worker"
        throughput = {"runner": runner, "workers": n, "unit": unit, "edited": edited,
                      "edit_wall_s": round(edit_wall_s, 3), "samples_per_hour": round(per_hour, 3),
                      "samples_per_hour_per_worker": round(per_hour / n, 3)}
    return {"placement": placement, "throughput": throughput}


def write_tables(out: Path, rows: list[dict], metrics: Sequence[Any], summary: dict) -> None:
    """results.csv and summary.json, each atomically."""
    atomic_write_text(out / "results.csv", results_csv(rows, metrics, resumed=summary.get("command") == "bench"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def counts_line(summary: dict) -> str:
    c = summary["counts"]
    failed = f"{c['failed']} failed" + (f" ({c['malformed']} malformed)" if c.get("malformed") else "")
    line = f"{c['ok']} ok, {failed}, {c['missing']} missing of {c['total']} samples"
    d = summary.get("drag") or {}
    if d.get("samples"):
        line += f"; {d['reached']} of {d['samples']} reached their targets"
    if summary.get("command") == "bench":
        line += f" (edited now {c['edited']}, resumed {c['skipped']})"
    return line


def summary_table(summary: dict) -> Any:
    """A rich Table of the overall aggregates (and per group when there are few groups)."""
    from rich.table import Table

    agg = summary["aggregate"]
    groups = [g for g, vals in agg["by_group"].items() if any(vals.values())]
    show_groups = groups if 1 < len(groups) <= 6 else []
    base = agg.get("baseline_unedited")
    table = Table("metric", "all", *(["unedited input"] if base is not None else []), *show_groups)
    table.columns[0].no_wrap = True
    for name, vals in agg["overall"].items():
        for k, v in vals.items():
            table.add_row(k, md_num(v), *([md_num(base.get(name, {}).get(k))] if base is not None else []),
                          *(md_num(agg["by_group"][g].get(name, {}).get(k)) for g in show_groups))
    return table

def md_num(v: Any) -> str:
    return fmt_cell(v, ".4g", "-")


def load_result(path: Path) -> Image.Image:
    """A result image, decoded like every input (regular file, size limit, 16-bit, orientation)."""
    from gooddrag.core.inputs import open_image

    return open_image(path, "result").convert("RGB")


def fill_from_report(row: dict, report: dict, sample: Sample, path: Path | None = None) -> None:
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
