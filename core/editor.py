"""The Python API: ``Editor.from_pretrained(load)`` loads the backbone once; ``editor.run(input, config)``
runs one drag edit (the steps are in ``core/engine.py``); ``editor.edit(image, points, ...)`` is the
short way that validates the input and resolves the config itself."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Any, Iterable, Sequence

import attrs
import torch

from gooddrag.core.backbone import capability, contract_problems, require, select_backbone
from gooddrag.core.config import DEFAULT_MODEL, OVERRIDE_KINDS, EditConfig, LoadOptions, resolve_config
from gooddrag.core.devices import DTYPE_NAMES
from gooddrag.core.engine import EditResult, generate, run_edit
from gooddrag.core.errors import ConfigError, GoodDragWarning
from gooddrag.core.inputs import EditInput, Pair, prepare_input
from gooddrag.core.latents import StartLatents
from gooddrag.core.registry import Registry, default_registry

log = logging.getLogger("gooddrag")


__all__ = ["Editor", "EditResult", "keyword_overrides", "select_backbone"]


class Editor:
    """Holds a loaded backbone and the plugin registry; edits any number of images.

    ``load`` are the options the backbone was loaded with (``LoadOptions``); an ``EditConfig`` resolved
    for other load options is refused by :meth:`run`."""

    def __init__(self, backbone: Any, registry: Registry | None = None, load: LoadOptions | None = None,
                 **options: Any):
        missing = contract_problems(backbone)
        if missing:
            raise ConfigError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} does not meet the "
                              f"backbone contract (core/backbone.py): it lacks {', '.join(missing)}")
        self.backbone = backbone
        self.registry = registry or default_registry()
        b = backbone
        loaded = dict(model=b.model_id, vae=b.vae_id, device=str(b.device), dtype=DTYPE_NAMES[b.dtype],
                      attention=b.attention, backbone=b.name)  # the backbone that claimed the model
        #: what was asked for (``device="auto"``) and what it became (``device="cpu"``)
        self.requested = attrs.evolve(load or LoadOptions(**loaded), **options)
        self.load = attrs.evolve(self.requested, **loaded)
        if self.load.low_memory:
            require(b, "supports_low_memory", "a low-memory mode", "low_memory (--low-memory)")
            b.set_low_memory(True)
        if self.load.compile and not b.compiled:
            require(b, "supports_compile", "torch.compile support", "compile (--compile)")
            b.compile()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, load: LoadOptions | str = DEFAULT_MODEL, *, registry: Registry | None = None,
                        verbose: bool = False, **options: Any) -> "Editor":
        """Load the backbone once. ``load`` is a :class:`LoadOptions`, or a model name with the other
        load options as keywords (``Editor.from_pretrained("tiny-random", device="cpu")``).

        ``faithful=True`` keeps the reference code path (no fast paths, no TF32, default memory layout):
        slower, for checking that the fast paths change nothing. ``precision`` is the compute precision
        of the heavy UNet passes (LoRA training, reference, drag): ``auto`` autocasts fp32 weights to
        bf16 where the device multiplies bf16 in hardware, ``fp32`` keeps exact fp32, ``bf16``/``fp16``
        force that autocast. ``low_memory`` keeps the VAE and text encoder in host memory except during
        their calls (same results, for small GPUs). ``compile`` runs the UNet's transformer blocks
        through torch.compile (the first pass of each shape compiles; a compile error falls back to
        eager with a warning).

        The backbone is the one that claims the model's files (``model_index.json``'s pipeline class, a
        single file's tensor names), or ``backbone`` by name; what it cannot read (a prediction type
        other than epsilon or v_prediction, a pipeline nobody takes) is refused before weights load.
        ``model_config`` is the local diffusers folder whose configs a single-file checkpoint uses.

        Quiet by default: the backbone's libraries (diffusers, transformers, the hub) are set to
        errors only, without progress bars, for this process; ``verbose=True`` leaves them as they
        are. gooddrag's own warnings (``GoodDragWarning``) and log lines (logger ``gooddrag``) are not
        affected."""
        if isinstance(load, str):
            load = LoadOptions(model=load, **_known_load_options(options))
        elif options:
            raise ConfigError(f"give the load options either as LoadOptions or as keywords, not both "
                              f"({', '.join(sorted(options))})")
        load.check()  # before anything loads
        registry = registry or default_registry()
        component, files = select_backbone(registry, load.model, load.backbone, load.model_config)
        if load.low_memory:
            require(component, "supports_low_memory", "a low-memory mode", "low_memory (--low-memory)")
        if load.compile:
            require(component, "supports_compile", "torch.compile support", "compile (--compile)")
        if not verbose:
            component.quiet()
        backbone = component.load(load.model, vae=load.vae, device=load.device, dtype=load.dtype,
                                  attention=load.attention, files=files)
        if not load.faithful:
            backbone.optimize()
        log.info("loaded %s on %s (backbone %s)", load.model, backbone.device, backbone.name)
        return cls(backbone, registry, load=load)

    def config(self, *, preset: str = "gooddrag", schedule: str | None = None, loss: str | None = None,
               tracker: str | None = None, overrides: Sequence[str] | dict = (), lora: str = "auto",
               seed: int = 0, width: int | None = None) -> EditConfig:
        """Resolve an EditConfig for this editor's load options (one-line ConfigError on bad values).
        ``width`` None: the model's own (``backbone.default_width``: SD1.5 512, SD 2.x 768, SDXL 1024)."""
        width = self.backbone.default_width if width is None else width
        return resolve_config(self.registry, preset=preset, schedule=schedule, loss=loss, tracker=tracker,
                              overrides=overrides, backbone=type(self.backbone), load=self.load, lora=lora,
                              seed=seed, width=width)

    def edit(self, image: Any, points: Sequence[Pair], mask: Any = None, *, preset: str = "gooddrag",
             schedule: str | None = None, loss: str | None = None, tracker: str | None = None,
             overrides: Sequence[str] | dict = (), lora: str = "auto", prompt: str = "", seed: int = 0,
             width: int | None = None, plugins: Iterable[Any] = (), **params: Any) -> EditResult:
        """Drag ``points`` ([(handle_xy, target_xy), ...] in image px) in ``image``: a short way to
        ``editor.run(prepare_input(...), editor.config(...))``.

        Parameters can be overridden as ``overrides=["loss.lam=0.1"]`` (the CLI's ``-p``) or as keywords
        ``kind_field=value``: ``loss_lam=0.1, schedule_drag_timesteps=5, lora_steps=100``.
        ``plugins`` are objects implementing event hooks (trace, GIF, progress) for this edit only.
        """
        overrides = [*overrides, *keyword_overrides(params)] if not isinstance(overrides, dict) else overrides
        width = self.backbone.default_width if width is None else width  # the model's own by default
        cfg = self.config(preset=preset, schedule=schedule, loss=loss, tracker=tracker, overrides=overrides,
                          lora=lora, seed=seed, width=width)
        inp = prepare_input(image, points, mask, width=width)
        for note in inp.warnings:
            warnings.warn(note, GoodDragWarning, stacklevel=2)
        return self.run(inp, cfg, prompt=prompt, plugins=plugins)

    def run(self, inp: EditInput, cfg: EditConfig, *, prompt: str = "", plugins: Iterable[Any] = (),
            start_latents: StartLatents | None = None) -> EditResult:
        """Run one edit of a validated input with a resolved config (``core.engine.run_edit``).
        ``start_latents``: the image's known trajectory (``Editor.generate``): no inversion.

        Edits on one Editor run one at a time (a second thread waits for the first)."""
        if plugins is None or isinstance(plugins, (str, bytes, dict)) or not hasattr(plugins, "__iter__"):
            raise ConfigError(f"plugins is {plugins!r}; give a list of hook objects (e.g. [TraceWriter(path)]), "
                              "or () for none")
        plugins = list(plugins)
        if any(p is None for p in plugins):
            raise ConfigError("plugins holds None; give a list of hook objects, or () for none")
        if cfg.load not in (self.requested, self.load):
            raise ConfigError(f"this config was resolved for model {cfg.load.model!r} with other load options than "
                              f"this Editor's ({self.load.model!r}); resolve it with editor.config(...) or load an "
                              "Editor with Editor.from_pretrained(cfg.load)")
        if cfg.width != inp.work_size[0]:
            raise ConfigError(f"the input was prepared at width {inp.work_size[0]} but the config says width "
                              f"{cfg.width}; prepare it with prepare_input(..., width=cfg.width)")
        cfg = attrs.evolve(cfg, load=self.load)  # the report names the device it ran on
        with self._lock:
            self._configure_backbone(cfg.backbone_params)
            notes = [*cfg.notes, *inp.warnings]
            with _registered(self.registry.pm, plugins), _recorded_warnings(notes), \
                    _tf32(not cfg.load.faithful and self.backbone.device.type == "cuda"):
                try:
                    return run_edit(self.backbone, self.registry, cfg, inp, prompt, notes, start_latents)
                except Exception as exc:  # a compile error the backbone could not catch (in a backward pass)
                    b = self.backbone
                    if not (b.compiled and b.is_compile_error(exc)):
                        raise
                    b.fall_back_to_eager(exc)
                    return run_edit(self.backbone, self.registry, cfg, inp, prompt, notes, start_latents)
                finally:  # the result is out (or the edit failed after training its LoRA, still worth caching)
                    if capability(self.backbone, "defers_writes"):
                        self.backbone.write_deferred()


    def generate(self, prompt: str, *, seed: int = 0, steps: int = 50, guidance: float = 7.5,
                 width: int | None = None, height: int | None = None, negative: str = "") -> tuple[Any, StartLatents]:
        """An image from ``prompt`` and its denoising latents (``core.engine.generate``); drag it with
        ``run(inp, cfg, start_latents=latents)`` (no inversion). Size: the model's own by default."""
        size = getattr(self.backbone, "default_width", 512)
        with self._lock:
            self.backbone.use_lora("off", None, None)  # the generation belongs to the model without a LoRA
            return generate(self.backbone, prompt, seed=seed, steps=steps, guidance=guidance,
                            width=width or size, height=height or width or size, negative=negative)

    def _configure_backbone(self, params: Any) -> None:
        b = self.backbone
        if params is None or params == b.params:
            return
        if not capability(b, "configurable"):
            raise ConfigError(f"backbone {b.name!r} cannot change its parameters after loading; leave backbone.* "
                              "at the defaults")
        b.configure(params)


def _known_load_options(options: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in attrs.fields(LoadOptions)} - {"model"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown load option {unknown[0]!r}; use one of {', '.join(sorted(names))}")
    return options


def keyword_overrides(params: dict[str, Any]) -> list[str]:
    """``{"loss_lam": 0.1}`` -> ``["loss.lam=0.1"]``; the kind is the part before the first underscore."""
    out = []
    for key, value in params.items():
        kind, _, field = key.partition("_")
        if kind not in OVERRIDE_KINDS or not field:
            raise ConfigError(f"unknown keyword {key!r}; override parameters as kind_field=value, "
                              "e.g. loss_lam=0.1 or schedule_drag_timesteps=5")
        out.append(f"{kind}.{field}={value}")
    return out


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 tensor cores for fp32 matmuls on CUDA (cuDNN convolutions use them by default), for
    this edit only: about 3x the fp32 matmul rate for a 10-bit mantissa in the products."""
    if not on:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _recorded_warnings(notes: list[str]):
    """GoodDragWarnings raised during the edit (a damaged cache retrained, ...) also go to ``notes``
    (the report's ``warnings``) as they happen; every warning is still shown as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", GoodDragWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, GoodDragWarning):
                notes.append(str(message))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _registered(pm: Any, plugins: Iterable[Any]):
    plugins = list(plugins)
    for p in plugins:
        pm.register(p)
    try:
        yield
    finally:
        for p in plugins:
            pm.unregister(p)
