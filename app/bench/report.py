"""``report.md`` of a benchmark and its PNG plots (box plots per metric and group, time per phase,
best/worst grids)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from gooddrag.core.samples import Sample
from gooddrag.app.bench.results import PHASES, atomic_write, atomic_write_text, error_line, md_num, metric_keys


def save_figure(fig: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layout notes on odd image shapes
            fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")

    atomic_write(path, write, ".png")


# --- report.md and plots ------------------------------------------------------------------------


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
    base = agg.get("baseline_unedited")
    if any(agg["overall"].values()):
        if base is not None:
            md += ["The unedited input (result = original, handles left where they are) is scored on the same "
                   "samples: a method must beat it to have moved anything.", "",
                   "| metric | key | value | unedited input |", "| --- | --- | --- | --- |"]
        else:
            md += ["| metric | key | value |", "| --- | --- | --- |"]
        for m in metrics:
            for k, v in agg["overall"].get(m.name, {}).items():
                cell = f" {md_num(base.get(m.name, {}).get(k))} |" if base is not None else ""
                md.append(f"| {m.name} ({direction[m.name]}) | {k} | {md_num(v)} |{cell}")
    else:
        md.append("No sample was scored.")
    md.append("")
    md += _drag_section(summary.get("drag") or {})
    drag_at = len(md)  # the distance plot goes here once it is drawn
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
            md.append(f"| {g} | " + " | ".join(md_num(vals.get(m.name, {}).get(k)) for k in mkeys) + " |")
        md.append("| **all** | " + " | ".join(md_num(agg["overall"][m.name].get(k)) for k in mkeys) + " |")
        md.append("")
    ok = [r for r in rows if r["status"] == "ok"]
    try:
        plots = _plots(out, rows, metrics, keys, samples)
    except Exception as exc:  # a plot must never cost the tables
        plots, md = {}, md + [f"(plots failed: {error_line(exc)})", ""]
    written += list(plots.values())
    if "drag" in plots:
        md[drag_at:drag_at] = [f"![final handle-to-target distance]({plots['drag'].name})", ""]
    for m in metrics:
        if f"dist_{m.name}" in plots:
            md += [f"## Distribution: {m.name}", "", f"![{m.name}]({plots[f'dist_{m.name}'].name})", ""]
    if "time" in plots:
        t = summary["totals"]
        md += ["## Time per sample", "",
               f"Total edit time {md_num(t['edit_time_s'])} s, mean {md_num(t['mean_edit_time_s'])} s per sample "
               "(phases from run.json timings_s).", "", f"![time]({plots['time'].name})", ""]
    if "best_worst" in plots and keys:
        md += [f"## Best and worst edits by {keys[0][1]}", "",
               "Each row: input with handles (red) and targets (blue) | result with the final handles (yellow/black rings).", "",
               f"![best and worst]({plots['best_worst'].name})", ""]
    if summary["command"] == "bench":
        md += _placement_lines(rows, summary)
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


def _placement_lines(rows: list[dict], summary: dict) -> list[str]:
    """Throughput of this run per worker, and which node and device edited each sample."""
    placed = [r for r in rows if r.get("placement")]
    if not placed:
        return []
    md = ["## Workers and throughput", ""]
    tp = summary.get("throughput")
    if tp:
        md += [f"This run edited {tp['edited']} samples in {md_num(tp['edit_wall_s'])} s (model loading included) on "
               f"{tp['workers']} workers of the `{tp['runner']}` runner: {md_num(tp['samples_per_hour'])} samples/hour, "
               f"**{md_num(tp['samples_per_hour_per_worker'])} samples/hour/{tp['unit']}**.", ""]
    workers: dict[tuple, list[dict]] = {}
    for r in placed:
        p = r["placement"]
        workers.setdefault((p.get("worker") or "-", p.get("node", "?"), p.get("device", "?")), []).append(r)
    md += ["| worker | node | device | samples | edit time s | samples/hour while editing |",
           "| --- | --- | --- | --- | --- | --- |"]
    for (worker, node, device), rs in sorted(workers.items()):
        busy = sum(sum(r["timings"].values()) for r in rs if r["timings"])
        rate = len(rs) / busy * 3600 if busy else None
        md.append(f"| {worker} | {node} | {device} | {len(rs)} | {md_num(busy)} | {md_num(rate)} |")
    if any(not r["placement"].get("worker") for r in placed):
        md += ["", "Worker `-`: edited by an earlier run (resumed)."]
    md += ["", "### Where each sample was edited", "",
           "| sample | worker | node | device |", "| --- | --- | --- | --- |"]
    for r in placed:
        p = r["placement"]
        md.append(f"| {r['id']} | {p.get('worker') or '-'} | {p.get('node', '?')} | {p.get('device', '?')} |")
    return md + [""]


def _drag_section(d: dict) -> list[str]:
    """How dragging ended: the reached rate, the stop reasons, the final distances (image px)."""
    if not d.get("samples") and not d.get("final_dist_px"):
        return []
    md = ["## Dragging", ""]
    if d.get("samples"):
        md += [f"Every handle reached its target in **{d['reached']} of {d['samples']}** samples "
               f"({100 * d['reached_rate']:.0f} %); the engine stops with `reached` when all handles are within "
               "the schedule's reach distance.", "", "| stop reason | samples |", "| --- | --- |"]
        md += [f"| {k} | {n} |" for k, n in d["stop_reasons"].items()] + [""]
    dist = d.get("final_dist_px")
    if dist:
        md += ["Final handle-to-target distance per sample (mean over its pairs, image px): "
               f"mean {md_num(dist['mean'])}, median {md_num(dist['median'])}, 90th percentile {md_num(dist['p90'])}, "
               f"min {md_num(dist['min'])}, max {md_num(dist['max'])} (n={dist['n']}).", ""]
    return md


def _plots(out: Path, rows: list[dict], metrics: Sequence[Any], keys: list[tuple[str, str]],
           samples: dict[str, Sample]) -> dict[str, Path]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

    ok = [r for r in rows if r["status"] == "ok"]
    plots: dict[str, Path] = {}
    if not ok:
        return plots
    groups = sorted({r["group"] for r in ok})
    dists = [r for r in ok if r["final_dist_px"] is not None]
    if dists:
        fig = Figure(figsize=(6.0, 3.0), dpi=100, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        for reached, colour, label in ((True, "tab:green", "reached"), (False, "tab:red", "not reached"),
                                       (None, "tab:gray", "no edit report")):
            vals = [r["final_dist_px"] for r in dists if r["reached"] is reached]
            if vals:
                ax.hist(vals, bins=min(20, max(5, len(dists))), range=(0, max(r["final_dist_px"] for r in dists) + 1e-9),
                        color=colour, alpha=0.7, edgecolor="white", label=f"{label} (n={len(vals)})")
                ax.plot(vals, [0] * len(vals), "|", color=colour, markersize=14, clip_on=False)  # each sample
        ax.set_xlabel("final handle-to-target distance, mean over the sample's pairs (image px)")
        ax.set_ylabel("samples")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, frameon=False)
        ax.set_title("where the handles ended", fontsize=10)
        path = out / "plot_drag.png"
        save_figure(fig, path)
        plots["drag"] = path
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
        save_figure(fig, path)
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
        save_figure(fig, path)
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

    from gooddrag.app.outputs.draw import draw_points

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
        right = _thumb(draw_points(res, handles, targets, current=r["final_handles"]))
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
    save_figure(fig, path)
    return path
