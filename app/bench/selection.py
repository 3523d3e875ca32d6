"""Which samples and which components a bench or score run uses: the dataset, its selection
(--limit, --shard), the metrics and the runner, each checked before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gooddrag.core.errors import BadInputError, ConfigError
from gooddrag.core.params import build_params, parse_assignments
from gooddrag.core.registry import Registry
from gooddrag.core.samples import Sample


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
