"""The edit of one sample on one device: what a runner runs, here or in another process."""

from __future__ import annotations

import functools
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from gooddrag.core.config import EditConfig
from gooddrag.core.errors import BadInputError, GoodDragWarning
from gooddrag.core.registry import Registry
from gooddrag.core.samples import Sample
from gooddrag.app.bench.results import error_line

if TYPE_CHECKING:
    from gooddrag.app.bench.run import BenchOptions


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


def store_files(folder: Path, files: dict[str, bytes]) -> None:
    """One sample's files, all or none (a killed earlier attempt may have left a staging folder)."""
    from gooddrag.app.outputs.files import clear_partials, staging, write_files

    clear_partials(folder)
    with staging(folder) as tmp:
        write_files(tmp, files)
