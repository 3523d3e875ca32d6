"""The Python API: ``Editor.from_pretrained(...)`` loads the backbone once; ``editor.edit(...)`` runs
one drag edit (LoRA, inversion, reference, drag, mutual-attention finish, decode)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import resource
import time
import warnings
from typing import Any, Iterable, Sequence

import attrs
import torch
from PIL import Image

from gooddrag.core.config import (DEFAULT_BACKBONE, DEFAULT_MODEL, OVERRIDE_KINDS, EditConfig, check_precision,
                                  resolve_config)
from gooddrag.core.contracts import CheckedLoss, CheckedTracker
from gooddrag.core.devices import DTYPE_NAMES, resolve_precision
from gooddrag.core.engine import DragContext, Events, Points, Reference, drag_window
from gooddrag.core.errors import ConfigError, DivergedError, GoodDragWarning
from gooddrag.core.inputs import EditInput, Pair, prepare_input
from gooddrag.core.registry import Registry, default_registry

log = logging.getLogger("gooddrag")


@attrs.define
class EditResult:
    """The edited image (original size), final handles in image px, and the run report."""

    image: Image.Image
    points: list[list[int]]
    report: dict[str, Any]


def select_backbone(registry: Registry, model: str) -> Any:
    """A model name that is a registered backbone (e.g. ``tiny-random``) picks it; anything else
    (hub id, folder, file) goes to the ``stable-diffusion`` backbone."""
    if model in registry.names("backbone"):
        return registry.get("backbone", model)
    return registry.get("backbone", DEFAULT_BACKBONE)


class Editor:
    """Holds a loaded backbone and the plugin registry; edits any number of images."""

    def __init__(self, backbone: Any, registry: Registry | None = None, faithful: bool = False,
                 precision: str = "auto", low_memory: bool = False, compile: bool = False):
        self.backbone = backbone
        self.registry = registry or default_registry()
        self.faithful = faithful
        self.precision = precision
        self.low_memory = low_memory
        if low_memory:
            _supports(type(backbone), "set_low_memory", "a low-memory mode", "low_memory (--low-memory)")
            backbone.set_low_memory(True)
        if compile and not getattr(backbone, "compiled", False):
            _supports(type(backbone), "compile", "torch.compile support", "compile (--compile)")
            backbone.compile()
        self.compile = compile

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, vae: str = "auto", device: str = "auto",
                        dtype: str = "fp32", attention: str = "auto", faithful: bool = False,
                        precision: str = "auto", low_memory: bool = False, compile: bool = False,
                        registry: Registry | None = None, verbose: bool = False) -> "Editor":
        """Load the backbone for ``model`` once. ``faithful=True`` keeps the reference code path (no
        fast paths, no TF32, default memory layout): slower, for checking that the fast paths change
        nothing. ``precision`` is the compute precision of the heavy UNet passes (LoRA training,
        reference, drag): ``auto`` autocasts fp32 weights to bf16 where the device multiplies bf16 in
        hardware, ``fp32`` keeps exact fp32, ``bf16``/``fp16`` force that autocast. ``low_memory``
        keeps the VAE and text encoder in host memory except during their calls (same results, for
        small GPUs). ``compile`` runs the UNet's transformer blocks through torch.compile (the first
        pass of each shape compiles; a compile error falls back to eager with a warning).

        Quiet by default: the backbone's libraries (diffusers, transformers, the hub) are set to
        errors only, without progress bars, for this process; ``verbose=True`` leaves them as they
        are. gooddrag's own warnings (``GoodDragWarning``) and log lines (logger ``gooddrag``) are not
        affected."""
        check_precision(precision, dtype, faithful)  # before anything loads
        registry = registry or default_registry()
        component = select_backbone(registry, model)
        if low_memory:
            _supports(component, "set_low_memory", "a low-memory mode", "low_memory (--low-memory)")
        if compile:
            _supports(component, "compile", "torch.compile support", "compile (--compile)")
        if not verbose and callable(getattr(component, "quiet", None)):
            component.quiet()
        backbone = component.load(model, vae=vae, device=device, dtype=dtype, attention=attention)
        if not faithful and hasattr(backbone, "optimize"):
            backbone.optimize()
        log.info("loaded %s on %s", model, backbone.device)
        return cls(backbone, registry, faithful=faithful, precision=precision, low_memory=low_memory, compile=compile)

    def config(self, **kwargs: Any) -> EditConfig:
        b = self.backbone
        runtime = dict(model=b.model_id, vae=getattr(b, "vae_id", "auto"), device=str(b.device), attention=b.attention,
                       dtype=DTYPE_NAMES[b.dtype], faithful=self.faithful,
                       precision=self.precision, low_memory=self.low_memory, compile=self.compile)
        runtime.update({k: kwargs.pop(k) for k in ("lora", "seed", "width") if k in kwargs})
        return resolve_config(self.registry, backbone=type(b), **kwargs, **runtime)

    def edit(self, image: Any, points: Sequence[Pair] | EditInput, mask: Any = None, *, preset: str = "gooddrag",
             schedule: str | None = None, loss: str | None = None, tracker: str | None = None,
             overrides: Sequence[str] | dict = (), lora: str = "auto", prompt: str = "", seed: int = 0,
             width: int = 512, plugins: Iterable[Any] = (), **params: Any) -> EditResult:
        """Drag ``points`` ([(handle_xy, target_xy), ...] in image px) in ``image``.

        Parameters can be overridden as ``overrides=["loss.lam=0.1"]`` (the CLI's ``-p``) or as keywords
        ``kind_field=value``: ``loss_lam=0.1, schedule_drag_timesteps=5, lora_steps=100``.
        ``plugins`` are objects implementing event hooks (trace, GIF, progress) for this edit only.
        """
        overrides = [*overrides, *keyword_overrides(params)] if not isinstance(overrides, dict) else overrides
        cfg = self.config(preset=preset, schedule=schedule, loss=loss, tracker=tracker, overrides=overrides,
                          lora=lora, seed=seed, width=width)
        inp = points if isinstance(points, EditInput) else prepare_input(image, points, mask, width=width)
        for note in inp.warnings:
            warnings.warn(note, GoodDragWarning, stacklevel=2)
        self._configure_backbone(cfg.backbone_params)
        notes = [*cfg.notes, *inp.warnings]
        with _registered(self.registry.pm, plugins), _recorded_warnings(notes), \
                _tf32(not cfg.faithful and self.backbone.device.type == "cuda"):
            try:
                return self._run(cfg, inp, prompt, notes)
            except Exception as exc:  # a compile error the backbone could not catch (in a backward pass)
                b = self.backbone
                if not (getattr(b, "compiled", False) and b.is_compile_error(exc)):
                    raise
                b.fall_back_to_eager(exc)
                return self._run(cfg, inp, prompt, notes)

    def _configure_backbone(self, params: Any) -> None:
        b = self.backbone
        if params is None or params == getattr(b, "params", params):
            return
        if not hasattr(b, "configure"):
            raise ConfigError(f"backbone {getattr(b, 'name', type(b).__name__)!r} cannot change its parameters "
                              "after loading; leave backbone.* at the defaults")
        b.configure(params)

    def _compute_dtype(self, cfg: EditConfig) -> torch.dtype | None:
        """The autocast dtype for this edit (set on the backbone for its LoRA training), or None."""
        b = self.backbone
        compute = resolve_precision(cfg.precision, b.device, b.dtype, cfg.faithful,
                                    getattr(b, "unet_parameters", lambda: 0)())
        if not hasattr(b, "mixed"):
            if compute is not None and cfg.precision != "auto":
                raise ConfigError(f"backbone {getattr(b, 'name', type(b).__name__)!r} has no mixed precision; "
                                  "use precision fp32 (or auto)")
            return None
        b.compute_dtype = compute
        return compute

    def _run(self, cfg: EditConfig, inp: EditInput, prompt: str, notes: list[str]) -> EditResult:
        reg, b, hook = self.registry, self.backbone, self.registry.pm.hook
        events = Events(hook)
        timer = _PhaseTimer(b.device, events)
        cuda = b.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(b.device)
        hook.gooddrag_edit_started(config=cfg, image_size=inp.size, points=inp.pairs)
        schedule = reg.get("schedule", cfg.schedule)(cfg.schedule_params)
        raw_loss = reg.get("loss", cfg.loss)(cfg.loss_params)
        raw_tracker = reg.get("tracker", cfg.tracker)(cfg.tracker_params)
        loss = CheckedLoss(raw_loss, cfg.loss, reg.owner("loss", cfg.loss))
        tracker = CheckedTracker(raw_tracker, cfg.tracker, reg.owner("tracker", cfg.tracker))
        fast = set() if cfg.faithful else set(getattr(b, "fast_paths", ()))
        patch_features = "patch_features" in fast and all(getattr(c, "reads_patches", False)
                                                          for c in (raw_loss, raw_tracker))
        compute = self._compute_dtype(cfg)
        mixed = b.mixed if compute is not None else contextlib.nullcontext  # autocasts the UNet passes only
        torch.manual_seed(cfg.seed)
        b.set_prompt(prompt)
        image = inp.image_tensor().to(b.device)  # (1, 3, H, W) in [-1, 1]
        num_steps = cfg.schedule_params.num_inference_steps
        ddim = b.sampler(num_steps)
        with timer("lora"):
            lora_status = b.use_lora(cfg.lora, image, cfg.lora_params, **_on_step(b.use_lora, events, "lora"))
        with timer("inversion"):
            z0 = b.encode(image)  # (1, 4, H/8, W/8)
            start, indices = drag_window(schedule, num_steps)
            z_start = b.invert(z0, start, **_on_step(b.invert, events, "inversion"))
            if not bool(torch.isfinite(z_start).all()):  # one host sync per edit
                raise DivergedError(f"the inverted latent is NaN/inf before any drag: the model weights or the "
                                    f"LoRA ({lora_status}) are broken; try lora off, or delete that LoRA")
        # one mixed-precision span for the reference and the drag: the weights are split once
        with contextlib.ExitStack() as mixed_span:
            with timer("reference"):
                mixed_span.enter_context(mixed())
                ref = Reference(b, z_start, indices, ddim.timesteps, patch_features=patch_features,
                                on_step=events.step_callback("reference"))
            handles, targets = (x.to(b.device) for x in inp.grid_points())
            mask = inp.latent_mask()
            ctx = DragContext(backbone=b, timesteps=ddim.timesteps, start_index=start, z_start=z_start, reference=ref,
                              loss=loss, tracker=tracker, points=Points(handles.clone(), handles.clone(), targets),
                              mask=None if mask is None else mask.to(b.device), events=events,
                              mask_is_empty=mask is not None and not bool(mask.any()),
                              patch_features=patch_features, reuse_forward=not cfg.faithful)
            uses_eps = getattr(raw_loss, "uses_eps", None)
            ctx.features_only = "features_only" in fast and uses_eps is not None and not uses_eps(ctx)
            with timer("drag"):
                out = schedule.run(ctx)
                mixed_span.close()  # the exact fp32 weights are back before the finish (timed as drag)
        with timer("finish"):
            z = out.latent.detach()
            z_ref = ref.latents[out.next_index]
            with torch.no_grad():
                for k in range(out.next_index, num_steps):
                    t = ddim.timesteps[k]
                    eps_ref, eps = b.eps_mutual(z_ref, z, t)
                    z_ref, z = ddim.step(z_ref, eps_ref, t), ddim.step(z, eps, t)
                    events.phase_step("finish", k + 1 - out.next_index, num_steps - out.next_index)
        if not bool(torch.isfinite(z).all()):
            raise DivergedError("the latent became NaN/inf in the final denoising; lower schedule.lr, "
                                "or try dtype fp32")
        with timer("decode"):
            x = b.decode(z)  # (1, 3, H, W) in [0, 1]
            arr = (x[0].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
            result = Image.fromarray(arr).resize(inp.size, Image.BILINEAR)
        final = inp.to_image_px(ctx.points.handles)
        report = {
            "config": cfg.to_dict(),
            "prompt": prompt,
            "image_size": list(inp.size),
            "working_size": list(inp.work_size),
            # *_xy: [x, y] pixels of the input image; *_grid_rc: (row, col) on the feature grid (H/2, W/2)
            "handles_xy": [list(h) for h, _ in inp.pairs],
            "targets_xy": [list(t) for _, t in inp.pairs],
            "final_handles_xy": final,
            "final_handles_grid_rc": ctx.points.handles.cpu().tolist(),
            "stop_reason": out.reason,
            "drags": out.drags,
            "gradient_steps": out.steps,
            "start_timestep": ddim.timesteps[start],
            "drag_timesteps": [ddim.timesteps[k] for k in indices],
            "lora": lora_status,
            "device": str(b.device),
            "device_name": torch.cuda.get_device_name(b.device) if cuda else "cpu",
            "dtype": cfg.dtype,
            "compute": f"{DTYPE_NAMES[compute]} autocast" if compute is not None else cfg.dtype,
            "attention": b.attention,
            "timings_s": timer.times,
            "peak_memory_mb": _peak_mb(b.device),
            "warnings": notes,
            "versions": versions(),
        }
        res = EditResult(result, final, report)
        hook.gooddrag_edit_finished(result=res)
        return res


def _supports(component: type, method: str, what: str, option: str) -> None:
    if not hasattr(component, method):
        raise ConfigError(f"backbone {getattr(component, 'name', component.__name__)!r} has no {what}; drop {option}")


def _on_step(method: Any, events: Events, phase: str) -> dict[str, Any]:
    """``{"on_step": ...}`` for a backbone method that reports its steps (a third-party backbone's
    may not take the argument), when a plugin listens to ``gooddrag_phase_step``; else ``{}``."""
    callback = events.step_callback(phase)
    if callback is None or "on_step" not in inspect.signature(method).parameters:
        return {}
    return {"on_step": callback}


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


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gooddrag", "torch", "diffusers", "transformers", "peft", "accelerate", "xformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS (Linux: KiB)


class _PhaseTimer:
    """Wall time per phase (CUDA-synchronised at the edges only) and phase events."""

    def __init__(self, device: torch.device, events: Events):
        self.device, self.events, self.times = device, events, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.events.phase(name, "start")
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = round(time.perf_counter() - t0, 4)
        self.events.phase(name, "end")


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
