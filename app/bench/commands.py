"""`gooddrag bench` and `gooddrag score` (typer command functions, registered by app/cli.py).

The work is in :mod:`gooddrag.app.bench.run`; these functions only declare the options, refuse
unknown ones, and print the summary table. See docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from gooddrag.app import options as O
from gooddrag.core.config import LoadOptions
from gooddrag.core.errors import BadInputError
from gooddrag.core.registry import default_registry


BASELINE_HELP = ("Also score the unedited inputs on the same samples and show them beside the method "
                 "(a method must beat them to have moved anything).")


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console

    from gooddrag.app.bench.results import counts_line, summary_table

    typer.echo(counts_line(summary))
    if any(summary["aggregate"]["overall"].values()):
        table = summary_table(summary)
        Console(width=max(Console().width, 20 + 10 * len(table.columns))).print(table)
    typer.echo(f"wrote {out}/results.csv, summary.json, report.md")


@O.with_load_options
def bench(
    dataset_dir: Path = typer.Argument(..., help="Benchmark folder (Drag100 or DragBench layout)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (samples/, results.csv, summary.json, report.md)."),
    dataset: str = typer.Option("auto", "--dataset", help="drag100, dragbench or auto (detect the layout)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples (sorted by id)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: every n-th selected sample from i (0-based)."),
    metrics: str = typer.Option("dai", "--metrics", help="Comma-separated metrics, e.g. dai,md,if."),
    metric_param: List[str] = typer.Option([], "--metric-param", help="metric.field=value, e.g. dai.gammas=1,5 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Edit every sample again, even finished ones."),
    runner: str = typer.Option("local", "--runner",
                               help="How samples are spread over devices: local, or ray (a Ray cluster, docs/scale-out.md)."),
    runner_param: List[str] = typer.Option([], "--runner-param",
                                           help="runner.field=value, e.g. ray.address=HOST:PORT (repeatable)."),
    preset: str = O.PRESET,
    schedule: Optional[str] = O.SCHEDULE,
    loss: Optional[str] = O.LOSS,
    tracker: Optional[str] = O.TRACKER,
    param: List[str] = O.PARAM,
    lora: str = O.LORA,
    seed: int = O.SEED,
    width: Optional[int] = O.WIDTH,
    prompts: bool = typer.Option(True, "--prompts/--no-prompts",
                                 help="Edit with each sample's prompt (DragBench) or with the empty prompt."),
    baseline: bool = typer.Option(False, "--baseline", help=BASELINE_HELP),
    load: LoadOptions = None,
) -> None:
    """Edit every sample of a benchmark, score it, and write results.csv, summary.json and report.md."""
    if out is None:
        raise BadInputError("--out DIR is required (where samples/, results.csv, summary.json and report.md go)")
    from gooddrag.app.bench.run import BenchOptions, run_bench

    O.silence_libraries(default_registry())
    if width is None:  # the model's own, read from its files (nothing loads)
        from gooddrag.core.backbone import model_width

        width = model_width(default_registry(), load.model, load.backbone, load.model_config)
    opts = BenchOptions(dataset_dir=dataset_dir, out=out, dataset=dataset, limit=limit, shard=shard, metrics=metrics,
                        metric_params=tuple(metric_param), force=force, runner=runner,
                        runner_params=tuple(runner_param), load=load, preset=preset, schedule=schedule, loss=loss,
                        tracker=tracker, params=tuple(param), lora=lora, seed=seed, width=width, prompts=prompts,
                        baseline=baseline)
    try:
        summary = run_bench(opts, tty=sys.stderr.isatty())
    except KeyboardInterrupt as exc:
        # typer turns a KeyboardInterrupt into a return value that main() does not pass on; an Abort
        # reaches main() and becomes exit status 130 (run_bench already said how to resume)
        raise click.exceptions.Abort() from exc
    _print_summary(summary, out)


def score(
    results_dir: Path = typer.Argument(..., help="Results of any method: <id>/result.png (+ run.json), or <id>.png."),
    dataset_dir: Path = typer.Argument(..., help="The benchmark folder the results belong to."),
    dataset: str = typer.Option("auto", "--dataset", help="drag100, dragbench or auto (detect the layout)."),
    metrics: str = typer.Option("dai", "--metrics", help="Comma-separated metrics, e.g. dai,md,if."),
    metric_param: List[str] = typer.Option([], "--metric-param", help="metric.field=value, e.g. dai.gammas=1,5 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where results.csv, summary.json, report.md go (default: RESULTS_DIR)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples (sorted by id), as bench --limit."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Only these sample ids, comma-separated."),
    baseline: bool = typer.Option(False, "--baseline", help=BASELINE_HELP),
) -> None:
    """Score a folder of results (any method) against a benchmark; missing results are counted."""
    from gooddrag.app.bench.score import run_score

    O.silence_libraries(default_registry())
    ids = [i.strip() for i in (samples or "").split(",") if i.strip()]
    summary = run_score(results_dir, dataset_dir, dataset=dataset, metrics=metrics, metric_params=metric_param, out=out,
                        limit=limit, sample_ids=ids, baseline=baseline)
    _print_summary(summary, out or results_dir)
