"""The Python API: ``Editor.from_pretrained(...)`` loads the backbone once; ``editor.edit(...)`` runs
one drag edit (LoRA, inversion, reference, drag, mutual-attention finish, decode)."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
import warnings
from typing import Any, Iterable, Sequence

import attrs
import torch
from PIL import Image

from gooddrag.core.backbone import capability, contract_problems, require, select_backbone
from gooddrag.core.config import DEFAULT_MODEL, OVERRIDE_KINDS, EditConfig, check_precision, resolve_config
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


__all__ = ["Editor", "EditResult", "select_backbone"]


class Editor:
    """Holds a loaded backbone and the plugin registry; edits any number of images."""

    def __init__(self, backbone: Any, registry: Registry | None = None, faithful: bool = False,
                 precision: str = "auto", low_memory: bool = False, compile: bool = False):
        missing = contract_problems(backbone)
        if missing:
            raise ConfigError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} does not meet the "
                              f"backbone contract (core/backbone.py): it lacks {', '.join(missing)}")
        self.backbone = backbone
        self.registry = registry or default_registry()
        self.faithful = faithful
        self.precision = precision
        self.low_memory = low_memory
        if low_memory:
            require(backbone, "supports_low_memory", "a low-memory mode", "low_memory (--low-memory)")
            backbone.set_low_memory(True)
        if compile and not capability(backbone, "compiled"):
            require(backbone, "supports_compile", "torch.compile support", "compile (--compile)")
            backbone.compile()
        self.compile = compile

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, vae: str = "auto", device: str = "auto",
                        dtype: str = "fp32", attention: str = "auto", faithful: bool = False,
                        precision: str = "auto", low_memory: bool = False, compile: bool = False,
                        registry: Registry | None = None, verbose: bool = False, backbone: str | None = None,
                        model_config: str | None = None) -> "Editor":
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
        affected.

        The backbone is the one that claims the model's files (``model_index.json``'s pipeline class,
        a single file's tensor names), or ``backbone`` by name. ``model_config`` is the local diffusers
        folder whose configs a single-file checkpoint uses (offline)."""
        check_precision(precision, dtype, faithful)  # before anything loads
        registry = registry or default_registry()
        component, files = select_backbone(registry, model, backbone, model_config)
        if low_memory:
            require(component, "supports_low_memory", "a low-memory mode", "low_memory (--low-memory)")
        if compile:
            require(component, "supports_compile", "torch.compile support", "compile (--compile)")
        if not verbose:
            component.quiet()
        loaded = component.load(model, vae=vae, device=device, dtype=dtype, attention=attention, files=files)
        if not faithful:
            loaded.optimize()
        log.info("loaded %s on %s (backbone %s)", model, loaded.device, loaded.name)
        return cls(loaded, registry, faithful=faithful, precision=precision, low_memory=low_memory, compile=compile)

    def config(self, **kwargs: Any) -> EditConfig:
        b = self.backbone
        if kwargs.get("width") is None:
            kwargs["width"] = b.default_width
        runtime = dict(model=b.model_id, vae=b.vae_id, device=str(b.device), attention=b.attention,
                       dtype=DTYPE_NAMES[b.dtype], faithful=self.faithful,
                       precision=self.precision, low_memory=self.low_memory, compile=self.compile)
        runtime.update({k: kwargs.pop(k) for k in ("lora", "seed", "width") if k in kwargs})
        return resolve_config(self.registry, backbone=type(b), **kwargs, **runtime)

    def edit(self, image: Any, points: Sequence[Pair] | EditInput, mask: Any = None, *, preset: str = "gooddrag",
             schedule: str | None = None, loss: str | None = None, tracker: str | None = None,
             overrides: Sequence[str] | dict = (), lora: str = "auto", prompt: str = "", seed: int = 0,
             width: int | None = None, plugins: Iterable[Any] = (), **params: Any) -> EditResult:
        """Drag ``points`` ([(handle_xy, target_xy), ...] in image px) in ``image``.

        ``width``: the working width; by default the model's own (SD1.5 512, SD 2.x 768, SDXL 1024).
        Parameters can be overridden as ``overrides=["loss.lam=0.1"]`` (the CLI's ``-p``) or as keywords
        ``kind_field=value``: ``loss_lam=0.1, schedule_drag_timesteps=5, lora_steps=100``.
        ``plugins`` are objects implementing event hooks (trace, GIF, progress) for this edit only.
        """
        overrides = [*overrides, *keyword_overrides(params)] if not isinstance(overrides, dict) else overrides
        width = self.backbone.default_width if width is None else width
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
                if not (capability(b, "compiled") and b.is_compile_error(exc)):
                    raise
                b.fall_back_to_eager(exc)
                return self._run(cfg, inp, prompt, notes)

    def _configure_backbone(self, params: Any) -> None:
        b = self.backbone
        if params is None or params == b.params:
            return
        if not capability(b, "configurable"):
            raise ConfigError(f"backbone {b.name!r} cannot change its parameters "
                              "after loading; leave backbone.* at the defaults")
        b.configure(params)

    def _compute_dtype(self, cfg: EditConfig) -> torch.dtype | None:
        """The autocast dtype for this edit (set on the backbone for its LoRA training), or None."""
        b = self.backbone
        mixed = capability(b, "supports_mixed")
        compute = resolve_precision(cfg.precision, b.device, b.dtype, cfg.faithful,
                                    b.unet_parameters() if mixed else 0)
        if not mixed:
            if compute is not None and cfg.precision != "auto":
                raise ConfigError(f"backbone {b.name!r} has no mixed precision; "
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
        fast = set() if cfg.faithful else set(b.fast_paths)
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
            lora_status = b.use_lora(cfg.lora, image, cfg.lora_params)
        with timer("inversion"):
            z0 = b.encode(image)  # (1, 4, H/8, W/8)
            start, indices = drag_window(schedule, num_steps)
            z_start = b.invert(z0, start)
            if not bool(torch.isfinite(z_start).all()):  # one host sync per edit
                raise DivergedError(f"the inverted latent is NaN/inf before any drag: the model weights or the "
                                    f"LoRA ({lora_status}) are broken; try lora off, or delete that LoRA")
        # one mixed-precision span for the reference and the drag: the weights are split once
        with contextlib.ExitStack() as mixed_span:
            with timer("reference"):
                mixed_span.enter_context(mixed())
                ref = Reference(b, z_start, indices, ddim.timesteps, patch_features=patch_features)
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
