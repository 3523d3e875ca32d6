"""The ``gooddrag`` command line (typer). Errors print one line; ``--debug`` shows tracebacks."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.markup import escape

import gooddrag
from gooddrag.app import options as O
from gooddrag.core.config import LoadOptions
from gooddrag.core.errors import BadInputError, GoodDragError, GoodDragWarning, RequirementError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Point-based drag editing with diffusion models (GoodDrag, DragDiffusion).")
_STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gooddrag {gooddrag.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    disable_plugin: List[str] = typer.Option([], "--disable-plugin", metavar="NAME",
                                             help="Skip the plugin with this entry-point name (repeatable; "
                                                  "also GOODDRAG_DISABLE_PLUGINS=a,b)."),
) -> None:
    from gooddrag.core.registry import set_disabled

    _STATE["debug"] = debug
    set_disabled(disable_plugin)


@app.command()
@O.with_load_options
def edit(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="Input image (PNG/JPEG)."),
    points: List[str] = typer.Option([], "--points", help="A pair HX,HY:TX,TY in image pixels (repeatable)."),
    points_file: Optional[Path] = typer.Option(None, "--points-file",
                                               help=escape('JSON file {"points": [[hx,hy], [tx,ty], ...]}: handle, target, '
                                                           'handle, target, ... in image pixels.')),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Editable region, white = may change (default: all)."),
    preset: str = O.PRESET,
    schedule: Optional[str] = O.SCHEDULE,
    loss: Optional[str] = O.LOSS,
    tracker: Optional[str] = O.TRACKER,
    param: List[str] = O.PARAM,
    lora: str = O.LORA,
    prompt: str = typer.Option("", "--prompt", help="Text prompt (the method uses the empty prompt)."),
    seed: int = O.SEED,
    width: Optional[int] = O.WIDTH,
    gif: bool = typer.Option(False, "--gif", help="Also write drag.gif: after each drag, the image the model "
                             "predicts, with targets (blue), original handles (red) and current handles (yellow/black rings)."),
    frames: bool = typer.Option(False, "--frames", help="Also write those animation frames as frames/frame_NNN.png."),
    mp4: bool = typer.Option(False, "--mp4", help="Also write the animation as drag.mp4 (needs the video extra: "
                             "pip install 'gooddrag[video]')."),
    trace: bool = typer.Option(False, "--trace", help="Also write trace.jsonl (every step and tracking)."),
    out: Optional[Path] = O.OUT,
    latents: Optional[Path] = typer.Option(None, "--latents", help="latents.safetensors written by gooddrag "
                                           "generate for IMAGE: the edit starts from them (no inversion, no LoRA)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config; load no model."),
    load: LoadOptions = None,
) -> None:
    """Drag the content at each handle to its target."""
    from gooddrag.core.config import resolve_config
    from gooddrag.core.inputs import load_points_file, parse_points, prepare_input
    from gooddrag.core.registry import default_registry

    reg = default_registry()
    if load.backbone is not None:
        reg.get("backbone", load.backbone)  # an unknown name: one line listing the backbones that exist
    if width is None:  # the model's own, read from its files (nothing loads)
        from gooddrag.core.backbone import model_width

        width = model_width(reg, load.model, load.backbone, load.model_config)
    cfg = resolve_config(reg, preset=preset, schedule=schedule, loss=loss, tracker=tracker, overrides=param,
                         load=load, lora=lora, seed=seed, width=width)
    if points and points_file:
        raise BadInputError("give either --points or --points-file, not both")
    pairs = load_points_file(points_file) if points_file else parse_points(points)
    if not pairs:
        raise BadInputError("no points given; pass --points HX,HY:TX,TY or --points-file points.json")
    start = None
    if latents is not None:
        from gooddrag.core.latents import StartLatents

        start = StartLatents.load(latents)
        if not prompt and start.info.get("prompt"):
            prompt = str(start.info["prompt"])  # the edit denoises with the generation's prompt
    inp = prepare_input(image, pairs, mask, width=width)
    if start is not None:
        start.check(cfg.schedule_params.num_inference_steps, inp.work_size)  # before the model loads
    for note in inp.warnings:  # shown once: the edit below warns the same notes again
        warnings.warn(note, GoodDragWarning)
    if dry_run:
        typer.echo(json.dumps({**cfg.to_dict(), "sources": dict(cfg.sources)}, indent=2))
        return
    if out is None:
        raise BadInputError("--out DIR is required (where result.png, points.png and run.json go)")
    from gooddrag.app.outputs.files import OUTPUT_NAMES, check_output_set, output_lock
    from gooddrag.app.outputs.gif import VIDEO_HINT, video_writer_available

    # a new edit replaces (or removes) every name of the output set, so none may be an input
    check_output_set(out, OUTPUT_NAMES, {"image": image, "mask": mask, "points file": points_file,
                                         "lora": None if lora in ("auto", "off") else lora})
    if mp4 and not video_writer_available():
        raise RequirementError(f"--mp4 needs a video writer; {VIDEO_HINT}, or drop --mp4 (--frames writes PNGs)")
    # held until the command ends: a second edit into this --out stops here, before its model loads
    ctx.with_resource(output_lock(out))
    check_output_set(out, OUTPUT_NAMES, {})  # again, now that no other edit can change it
    from gooddrag.app.outputs.files import clear_partials, staging, write_result_files
    from gooddrag.app.outputs.gif import GifWriter

    O.silence_libraries(reg)
    from gooddrag.core.editor import Editor
    from gooddrag.app.outputs.progress import ProgressDisplay
    from gooddrag.app.outputs.trace import TraceWriter

    editor = Editor.from_pretrained(cfg.load, registry=reg)
    if out.is_dir():
        clear_partials(out)  # left by a killed edit
    removed: list[str] = []
    with staging(out, replaces=OUTPUT_NAMES, removed=removed) as tmp:
        tracer = TraceWriter(tmp / "trace.jsonl") if trace else None
        gifw = GifWriter(editor.backbone, inp) if (gif or frames or mp4) else None
        progress = ProgressDisplay() if sys.stderr.isatty() else None
        plugins = [x for x in (tracer, gifw, progress) if x is not None]
        from gooddrag.core.estimate import cpu_estimate

        estimate = cpu_estimate(editor.backbone, reg, cfg, inp.work_size)  # full-size model on a CPU only
        if estimate:
            typer.echo(estimate, err=True)
        try:
            result = editor.run(inp, cfg, prompt=prompt, plugins=plugins, start_latents=start)
        finally:
            if tracer:
                tracer.close()
            if progress:
                progress.stop()
        result.report["input"] = {"image": str(image), "mask": str(mask) if mask else None,
                                  "points_file": str(points_file) if points_file else None,
                                  "latents": str(latents) if latents else None}
        write_result_files(tmp, inp.image, result)
        if gif:
            gifw.save_gif(tmp / "drag.gif", result.image, result.points)
        if frames:
            gifw.save_frames(tmp / "frames", result.image, result.points)
        if mp4:
            gifw.save_mp4(tmp / "drag.mp4", result.image, result.points)
    if removed:
        typer.echo(f"warning: removed {', '.join(sorted(removed))} of the previous edit in {out} "
                   "(an edit replaces all its output files)", err=True)
    r = result.report
    typer.echo(f"wrote {out}/result.png ({r['stop_reason']} after {r['gradient_steps']} steps; "
               f"final handles {r['final_handles_xy']})")


@app.command()
@O.with_load_options
def generate(
    prompt: str = typer.Argument(..., help="What the image shows."),
    out: Path = typer.Option(..., "--out", help="Folder for image.png, latents.safetensors and generation.json."),
    seed: int = O.SEED,
    steps: int = typer.Option(50, "--steps", help="DDIM steps; edit it with the same schedule.num_inference_steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale (1 = none)."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in px, a multiple of 8 (default: the model's)."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in px, a multiple of 8 (default: the width)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt (the unconditional branch)."),
    load: LoadOptions = None,
) -> None:
    """Generate an image from a prompt and keep its denoising latents, so `gooddrag edit IMAGE --latents
    DIR/latents.safetensors` drags it without inverting it."""
    from gooddrag.core.registry import default_registry

    if steps < 1:
        raise BadInputError(f"--steps {steps}: give at least 1")
    if guidance <= 0:
        raise BadInputError(f"--guidance {guidance}: give a positive scale (1 = no guidance)")
    for name, v in (("--width", width), ("--height", height)):
        if v is not None and (v % 8 or v < 16):
            raise BadInputError(f"{name} {v}: give a multiple of 8, at least 16")
    from gooddrag.app.outputs.files import staging

    reg = default_registry()
    O.silence_libraries(reg)
    from gooddrag.core.editor import Editor

    editor = Editor.from_pretrained(load, registry=reg)
    image, latents = editor.generate(prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                     negative=negative)
    with staging(out, replaces=("image.png", "latents.safetensors", "generation.json")) as tmp:
        image.save(tmp / "image.png")
        latents.save(tmp)
    w, h = image.size
    typer.echo(f"wrote {out}/image.png ({w}x{h}, {steps} steps) with its latents; drag it with: gooddrag edit "
               f"{out}/image.png --latents {out}/latents.safetensors --width {w} "
               f"-p schedule.num_inference_steps={steps} --points HX,HY:TX,TY --out DIR")


@app.command()
def plugins(params: bool = typer.Option(False, "--params", help="Also list every parameter with its default.")) -> None:
    """List every plugin (loaded, broken, disabled) and every component it registered."""
    from rich.console import Console
    from rich.table import Table

    from gooddrag.core.params import describe_params
    from gooddrag.core.registry import KINDS, default_registry

    reg = default_registry()
    console = Console(width=None if sys.stdout.isatty() else 200)  # no wrapping when piped
    found = Table("plugin", "status", "from", "components / reason", title="plugins")
    for name, info in sorted(reg.infos.items()):
        what = (f"{info.reason}; {info.fix}" if info.status == "broken"
                else ", ".join(f"{k} {n}" for k, n in info.components) or "(nothing)")
        found.add_row(name, info.status, escape(info.source), escape(what))
    console.print(found)
    table = Table("kind", "name", "plugin", "description", *(["params (default) - help"] if params else []),
                  show_lines=params)
    for kind in KINDS:
        for name, comp in reg.items(kind):
            doc = comp.doc if kind == "preset" else (comp.__doc__ or "")
            row = [kind, name, reg.owner(kind, name), escape(_first_paragraph(doc))]
            if params:
                if kind == "preset":
                    parts = (comp.schedule, comp.loss, comp.tracker)
                    row.append(" + ".join(x for x in parts if x) + "; " + json.dumps(dict(comp.params)))
                else:
                    row.append(escape("\n".join(f"{f} = {d} - {h}" for f, _, d, h in describe_params(comp)))
                               or "(none)")
            table.add_row(*row)
    if params:  # settings that are not a component's but are set the same way (-p lora.rank=8)
        from gooddrag.core.lora import LoraParams

        class _Lora:
            Params = LoraParams

        table.add_row("lora", "(per-image LoRA)", "gooddrag", _first_paragraph(LoraParams.__doc__ or ""),
                      escape("\n".join(f"{f} = {d} - {h}" for f, _, d, h in describe_params(_Lora))))
    console.print(table)


def _first_paragraph(doc: str) -> str:
    """A docstring's opening paragraph on one line (a wrapped sentence must not be cut at the wrap)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


@app.command()
@O.with_load_options
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    preset: str = O.PRESET,
    lora: str = O.LORA,
    width: Optional[int] = O.WIDTH,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for each edit's files (default: a temp folder)."),
    samples: Path = typer.Option(Path("gooddrag-samples"), "--samples",
                                 help='Folder that "save as sample" writes Drag100 samples into.'),
    lora_dir: List[Path] = typer.Option([], "--lora-dir", help="A folder the page's LoRA path may read from "
                                        "(repeatable; no other path is read)."),
    max_upload_mb: float = typer.Option(25, "--max-upload-mb", help="Largest upload the server accepts, in MB."),
    load: LoadOptions = None,
) -> None:
    """Interactive drag editor in the browser (needs the extra gooddrag[ui])."""
    from gooddrag.app.ui import default_out, launch, require_gradio
    from gooddrag.core.config import resolve_config
    from gooddrag.core.registry import default_registry

    require_gradio()
    reg = default_registry()
    if width is None:  # the model's own, read from its files (nothing loads)
        from gooddrag.core.backbone import model_width

        width = model_width(reg, load.model, load.backbone, load.model_config)
    resolve_config(reg, preset=preset, load=load, lora=lora, width=width)  # bad options fail here, before serving
    O.silence_libraries(reg)
    from gooddrag.app.ui.page import UiSettings

    if not max_upload_mb > 0:
        raise BadInputError(f"--max-upload-mb {max_upload_mb:g}: give a size above 0, e.g. 25")
    settings = UiSettings(load=load, width=width, lora=lora, preset=preset, out=out or default_out(), samples=samples,
                          lora_dirs=lora_dir)
    typer.echo(f"gooddrag ui: http://{host}:{port} (model {load.model}, loaded on the first edit; Ctrl-C stops)")
    launch(settings, host=host, port=port, quiet=True, max_upload_mb=max_upload_mb)


from gooddrag.app.bench.commands import bench, score  # noqa: E402  (their options live with them)

app.command()(bench)
app.command()(score)


@contextlib.contextmanager
def _plugin_warnings_as_lines():
    """A skipped plugin or a GoodDragWarning is one ``warning: ...`` line on stderr, each message once
    per command (a bench resolves the same config for every sample)."""
    from gooddrag.core.registry import PluginWarning, set_disabled

    shown = warnings.showwarning
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (PluginWarning, GoodDragWarning)):
            if str(message) not in seen:
                seen.add(str(message))
                typer.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        warnings.simplefilter("always", GoodDragWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            set_disabled(())


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the app; a GoodDragError becomes ``error: <message>`` and exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        with _plugin_warnings_as_lines():
            rv = app(args=args, prog_name="gooddrag", standalone_mode=False)
        if rv == 130:  # typer returns 130 for a Ctrl-C it caught, silently
            typer.echo("interrupted: no partial output was kept", err=True)
        return rv if isinstance(rv, int) else 0
    except (typer.Exit, click.exceptions.Exit) as exc:
        return exc.exit_code
    except (typer.Abort, click.exceptions.Abort):
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted: no partial output was kept", err=True)
        return 130
    except GoodDragError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return 2
    except OSError as exc:  # disk full, file too large, read-only, ...: the file and the cause, in one line
        if debug or not exc.strerror:
            raise
        where = f"cannot write {exc.filename}: " if exc.filename and exc.errno in _write_errnos() else (
            f"{exc.filename}: " if exc.filename else "")
        typer.echo(f"error: {where}{exc.strerror}", err=True)
        return 1
    except Exception as exc:
        if debug:
            raise
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a usage error of typer's click
            command = next((a for a in args if not a.startswith("-")), "")
            typer.echo(f"error: {exc.format_message()}; see 'gooddrag {command} --help'".replace("  ", " "), err=True)
            return exc.exit_code
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return 1


def _write_errnos() -> set[int]:
    from gooddrag.app.outputs.files import WRITE_ERRNOS

    return WRITE_ERRNOS


def run() -> None:
    sys.exit(main())
