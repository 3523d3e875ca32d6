"""The edit pipeline around a schedule (``run_edit``), and what the strategies see (``DragContext``).

    1. strategies   the schedule, loss and tracker of the config, and the fast paths they allow
    2. LoRA         the per-image LoRA: trained once, cached, or loaded             (method.md 1)
    3. inversion    z_T = DDIM-invert(z_0) to the schedule's start timestep          (method.md 2)
    4. reference    plain DDIM from z_T over the drag window: F0_t, z0_{t-1}         (method.md 2)
    5. drag         out = schedule.run(ctx): drags, tracks, stops                    (method.md 3)
    6. finish       z_0' = DDIM from out.next_index with mutual self-attention       (method.md 6)
    7. decode       the image at the input's size; final handles in image pixels
    8. report       config, timings, memory, stop reason: run.json

Strategies only see ``DragContext``: the backbone, the reference, the loss, the tracker, the points,
the mask and the event relay. Nothing here copies tensors to the host inside the loop except the
scalar stop checks the schedule needs.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, NamedTuple

import attrs
import torch
from PIL import Image

from gooddrag.core.config import schedule_needs
from gooddrag.core.ddim import start_index as _start_index
from gooddrag.core.devices import DTYPE_NAMES, resolve_precision
from gooddrag.core.errors import ConfigError, DivergedError
from gooddrag.core.latents import StartLatents
from gooddrag.core.geometry import FeatureMap, Features, point_vectors
from gooddrag.core.report import PhaseTimer, device_name, peak_mb, versions


class LossParts(NamedTuple):
    """A loss value and its two parts (0-d tensors on the device). A NamedTuple, so a captured step
    (torch.compile) can build and return it."""

    total: torch.Tensor
    motion: torch.Tensor
    preserve: torch.Tensor


@attrs.define
class Points:
    """Handle/target state on the feature grid: (N, 2) float (row, col) tensors on the device."""

    handles0: torch.Tensor  # (N, 2) original handles p_i0
    handles: torch.Tensor  # (N, 2) current handles p_i
    targets: torch.Tensor  # (N, 2) targets q_i

    def distances(self) -> torch.Tensor:
        return (self.targets - self.handles).norm(dim=1)  # (N,)

    def reached(self, within: float) -> bool:
        """All handles within ``within`` feature-grid px of their targets (one host sync)."""
        return bool((self.distances() < within).all())


@attrs.define
class Outcome:
    """What a schedule hands back: the latent at ``next_index`` (not yet denoised at that index)."""

    latent: torch.Tensor
    next_index: int
    reason: str  # reached | patience | schedule_end | loss_threshold | warped (moved in closed form, not tracked)
    drags: int = 0
    steps: int = 0
    #: (0-d bool device tensor: the latent is finite, the timestep that made it), not read yet: the
    #: engine reads it with its own final check, so the drag loop needs no host sync for it
    finite: tuple[torch.Tensor, int] | None = None


class Reference:
    """The unedited trajectory over the drag window, computed once (docs/method.md, section 2).

    For every drag timestep t it keeps the low-resolution features (upsampled on demand, one map
    cached) and z0_{t-1}, the plain DDIM output; ``latents[k]`` is the reference latent at index k.
    """

    def __init__(self, backbone: Any, z_start: torch.Tensor, indices: list[int], timesteps: list[int],
                 patch_features: bool = False, passes: bool = True,
                 on_step: Callable[[int, int], None] | None = None):
        self.backbone = backbone
        self.patch_features = patch_features  # hand out FeatureMaps (computed where read), not dense maps
        self.latents: dict[int, torch.Tensor] = {}
        self.prev: dict[int, torch.Tensor] = {}
        self._lowres: dict[int, torch.Tensor] = {}
        self._cached: tuple[int, torch.Tensor] | None = None
        assert indices, "a schedule must drag on at least one timestep"
        self._latent_hw = tuple(z_start.shape[-2:])  # (h, w): the feature grid is 4x this
        if not passes:  # a schedule that needs no reference: only the start, where the finish begins
            self.latents[min(indices)] = z_start
            return
        z = z_start
        with torch.no_grad():
            for k in range(min(indices), max(indices) + 1):
                t = timesteps[k]
                self.latents[k] = z
                eps, feats = backbone.eps_and_features(z, t, upsample=False)
                self._lowres[t] = feats
                z = backbone.ddim_step(z, eps, t)
                self.prev[t] = z
                if on_step is not None:
                    on_step(k + 1 - min(indices), max(indices) + 1 - min(indices))
            self.latents[max(indices) + 1] = z

    def features(self, t: int) -> Features:
        """F0_t on the feature grid, (1, C, H/2, W/2); the last one asked for is cached (the same
        object for the whole timestep)."""
        if self._cached is None or self._cached[0] != t:
            self._cached = (t, grid_features(self.backbone, self._lowres[t], self._latent_hw, self.patch_features))
        return self._cached[1]

    def vectors(self, t: int, points: torch.Tensor) -> torch.Tensor:
        """F0_t at integer ``points`` (N, 2) -> (N, C): the trackers' reference vectors."""
        return point_vectors(self.features(t), points)


class Events:
    """Relay of the event hooks; a hook nobody implements costs nothing (no host copies)."""

    def __init__(self, hook: Any | None):
        self._hook = hook
        names = ("gooddrag_drag_step", "gooddrag_points_tracked", "gooddrag_drag_stopped",
                 "gooddrag_phase", "gooddrag_phase_step", "gooddrag_preview")
        self._on = {n: bool(hook is not None and getattr(hook, n).get_hookimpls()) for n in names}

    def step(self, timestep: int, drag: int, step: int, parts: LossParts) -> None:
        if self._on["gooddrag_drag_step"]:
            self._hook.gooddrag_drag_step(timestep=timestep, drag=drag, step=step, loss=parts.total.detach(),
                                          motion=parts.motion.detach(), preserve=parts.preserve.detach())

    def tracked(self, timestep: int, drag: int, points: torch.Tensor) -> None:
        if self._on["gooddrag_points_tracked"]:
            self._hook.gooddrag_points_tracked(timestep=timestep, drag=drag, points=points)

    def stopped(self, timestep: int, reason: str) -> None:
        if self._on["gooddrag_drag_stopped"]:
            self._hook.gooddrag_drag_stopped(timestep=timestep, reason=reason)

    def phase(self, name: str, status: str) -> None:
        if self._on["gooddrag_phase"]:
            self._hook.gooddrag_phase(name=name, status=status)

    def phase_step(self, name: str, step: int, total: int) -> None:
        if self._on["gooddrag_phase_step"]:
            self._hook.gooddrag_phase_step(name=name, step=step, total=total)

    def step_callback(self, name: str) -> Any:
        """``on_step(step, total)`` for a backbone's LoRA training or inversion loop; None (no call at
        all) when no plugin listens."""
        return (lambda step, total: self.phase_step(name, step, total)) if self._on["gooddrag_phase_step"] else None

    @property
    def wants_preview(self) -> bool:
        return self._on["gooddrag_preview"]

    def preview(self, timestep: int, drag: int, latent: torch.Tensor, x0: torch.Tensor, handles: torch.Tensor) -> None:
        if self._on["gooddrag_preview"]:
            self._hook.gooddrag_preview(timestep=timestep, drag=drag, latent=latent.detach(), x0=x0, handles=handles)


@attrs.define
class DragContext:
    """Everything a schedule, loss or tracker may use during one edit."""

    backbone: Any
    timesteps: list[int]
    start_index: int
    z_start: torch.Tensor  # (1, 4, H/8, W/8) inverted latent at timesteps[start_index], fp32
    reference: Reference
    loss: Callable[..., LossParts]
    tracker: Any
    points: Points
    mask: torch.Tensor | None  # (1, 1, H/8, W/8) 1 = editable; None = everything editable
    mask_is_empty: bool
    events: Events
    #: fast paths, all exact (same result up to float rounding); off on the faithful path
    fast_step: bool = False  # gradient step on device buffers (LatentAdam, no host reads); off: torch.optim.Adam
    capture: bool = False  # the gradient step runs through torch.compile whole (--compile on CUDA)
    patch_features: bool = False  # features as a FeatureMap: upsampled only where read
    reuse_forward: bool = False  # the first gradient step of a timestep reuses the tracking forward
    features_only: bool = False  # the loss reads no eps: gradient-step passes stop after the feature block
    #: the tracking pass kept for the first gradient step on the same z (``reuse_forward``)
    _ahead: tuple[torch.Tensor, int, int, tuple] | None = attrs.field(default=None, init=False, repr=False)

    def forward(self, z: torch.Tensor, t: int, *, for_loss: bool = False) -> tuple[torch.Tensor | None, Features]:
        """eps (1, 4, h, w) and features (1, C, H/2, W/2) of the latent at t, in one UNet pass.

        ``for_loss``: the pass feeds the loss; when the loss reads no eps (``features_only``) the
        backbone may stop after the feature block and eps is None. A loss pass on the very latent that
        ``tracking_features`` just read (same tensor, unchanged) is that pass, not a new one."""
        ahead, self._ahead = self._ahead, None
        if for_loss and ahead is not None and ahead[0] is z and ahead[1:3] == (z._version, t):
            return ahead[3]
        if for_loss and self.features_only:
            eps, low = self.backbone.eps_and_features(z, t, upsample=False, need_eps=False)
        else:
            eps, low = self.backbone.eps_and_features(z, t, upsample=False)
        return eps, grid_features(self.backbone, low, z.shape[-2:], self.patch_features)

    def tracking_features(self, z: torch.Tensor, t: int) -> Features:
        """Features of z at t for tracking, detached. With ``reuse_forward`` the pass is taken with the
        gradient graph and kept, so the first gradient step on the same z is served by it (one UNet
        pass instead of two; the same numbers)."""
        if self.reuse_forward and z.requires_grad:
            out = self.forward(z, t, for_loss=True)
            self._ahead = (z, z._version, t, out)
            return out[1].detach()
        with torch.no_grad():
            return self.forward(z, t)[1]

    def denoise(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """One plain DDIM step of z from t to the next timestep (no gradient): (1, 4, h, w)."""
        with torch.no_grad():
            z = z.detach()
            return self.backbone.ddim_step(z, self.forward(z, t)[0], t)

    def preview(self, t: int, drag: int, z: torch.Tensor) -> None:
        """Tell preview plugins (animation, live UI) what the image is becoming after a drag: the clean
        latent predicted from ``z`` at t. Costs one UNet pass, and only when a plugin listens."""
        if not self.events.wants_preview:
            return
        with torch.no_grad():
            z = z.detach()
            x0 = self.backbone.sampler(len(self.timesteps)).predict_x0(z, self.backbone.eps(z, t), t)
        self.events.preview(t, drag, z, x0, self.points.handles)

    def check_finite(self, z: torch.Tensor, t: int) -> None:
        """Stop when the latent holds NaN/inf after dragging at timestep t (one host sync): a diverged
        drag would otherwise decode to a black image reported as success. The built-in schedules
        read this flag together with their stop checks instead (see ``Outcome.finite``)."""
        if not bool(torch.isfinite(z).all()):
            raise diverged(t)

    def preservation(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """sum |(DDIM_t(z, eps) - z0_{t-1}) * (1 - M)| over latent elements (0-d); 0 without a mask."""
        if self.mask is None:
            return z.new_zeros(())
        z_prev = self.backbone.ddim_step(z, eps.to(z.dtype), t)
        return ((z_prev - self.reference.prev[t]) * (1 - self.mask)).abs().sum()


def diverged(t: int) -> DivergedError:
    """The error for a latent that became NaN/inf while dragging at timestep t."""
    return DivergedError(f"the latent became NaN/inf while dragging at timestep {t}: the drag diverged; "
                         "lower schedule.lr or the loss weights (e.g. loss.lam)")


class UNetPasses:
    """A backbone's UNet passes so far: ``forward`` counts every pass (a batch-2 pass once, a pass
    stopped after the feature block too), ``backward`` every backward pass that ran back through one.
    Plain Python ints: counting costs no host sync; the engine reads them at phase edges."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def counted(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a pass's input, or its output when the input takes no gradient), marked so that a
        backward pass through it is counted; unchanged without autograd."""
        if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
            return _CountBackward.apply(x, self)  # (a captured step counts its backward pass itself)
        return x

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.backward


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts one backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counter: UNetPasses) -> torch.Tensor:
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counter.backward += 1
        return grad, None


def grid_features(backbone: Any, lowres: torch.Tensor, latent_hw: Any, lazy: bool) -> Features:
    """The backbone's raw features on the feature grid (H/2, W/2): a FeatureMap, computed only where
    read (``lazy``; the grid is ``feature_scale`` times the latent (h, w)), or the dense upsampled map."""
    if lazy:
        s = backbone.feature_scale
        return FeatureMap(lowres, (s * int(latent_hw[0]), s * int(latent_hw[1])))  # read in fp32, patch by patch
    return backbone.upsample_features(lowres.float(), latent_hw)


def drag_window(schedule: Any, num_steps: int) -> tuple[int, list[int]]:
    """(start index, drag indices) of a schedule from its Params."""
    sp = schedule.params
    start = _start_index(num_steps, sp.inversion_strength)
    return start, schedule.drag_indices(start, num_steps)


def make_optimizer(z: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """A fresh Adam on the latent (re-created at every drag timestep, as the method does)."""
    return torch.optim.Adam([z], lr=lr)


@attrs.define
class EditResult:
    """The edited image (original size), final handles in image px, and the run report."""

    image: Image.Image
    points: list[list[int]]
    report: dict[str, Any]


def run_edit(backbone: Any, registry: Any, cfg: Any, inp: Any, prompt: str, notes: list[str],
             start_latents: StartLatents | None = None) -> EditResult:
    """One drag edit of a validated ``EditInput`` with a resolved ``EditConfig``, step by step.
    ``start_latents``: the image's known denoising trajectory (a generated image); the edit starts
    from its latent at the schedule's start and skips the inversion (and the LoRA, which would
    change the model that trajectory belongs to)."""
    b, hook = backbone, registry.pm.hook
    events = Events(hook)
    timer = PhaseTimer(b.device, events, b.passes)  # the contract's optional counter (None: not counted)
    hook.gooddrag_edit_started(config=cfg, image_size=inp.size, points=inp.pairs)
    # 1. strategies: the config's schedule, loss and tracker, and the fast paths they allow
    s = Strategies.build(registry, cfg, b)
    compute = compute_dtype(b, cfg)
    if not {"lora", "reference", "loss"} & s.needs:  # no LoRA, reference or drag pass: nothing autocasts,
        compute = None  # and the weights are not split (splitting SD1.5's UNet costs seconds on a CPU)
    mixed = b.mixed if compute is not None else contextlib.nullcontext  # autocasts the UNet passes only
    torch.manual_seed(cfg.seed)
    b.set_prompt(prompt)
    image = inp.image_tensor().to(b.device)  # (1, 3, H, W) in [-1, 1]
    ddim = b.sampler(cfg.schedule_params.num_inference_steps)
    # 2. LoRA: fitted to this image once (cached on disk), loaded from a path, or off (always off for a
    #    schedule that needs none: "off" also drops a LoRA left by an earlier edit)
    lora_mode = cfg.lora if "lora" in s.needs else "off"
    if start_latents is not None and lora_mode != "off":
        notes.append(f"LoRA off: the edit starts from the {start_latents.source} latents, which belong to the "
                     "model without a LoRA")
        lora_mode = "off"
    with timer("lora"):
        lora_status = b.use_lora(lora_mode, image, cfg.lora_params, **on_step(b.use_lora, events, "lora"))
    # 3. inversion: z_T, the latent at the schedule's start timestep
    with timer("inversion"):
        start, indices = drag_window(s.schedule, len(ddim.timesteps))
        if start_latents is None:
            z_start = invert(b, image, start, lora_status, events)
            inversion = "ddim"
        else:  # (1, 4, H/8, W/8), exact: no inversion error
            w8, h8 = inp.work_size[0] // 8, inp.work_size[1] // 8
            z_start = start_latents.at(start, len(ddim.timesteps), (h8, w8)).to(b.device, torch.float32)
            inversion = f"skipped: the {start_latents.source} latents were reused"
    # 4 + 5. reference and drag, in one mixed-precision span (the weights are split once)
    with contextlib.ExitStack() as mixed_span:
        with timer("reference"):
            mixed_span.enter_context(mixed())
            ref = Reference(b, z_start, indices, ddim.timesteps, patch_features=s.patch_features,
                            passes="reference" in s.needs, on_step=events.step_callback("reference"))
        ctx = s.context(b, inp, ddim.timesteps, start, z_start, ref, events)
        with timer("drag"):
            out = s.schedule.run(ctx)
            mixed_span.close()  # the exact fp32 weights are back before the finish (timed as drag)
    # 6. finish: denoise the edited and the reference latents together, with mutual self-attention
    with timer("finish"):
        z = finish(b, ddim, ref, out, events)
    # 7. decode to the input's size
    with timer("decode"):
        result = decode(b, z, inp.size)
    # 8. report
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
        "inversion": inversion,
        "device": str(b.device),
        "device_name": device_name(b.device),
        "dtype": cfg.load.dtype,
        "compute": f"{DTYPE_NAMES[compute]} autocast" if compute is not None else cfg.load.dtype,
        "attention": b.attention,
        "timings_s": timer.times,
        "unet_passes": timer.passes,
        "peak_memory_mb": peak_mb(b.device),
        "warnings": notes,
        "versions": versions(),
    }
    res = EditResult(result, final, report)
    hook.gooddrag_edit_finished(result=res)
    return res


@attrs.frozen
class Strategies:
    """The schedule, the loss and tracker (behind their first-call contract checks), and which exact
    fast paths this backbone and these strategies allow. Only what the schedule ``needs`` is built:
    without "loss"/"tracker" those are None."""

    schedule: Any
    loss: Any  # CheckedLoss or None
    tracker: Any  # CheckedTracker or None
    raw_loss: Any
    needs: frozenset  # what the schedule uses: lora, loss, tracker, reference (config.schedule_needs)
    fast: frozenset
    patch_features: bool  # losses and trackers read patches from a FeatureMap
    reuse_forward: bool  # the first gradient step of a timestep reuses the tracking pass (off when faithful)
    fast_step: bool = False  # the gradient step on device buffers, no host reads (off when faithful)
    capture: bool = False  # the gradient step compiled whole (--compile on CUDA, not faithful)

    @classmethod
    def build(cls, registry: Any, cfg: Any, b: Any) -> "Strategies":
        from gooddrag.core.contracts import CheckedLoss, CheckedTracker  # they check against this module's types

        schedule = registry.get("schedule", cfg.schedule)(cfg.schedule_params)
        needs = schedule_needs(type(schedule))
        raw_loss = registry.get("loss", cfg.loss)(cfg.loss_params) if "loss" in needs else None
        raw_tracker = registry.get("tracker", cfg.tracker)(cfg.tracker_params) if "tracker" in needs else None
        fast = frozenset() if cfg.load.faithful else frozenset(b.fast_paths)
        return cls(schedule=schedule, needs=needs,
                   loss=None if raw_loss is None else CheckedLoss(raw_loss, cfg.loss, registry.owner("loss", cfg.loss)),
                   tracker=None if raw_tracker is None else CheckedTracker(raw_tracker, cfg.tracker,
                                                                           registry.owner("tracker", cfg.tracker)),
                   raw_loss=raw_loss, fast=fast, fast_step=not cfg.load.faithful,
                   capture=bool(cfg.load.compile) and b.device.type == "cuda" and not cfg.load.faithful,
                   reuse_forward=not cfg.load.faithful,
                   patch_features="patch_features" in fast and all(getattr(c, "reads_patches", False)
                                                                   for c in (raw_loss, raw_tracker) if c is not None))

    def context(self, b: Any, inp: Any, timesteps: list[int], start: int, z_start: torch.Tensor,
                ref: Reference, events: Events) -> DragContext:
        handles, targets = (x.to(b.device) for x in inp.grid_points())  # (N, 2) (row, col) feature grid
        mask = inp.latent_mask()  # (1, 1, h, w) or None
        ctx = DragContext(backbone=b, timesteps=timesteps, start_index=start, z_start=z_start, reference=ref,
                          loss=self.loss, tracker=self.tracker, points=Points(handles.clone(), handles.clone(), targets),
                          mask=None if mask is None else mask.to(b.device), events=events,
                          mask_is_empty=mask is not None and not bool(mask.any()),
                          patch_features=self.patch_features, fast_step=self.fast_step, capture=self.capture,
                          reuse_forward=self.reuse_forward and not self.capture)  # a captured step makes its own pass
        uses_eps = getattr(self.raw_loss, "uses_eps", None)
        ctx.features_only = "features_only" in self.fast and uses_eps is not None and not uses_eps(ctx)
        return ctx


def compute_dtype(b: Any, cfg: Any) -> torch.dtype | None:
    """The autocast dtype for this edit (set on the backbone for its LoRA training), or None."""
    mixed = b.supports_mixed  # the contract's flag: mixed(), compute_dtype, unet_parameters()
    compute = resolve_precision(cfg.load.precision, b.device, b.dtype, cfg.load.faithful,
                                b.unet_parameters() if mixed else 0)
    if not mixed:
        if compute is not None and cfg.load.precision != "auto":
            raise ConfigError(f"backbone {b.name!r} has no mixed precision; "
                              "use precision fp32 (or auto)")
        return None
    b.compute_dtype = compute
    return compute


def on_step(method: Any, events: Events, phase: str) -> dict[str, Any]:
    """``{"on_step": ...}`` for a backbone method that reports its steps (a third-party backbone's
    may not take the argument), when a plugin listens to ``gooddrag_phase_step``; else ``{}``."""
    callback = events.step_callback(phase)
    if callback is None or "on_step" not in inspect.signature(method).parameters:
        return {}
    return {"on_step": callback}


def invert(b: Any, image: torch.Tensor, start: int, lora_status: str, events: Events | None = None) -> torch.Tensor:
    """z_T: the image's latent DDIM-inverted to timestep index ``start`` (one host sync per edit)."""
    z0 = b.encode(image)  # (1, 4, H/8, W/8)
    z_start = b.invert(z0, start, **(on_step(b.invert, events, "inversion") if events is not None else {}))
    if not bool(torch.isfinite(z_start).all()):
        raise DivergedError(f"the inverted latent is NaN/inf before any drag: the model weights or the "
                            f"LoRA ({lora_status}) are broken; try lora off, or delete that LoRA")
    return z_start


def finish(b: Any, ddim: Any, ref: Reference, out: Outcome, events: Events | None = None) -> torch.Tensor:
    """DDIM from ``out.next_index`` to t=0, the edited latent beside the reference one, the edited
    branch reading the reference's keys and values (mutual self-attention)."""
    z = out.latent.detach()
    z_ref = ref.latents[out.next_index]
    with torch.no_grad():
        for k in range(out.next_index, len(ddim.timesteps)):
            t = ddim.timesteps[k]
            eps_ref, eps = b.eps_mutual(z_ref, z, t)
            z_ref, z = ddim.step(z_ref, eps_ref, t), ddim.step(z, eps, t)
            if events is not None:
                events.phase_step("finish", k + 1 - out.next_index, len(ddim.timesteps) - out.next_index)
    # the drag's last latent (Outcome.finite, not read yet) and the finished one, in one host sync
    drag_ok = out.finite[0] if out.finite is not None else torch.ones((), dtype=torch.bool, device=z.device)
    drag_finite, finish_finite = torch.stack([drag_ok, torch.isfinite(z).all()]).tolist()
    if not drag_finite:
        raise diverged(out.finite[1])
    if not finish_finite:
        raise DivergedError("the latent became NaN/inf in the final denoising; lower schedule.lr, "
                            "or try dtype fp32")
    return z


def decode(b: Any, z: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    x = b.decode(z)  # (1, 3, H, W) in [0, 1]
    arr = (x[0].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr).resize(size, Image.BILINEAR)


def generate(backbone: Any, prompt: str, *, seed: int = 0, steps: int = 50, guidance: float = 7.5,
             width: int = 512, height: int = 512, negative: str = "") -> tuple[Image.Image, StartLatents]:
    """An image from ``prompt`` by DDIM sampling (classifier-free guidance ``guidance``; 1 = none),
    with its whole trajectory: the latent fed to every step, so a drag can start from it instead of
    inverting (``run_edit(..., start_latents=...)``)."""
    b = backbone
    if width % 8 or height % 8 or min(width, height) < 16:
        raise ConfigError(f"generate at {width}x{height}: give a width and height that are multiples of 8, at least 16")
    ddim = b.sampler(steps)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((1, 4, height // 8, width // 8), generator=gen).to(b.device)  # (1, 4, h, w)
    latents: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for k, t in enumerate(ddim.timesteps):
            latents[k] = z
            b.set_prompt(prompt)
            pred = b.eps(z, t)
            if guidance != 1.0:
                b.set_prompt(negative)
                uncond = b.eps(z, t)
                pred = uncond + guidance * (pred - uncond)
            z = b.ddim_step(z, pred, t)
        latents[len(ddim.timesteps)] = z
    b.set_prompt(prompt)
    if not bool(torch.isfinite(z).all()):
        raise DivergedError("the generated latent is NaN/inf; try dtype fp32 or a lower guidance")
    image = decode(b, z, (width, height))
    info = {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": guidance,
            "width": width, "height": height, "model": getattr(b, "model_id", "")}
    return image, StartLatents(num_steps=steps, latents=latents, source="generation", info=info)
