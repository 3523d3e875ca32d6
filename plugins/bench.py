"""``gooddrag bench`` and ``gooddrag score``: edit and/or score every sample of a benchmark, and write
``results.csv``, ``summary.json`` and ``report.md`` (with PNG plots next to it).

Bench layout of ``--out DIR``::

    DIR/samples/<sample id>/result.png, points.png, run.json   one edit (written atomically)
    DIR/samples/<sample id>/scores.json                        cached scores of that edit
    DIR/results.csv, summary.json, report.md, plot_*.png

Resume rule: a sample whose ``run.json`` is complete (valid JSON with ``final_handles``, next to its
``result.png``) is not edited again unless ``--force``; a failed or missing one is (re)tried.
``results.csv`` and ``summary.json`` are rewritten atomically after every sample, so an interrupted
run leaves consistent files (unfinished samples have status ``missing``) and the next run resumes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import attrs
import numpy as np
from PIL import Image

from gooddrag.core.errors import BadInputError, ConfigError, GoodDragError
from gooddrag.core.params import build_params, params_to_dict
from gooddrag.core.registry import Registry, default_registry
from gooddrag.core.samples import Sample

PHASES = ("lora", "inversion", "reference", "drag", "finish", "decode")
#: config fields that change the result: a resumed sample must have been made with the same values
METHOD_FIELDS = ("model", "preset", "schedule", "loss", "tracker", "schedule_params", "loss_params",
                 "tracker_params", "lora", "lora_params", "seed", "dtype", "width")
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
    given: dict[str, dict[str, str]] = {}
    for item in metric_params:
        key, sep, value = item.partition("=")
        metric, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"bad metric parameter {item!r}; write it as metric.field=value, e.g. dai.gammas=1,5")
        if metric not in wanted:
            raise ConfigError(f"metric parameter {item!r} is for {metric!r}, which is not in --metrics")
        given.setdefault(metric, {})[field] = value.strip()
    out = []
    for name in wanted:
        cls = registry.get("metric", name)
        metric = cls(build_params("metric", cls, given.get(name, {})))
        metric.check()
        out.append(metric)
    return out


def sample_dir(root: Path, sample_id: str) -> Path:
    """``root/<id>`` (ids with '/' become nested folders); ids that would escape ``root`` are refused."""
    parts = sample_id.split("/")
    if not sample_id or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise BadInputError(f"sample id {sample_id!r} cannot be used as a folder name")
    return Path(root).joinpath(*parts)


# --- small file helpers -------------------------------------------------------------------------


def _atomic(path: Path, write: Any, suffix: str = ".tmp") -> None:
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
    _atomic(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _save_figure(fig: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layout notes on odd image shapes
            fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")

    _atomic(path, write, ".png")


def read_run_json(folder: Path) -> dict | None:
    """The edit report of a finished sample folder, or None when it is not complete."""
    path = folder / "run.json"
    if not (path.is_file() and (folder / "result.png").is_file()):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "final_handles" in data else None


def error_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, GoodDragError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _final_points(report: dict | None, n_pairs: int) -> list[list[float]] | None:
    if not report:
        return None
    bench = report.get("bench") or {}
    for pts in (bench.get("final_handles_all_pairs"), report.get("final_handles")):
        if isinstance(pts, list) and len(pts) == n_pairs:
            return pts
    return None


# --- rows and scoring ---------------------------------------------------------------------------


def new_row(sample: Sample) -> dict[str, Any]:
    return {"id": sample.id, "group": sample.group, "status": "missing", "error": "", "n_pairs": len(sample.pairs),
            "scores": {}, "final_handles": None, "timings": {}, "resumed": False, "result_path": None}


def _metric_sig(metric: Any) -> dict[str, Any]:
    return {"name": metric.name, "params": _jsonable(params_to_dict(metric.params))}


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
        except Exception as exc:
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


def _hash_file(path: Path) -> str:
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


def _fmt(v: Any, spec: str = ".8g", none: str = "") -> str:
    """A table cell: floats with ``spec`` (csv: 8 significant digits), None as ``none``."""
    if v is None:
        return none
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def results_csv(rows: Sequence[dict], metrics: Sequence[Any], resumed: bool = True) -> str:
    keys = metric_keys(rows, metrics)
    phases = [p for p in PHASES if any(p in r["timings"] for r in rows)]
    phases += sorted({p for r in rows for p in r["timings"]} - set(phases))
    header = (["id", "group", "status", "error", "n_pairs"] + [k for _, k in keys] + ["final_handles", "time_total_s"]
              + [f"time_{p}_s" for p in phases] + (["resumed"] if resumed else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        t = r["timings"]
        w.writerow([r["id"], r["group"], r["status"], r["error"], r["n_pairs"]]
                   + [_fmt(r["scores"].get(m, {}).get(k)) for m, k in keys]
                   + [json.dumps(r["final_handles"]) if r["final_handles"] is not None else "",
                      _fmt(round(sum(t.values()), 4)) if t else ""]
                   + [_fmt(t.get(p)) for p in phases] + ([str(r["resumed"]).lower()] if resumed else []))
    return buf.getvalue()


def _aggregate(metric: Any, rows: list[dict]) -> dict[str, float]:
    per = [r["scores"][metric.name] for r in rows if r["status"] == "ok" and metric.name in r["scores"]]
    if not per:
        return {}
    agg = getattr(metric, "aggregate", None)
    if agg is None:
        from gooddrag.plugins.metrics.dai import mean_aggregate

        return mean_aggregate(per)
    return {k: float(v) for k, v in agg(per).items()}


def _counts(rows: Sequence[dict]) -> dict[str, int]:
    c = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "missing")}
    c["total"] = len(rows)
    c["skipped"] = sum(bool(r["resumed"]) for r in rows)
    c["edited"] = sum(bool(r.get("edited")) for r in rows)
    return c


def build_summary(rows: list[dict], metrics: Sequence[Any], *, command: str, dataset: dict, config: Any,
                  extra: dict | None = None, wall_s: float | None = None) -> dict:
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
        "aggregate": {"overall": overall, "by_group": by_group},
        "totals": {"edit_time_s": round(sum(ok_times), 3),
                   "mean_edit_time_s": round(sum(ok_times) / len(ok_times), 3) if ok_times else None,
                   "wall_time_s": None if wall_s is None else round(wall_s, 3)},
        "failed": [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"],
        "missing": [r["id"] for r in rows if r["status"] == "missing"],
        **(extra or {}),
    })


def write_tables(out: Path, rows: list[dict], metrics: Sequence[Any], summary: dict) -> None:
    """results.csv and summary.json, each atomically."""
    atomic_write_text(out / "results.csv", results_csv(rows, metrics, resumed=summary.get("command") == "bench"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


# --- report.md and plots ------------------------------------------------------------------------


def _md_num(v: Any) -> str:
    return _fmt(v, ".4g", "-")


def write_report(out: Path, rows: list[dict], metrics: Sequence[Any], summary: dict,
                 samples: dict[str, Sample], title: str, lines: Sequence[str] = ()) -> list[Path]:
    """report.md plus plot_*.png next to it. Returns the files written."""
    out = Path(out)
    written: list[Path] = []
    c = summary["counts"]
    md = [f"# {title}", ""]
    md += list(lines)
    md += [f"Samples: **{c['total']}** - ok {c['ok']}, failed {c['failed']}, missing {c['missing']}"
           + (f" (edited in this run {c['edited']}, resumed {c['skipped']})" if summary["command"] == "bench" else ""),
           ""]
    keys = metric_keys(rows, metrics)
    direction = {m.name: ("higher is better" if getattr(m, "higher_is_better", False) else "lower is better")
                 for m in metrics}
    md += ["## Overall", ""]
    agg = summary["aggregate"]
    if any(agg["overall"].values()):
        md += ["| metric | key | value |", "| --- | --- | --- |"]
        for m in metrics:
            for k, v in agg["overall"].get(m.name, {}).items():
                md.append(f"| {m.name} ({direction[m.name]}) | {k} | {_md_num(v)} |")
    else:
        md.append("No sample was scored.")
    md.append("")
    md += ["## By group", "", "| group | total | ok | failed | missing |", "| --- | --- | --- | --- | --- |"]
    for g, gc in summary["groups"].items():
        md.append(f"| {g} | {gc['total']} | {gc['ok']} | {gc['failed']} | {gc['missing']} |")
    md.append("")
    for m in metrics:
        mkeys = sorted({k for g in agg["by_group"].values() for k in g.get(m.name, {})},
                       key=lambda k: list(agg["overall"].get(m.name, {})).index(k)
                       if k in agg["overall"].get(m.name, {}) else 99)
        if not mkeys:
            continue
        md += [f"### {m.name} by group ({direction[m.name]})", "",
               "| group | " + " | ".join(mkeys) + " |", "| --- |" + " --- |" * len(mkeys)]
        for g, vals in agg["by_group"].items():
            md.append(f"| {g} | " + " | ".join(_md_num(vals.get(m.name, {}).get(k)) for k in mkeys) + " |")
        md.append("| **all** | " + " | ".join(_md_num(agg["overall"][m.name].get(k)) for k in mkeys) + " |")
        md.append("")
    ok = [r for r in rows if r["status"] == "ok"]
    try:
        plots = _plots(out, rows, metrics, keys, samples)
    except Exception as exc:  # a plot must never cost the tables
        plots, md = {}, md + [f"(plots failed: {error_line(exc)})", ""]
    written += list(plots.values())
    for m in metrics:
        if f"dist_{m.name}" in plots:
            md += [f"## Distribution: {m.name}", "", f"![{m.name}]({plots[f'dist_{m.name}'].name})", ""]
    if "time" in plots:
        t = summary["totals"]
        md += ["## Time per sample", "",
               f"Total edit time {_md_num(t['edit_time_s'])} s, mean {_md_num(t['mean_edit_time_s'])} s per sample "
               "(phases from run.json timings_s).", "", f"![time]({plots['time'].name})", ""]
    if "best_worst" in plots and keys:
        md += [f"## Best and worst edits by {keys[0][1]}", "",
               "Each row: input with handles (red) and targets (blue) | result with the final handles (green).", "",
               f"![best and worst]({plots['best_worst'].name})", ""]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += ["## Failed samples", "", "| id | error |", "| --- | --- |"]
        md += [f"| {r['id']} | {r['error'].replace('|', '/')} |" for r in failed]
        md.append("")
    missing = [r for r in rows if r["status"] == "missing"]
    if missing:
        md += ["## Missing samples", "", ", ".join(r["id"] for r in missing), ""]
    if not ok:
        md += ["No successful sample: no plots.", ""]
    atomic_write_text(out / "report.md", "\n".join(md).rstrip("\n") + "\n")
    written.append(out / "report.md")
    return written


def _plots(out: Path, rows: list[dict], metrics: Sequence[Any], keys: list[tuple[str, str]],
           samples: dict[str, Sample]) -> dict[str, Path]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

    ok = [r for r in rows if r["status"] == "ok"]
    plots: dict[str, Path] = {}
    if not ok:
        return plots
    groups = sorted({r["group"] for r in ok})
    for m in metrics:
        mkeys = [k for name, k in keys if name == m.name]
        mkeys = [k for k in mkeys if any(np.isfinite(r["scores"].get(m.name, {}).get(k, np.nan)) for r in ok)]
        if not mkeys:
            continue
        cols = min(4, len(mkeys))
        nrows = math.ceil(len(mkeys) / cols)
        fig = Figure(figsize=(3.4 * cols, 2.9 * nrows), dpi=100, layout="constrained")
        for i, k in enumerate(mkeys):
            ax = fig.add_subplot(nrows, cols, i + 1)
            data, labels = [], []
            for g in ["all"] + (groups if len(groups) > 1 else []):
                vals = [r["scores"][m.name][k] for r in ok if m.name in r["scores"] and k in r["scores"][m.name]
                        and (g == "all" or r["group"] == g) and np.isfinite(r["scores"][m.name][k])]
                if vals:
                    data.append(vals)
                    labels.append(f"{g}\n(n={len(vals)})")
            ax.boxplot(data, showmeans=True)
            for j, vals in enumerate(data):
                jitter = np.random.default_rng(j).uniform(-0.12, 0.12, len(vals))
                ax.scatter(np.full(len(vals), j + 1) + jitter, vals, s=9, alpha=0.6, color="tab:blue", zorder=3)
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=30 if len(labels) > 4 else 0)
            ax.set_title(k, fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{m.name} per sample ({'higher' if getattr(m, 'higher_is_better', False) else 'lower'} "
                     "is better)", fontsize=10)
        path = out / f"plot_dist_{m.name}.png"
        _save_figure(fig, path)
        plots[f"dist_{m.name}"] = path
    timed = [r for r in ok if r["timings"]]
    if timed:
        phases = [p for p in PHASES if any(p in r["timings"] for r in timed)]
        phases += sorted({p for r in timed for p in r["timings"]} - set(phases))
        fig = Figure(figsize=(min(16.0, max(6.0, 2 + 0.3 * len(timed))), 3.8), dpi=100, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(timed))
        bottom = np.zeros(len(timed))
        for p in phases:
            vals = np.array([r["timings"].get(p, 0.0) for r in timed], dtype=float)
            ax.bar(x, vals, bottom=bottom, label=p, width=0.8)
            bottom += vals
        if len(timed) <= 40:
            ax.set_xticks(x, [r["id"] for r in timed], rotation=60, ha="right", fontsize=7)
        else:
            ax.set_xlabel("sample (sorted by id)")
        ax.set_ylabel("seconds")
        ax.set_title("edit time per sample, by phase", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        path = out / "plot_time.png"
        _save_figure(fig, path)
        plots["time"] = path
    if keys:
        name, key = keys[0]
        metric = next(m for m in metrics if m.name == name)
        scored = [r for r in ok if np.isfinite(r["scores"].get(name, {}).get(key, np.nan)) and r["result_path"]
                  and r["id"] in samples]
        if scored:
            hib = bool(getattr(metric, "higher_is_better", False))
            scored.sort(key=lambda r: r["scores"][name][key], reverse=hib)
            k = min(3, math.ceil(len(scored) / 2))
            best = scored[:k]
            worst = [r for r in scored[::-1][:k] if r not in best]
            path = _grid(out, [("best", r) for r in best] + [("worst", r) for r in worst], samples, name, key)
            if path:
                plots["best_worst"] = path
    return plots


def _thumb(im: Image.Image, width: int = 360) -> Image.Image:
    if im.size[0] <= width:
        return im
    return im.resize((width, max(1, round(im.size[1] * width / im.size[0]))), Image.LANCZOS)


def _grid(out: Path, picks: list[tuple[str, dict]], samples: dict[str, Sample], name: str, key: str) -> Path | None:
    from matplotlib.figure import Figure

    from gooddrag.plugins.outputs import draw_points

    panels = []
    for label, r in picks:
        s = samples[r["id"]]
        try:
            with Image.open(r["result_path"]) as im:
                res = im.convert("RGB")
        except OSError:
            continue
        handles = [list(h) for h, _ in s.pairs]
        targets = [list(t) for _, t in s.pairs]
        left = _thumb(draw_points(s.image, handles, targets))
        right = _thumb(draw_points(res, handles, targets, r["final_handles"]))
        panels.append((f"{label}: {r['id']}  {key}={r['scores'][name][key]:.4g}", left, right))
    if not panels:
        return None
    ratios = [max(0.15, left.size[1] / left.size[0]) for _, left, _ in panels]
    col_w = 3.6
    fig = Figure(figsize=(2 * col_w + 0.3, sum(col_w * r + 0.45 for r in ratios)), dpi=100)
    grid = fig.add_gridspec(len(panels), 2, height_ratios=[col_w * r + 0.45 for r in ratios], hspace=0.05,
                            wspace=0.04, left=0.01, right=0.99, top=0.99, bottom=0.01)
    for i, (title, left, right) in enumerate(panels):
        for j, (im, sub) in enumerate(((left, "input + points"), (right, "result + final handles"))):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(np.asarray(im))
            ax.set_axis_off()
            ax.set_title(f"{title}\n{sub}" if j == 0 else f"\n{sub}", fontsize=8, loc="left")
    path = out / "plot_best_worst.png"
    _save_figure(fig, path)
    return path


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
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae: str = "auto"
    preset: str = "gooddrag"
    schedule: str | None = None
    loss: str | None = None
    tracker: str | None = None
    params: tuple[str, ...] = ()
    lora: str = "auto"
    device: str = "auto"
    dtype: str = "fp32"
    attention: str = "auto"
    seed: int = 0
    width: int = 512
    prompts: bool = True


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
    """A rich progress bar with ETA on a terminal; one line per sample otherwise."""

    def __init__(self, total: int, log: Log, tty: bool):
        self.total, self.log, self.done, self.bar = total, log, 0, None
        if tty and total:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("bench", total=total)
            self.bar.start()

    def step(self, row: dict, first_key: tuple[str, str] | None) -> None:
        self.done += 1
        val = ""
        if first_key and row["status"] == "ok":
            v = row["scores"].get(first_key[0], {}).get(first_key[1])
            val = f" {first_key[1]}={v:.4g}" if v is not None else ""
        t = sum(row["timings"].values()) if row["timings"] else 0.0
        msg = f"[{self.done}/{self.total}] {row['id']}: {row['status']}{val} ({t:.1f} s)" + (
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


def run_bench(opts: BenchOptions, *, registry: Registry | None = None, plugins: Iterable[Any] = (),
              log: Log = _stderr, tty: bool | None = None) -> dict:
    """Validate everything, then edit and score the selected samples. Returns the summary dict."""
    from gooddrag.core.config import resolve_config

    reg = registry or default_registry()
    t_start = time.perf_counter()
    # 1. everything that can be checked without a model
    cfg = resolve_config(reg, preset=opts.preset, schedule=opts.schedule, loss=opts.loss, tracker=opts.tracker,
                         overrides=list(opts.params), model=opts.model, vae=opts.vae, lora=opts.lora,
                         device=opts.device, dtype=opts.dtype, attention=opts.attention, seed=opts.seed,
                         width=opts.width)
    metrics = load_metrics(reg, opts.metrics, opts.metric_params)
    runner_cls = reg.get("runner", opts.runner)
    runner = runner_cls(build_params("runner", runner_cls, {}))
    shard = parse_shard(opts.shard)
    dataset, dataset_name = open_dataset(reg, opts.dataset_dir, opts.dataset)
    samples = select_samples(dataset, opts.dataset_dir, opts.limit, shard)
    if not samples:
        raise BadInputError(f"no samples selected in {str(opts.dataset_dir)!r}"
                            + (f" (--shard {opts.shard})" if shard else ""))
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a file; give a folder")
    root = out / "samples"
    want = cfg.to_dict()
    rows = {s.id: new_row(s) for s in samples}
    by_id = {s.id: s for s in samples}
    pending: list[Sample] = []
    done_reports: dict[str, dict] = {}
    for s in samples:
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

    def flush() -> dict:
        summary = build_summary(ordered, metrics, command="bench", dataset=dataset_info, config=config_info,
                                wall_s=time.perf_counter() - t_start)
        write_tables(out, ordered, metrics, summary)
        return summary

    out.mkdir(parents=True, exist_ok=True)
    # 2. resumed samples: reuse their edit, score (cached in scores.json)
    from gooddrag.plugins.outputs import clear_partials

    for sid, report in done_reports.items():
        row, folder = rows[sid], sample_dir(root, sid)
        clear_partials(folder)  # staging left by a process killed after this sample was finished
        _fill_from_report(row, report, by_id[sid])
        row["resumed"], row["result_path"] = True, folder / "result.png"
        try:
            image = _load_result(folder / "result.png")
            score_row(row, metrics, by_id[sid], image, row["final_handles"], folder / "scores.json",
                      _hash_file(folder / "run.json"))
        except GoodDragError as exc:
            row["status"], row["error"] = "failed", error_line(exc)
    if done_reports:
        log(f"resuming: {len(done_reports)} of {len(samples)} samples already edited"
            + ("" if pending else "; nothing to edit (use --force to redo them)"))
    flush()
    # 3. edit the rest, one model for all
    first_key = None
    progress = _Progress(len(pending), log, sys.stderr.isatty() if tty is None else tty)

    def make_worker() -> Callable[[Sample], dict]:
        from gooddrag.core.editor import Editor

        editor = Editor.from_pretrained(opts.model, vae=opts.vae, device=opts.device, dtype=opts.dtype,
                                        attention=opts.attention, registry=reg)
        return lambda sample: _edit_one(editor, sample, sample_dir(root, sample.id), opts, list(plugins),
                                        dataset_name)

    results = runner.run(pending, make_worker)
    try:
        for outcome in results:
            sample = outcome["sample"]
            row = rows[sample.id]
            row["edited"] = True
            if outcome["error"] is not None:
                row["status"], row["error"] = "failed", outcome["error"]
            else:
                folder = sample_dir(root, sample.id)
                _fill_from_report(row, outcome["report"], sample)
                row["result_path"] = folder / "result.png"
                score_row(row, metrics, sample, outcome["image"], row["final_handles"], folder / "scores.json",
                          _hash_file(folder / "run.json"))
            if first_key is None:
                keys = metric_keys(ordered, metrics)
                first_key = keys[0] if keys else None
            progress.step(row, first_key)
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
    summary = flush()
    head = [f"Dataset: {dataset_name} `{opts.dataset_dir}`, {len(samples)} samples"
            + (f" (--limit {opts.limit})" if opts.limit else "") + (f" (--shard {opts.shard})" if shard else ""),
            "",
            f"Method: preset `{cfg.preset}` ({cfg.schedule} + {cfg.loss} + {cfg.tracker}), model `{cfg.model}`, "
            f"lora `{cfg.lora}`, {cfg.dtype}, width {cfg.width}, seed {cfg.seed}, prompts: "
            f"{'the samples' if opts.prompts else 'empty'}; full config in summary.json", ""]
    write_report(out, ordered, metrics, summary, by_id, "gooddrag bench report", head)
    return summary


def _load_result(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except OSError as exc:
        raise BadInputError(f"{path} is not a readable image ({type(exc).__name__})") from None


def _fill_from_report(row: dict, report: dict, sample: Sample) -> None:
    row["final_handles"] = _final_points(report, len(sample.pairs))
    t = report.get("timings_s") or {}
    row["timings"] = {k: float(v) for k, v in t.items() if isinstance(v, (int, float))}


def _edit_one(editor: Any, sample: Sample, folder: Path, opts: BenchOptions, plugins: list, dataset_name: str) -> dict:
    """Edit one sample and write its folder atomically; failures come back as an error line."""
    from gooddrag.plugins.outputs import clear_partials, staging, write_result_files

    # A pair whose handle is its own target (Drag100 plants_3 has four) is not dragged: the engine
    # refuses it. Its final handle is the handle itself; every pair still counts in the metrics.
    keep = [i for i, (h, t) in enumerate(sample.pairs) if tuple(h) != tuple(t)]
    try:
        if not keep:
            raise BadInputError(f"sample {sample.id!r}: every pair has its handle on its target; nothing to drag")
        clear_partials(folder)  # this sample is pending: anything half-written there is from a killed run
        with staging(folder) as tmp:
            res = editor.edit(sample.image, [sample.pairs[i] for i in keep], sample.mask, preset=opts.preset,
                              schedule=opts.schedule, loss=opts.loss, tracker=opts.tracker,
                              overrides=list(opts.params), lora=opts.lora,
                              prompt=sample.prompt if opts.prompts else "", seed=opts.seed, width=opts.width,
                              plugins=plugins)
            finals = [[float(c) for c in h] for h, _ in sample.pairs]
            for i, f in zip(keep, res.points):
                finals[i] = list(f)
            res.report["bench"] = {"sample": sample.id, "group": sample.group, "dataset": dataset_name,
                                   "dataset_folder": str(opts.dataset_dir),
                                   "pairs": [[list(h), list(t)] for h, t in sample.pairs],
                                   "dragged_pairs": keep, "final_handles_all_pairs": finals,
                                   "prompt": sample.prompt if opts.prompts else ""}
            write_result_files(tmp, sample.image, res)
        return {"sample": sample, "error": None, "image": res.image, "report": res.report}
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return {"sample": sample, "error": error_line(exc), "image": None, "report": None}


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
              log: Log = _stderr) -> dict:
    """Score a folder of results of any method against the dataset. Returns the summary dict."""
    reg = registry or default_registry()
    t_start = time.perf_counter()
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise BadInputError(f"results folder {str(results_dir)!r} does not exist or is not a folder")
    mets = load_metrics(reg, metrics, metric_params)
    ds, ds_name = open_dataset(reg, dataset_dir, dataset)
    samples = select_samples(ds, dataset_dir)
    if not samples:
        raise BadInputError(f"no samples found in {str(dataset_dir)!r}")
    out = Path(out) if out is not None else results_dir
    rows = [new_row(s) for s in samples]
    config = None
    for s, row in zip(samples, rows):
        path = find_result(results_dir, s.id)
        if path is None:
            continue
        row["result_path"] = path
        report = None
        if path.name in RESULT_NAMES and (path.parent / "run.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                report = json.loads((path.parent / "run.json").read_text())
            if isinstance(report, dict):
                _fill_from_report(row, report, s)
                config = config or report.get("config")
        try:
            image = _load_result(path)
        except BadInputError as exc:
            row["status"], row["error"] = "failed", error_line(exc)
            continue
        score_row(row, mets, s, image, row["final_handles"])
    found = sum(r["status"] != "missing" for r in rows)
    if not found:
        log(f"warning: no result image found for any of the {len(samples)} samples in {results_dir}; "
            "see docs/evaluation.md for the accepted layouts")
    dataset_info = {"name": ds_name, "folder": str(dataset_dir), "selected": len(samples)}
    summary = build_summary(rows, mets, command="score", dataset=dataset_info, config=config,
                            extra={"results_dir": str(results_dir)}, wall_s=time.perf_counter() - t_start)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, rows, mets, summary)
    write_report(out, rows, mets, summary, {s.id: s for s in samples}, "gooddrag score report",
                 [f"Results: `{results_dir}`", "", f"Dataset: {ds_name} `{dataset_dir}`, {len(samples)} samples", ""])
    return summary


def counts_line(summary: dict) -> str:
    c = summary["counts"]
    line = f"{c['ok']} ok, {c['failed']} failed, {c['missing']} missing of {c['total']} samples"
    if summary.get("command") == "bench":
        line += f" (edited now {c['edited']}, resumed {c['skipped']})"
    return line


def summary_table(summary: dict) -> Any:
    """A rich Table of the overall aggregates (and per group when there are few groups)."""
    from rich.table import Table

    agg = summary["aggregate"]
    groups = [g for g, vals in agg["by_group"].items() if any(vals.values())]
    show_groups = groups if 1 < len(groups) <= 6 else []
    table = Table("metric", "all", *show_groups)
    table.columns[0].no_wrap = True
    for name, vals in agg["overall"].items():
        for k, v in vals.items():
            table.add_row(k, _md_num(v), *(_md_num(agg["by_group"][g].get(name, {}).get(k)) for g in show_groups))
    return table
