"""Options shared by `gooddrag edit`, `ui` and `bench` (one definition, one help text), and the
quiet start-up they use.

The load options are not listed here: ``with_load_options`` makes one typer option per field of
``core.config.LoadOptions`` (its default and help) and hands the command one ``LoadOptions``."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, List, Optional

import attrs
import typer

from gooddrag.core.config import LoadOptions


def with_load_options(command: Callable) -> Callable:
    """Replace the command's ``load: LoadOptions`` parameter by one ``--flag`` per LoadOptions field."""
    sig = inspect.signature(command)
    fields = attrs.fields(LoadOptions)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(f),
                               default=typer.Option(f.default, f.metadata.get("flag") or f"--{f.name}",
                                                    help=f.metadata["help"]))
             for f in fields]
    params = [p for p in sig.parameters.values() if p.name != "load"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        load = LoadOptions(**{f.name: kwargs.pop(f.name) for f in fields})
        return command(*args, load=load, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*params, *extra])
    wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "load"}
    wrapper.__annotations__.update({f.name: _annotation(f) for f in fields})
    return wrapper


def _annotation(field: Any) -> Any:
    """The option's type for typer: its default's type; an option that defaults to None is a str."""
    return Optional[str] if field.default is None else type(field.default)


PRESET = typer.Option("gooddrag", "--preset", help="gooddrag, gooddrag-bench, dragdiffusion, dragdiffusion-star, instant, instant-refine (see gooddrag plugins).")
SCHEDULE = typer.Option(None, "--schedule", help="Drag schedule (default: the preset's).")
LOSS = typer.Option(None, "--loss", help="Motion-supervision loss (default: the preset's).")
TRACKER = typer.Option(None, "--tracker", help="Point tracker (default: the preset's).")
PARAM = typer.Option([], "-p", "--param", help="Set a parameter as kind.field=value, kind one of schedule, loss, tracker, "
                     "lora, backbone (see 'gooddrag plugins --params'); repeatable.")
LORA = typer.Option("auto", "--lora", help="auto (train once per image, cached), off, or a LoRA path.")
SEED = typer.Option(0, "--seed", help="Random seed.")
WIDTH = typer.Option(None, "--width", help="Working width in pixels (height follows the aspect); by default "
                          "the model's own: SD1.5 512 (the method's), SD 2.x 768, SDXL 1024.")
OUT = typer.Option(None, "--out", help="Output folder.")


def silence_libraries(registry: Any) -> None:
    """Library chatter (deprecations, hub notices, progress bars) is not ours to show: every registered
    backbone that knows how quietens its own libraries (``quiet()``)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for _, component in registry.items("backbone"):
        if callable(getattr(component, "quiet", None)):
            component.quiet()


__all__ = ["with_load_options", "PRESET", "SCHEDULE", "LOSS", "TRACKER", "PARAM", "LORA", "SEED", "WIDTH", "OUT",
           "List", "Optional"]
