"""The edit pipeline around a schedule: invert, cache the reference trajectory, drag, finish.

    z_T  = DDIM-invert(z_0) to the schedule's start timestep          (method.md 2)
    ref  = plain DDIM from z_T over the drag window: F0_t, z0_{t-1}     (method.md 2)
    out  = schedule.run(ctx)            drags, tracks, stops            (method.md 3)
    z_0' = DDIM from out.next_index with mutual self-attention          (method.md 6)

Strategies only see ``DragContext``: the backbone, the reference, the loss, the tracker, the points,
the mask and the event relay. Nothing here copies tensors to the host inside the loop except the
scalar stop checks the schedule needs.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from gooddrag.core.ddim import start_index as _start_index
from gooddrag.core.errors import DivergedError
from gooddrag.core.geometry import FeatureMap, Features, point_vectors


@attrs.frozen
class LossParts:
    """A loss value and its two parts (0-d tensors on the device)."""

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
    reason: str  # reached | patience | schedule_end | loss_threshold
    drags: int = 0
    steps: int = 0


class Reference:
    """The unedited trajectory over the drag window, computed once (docs/method.md, section 2).

    For every drag timestep t it keeps the low-resolution features (upsampled on demand, one map
    cached) and z0_{t-1}, the plain DDIM output; ``latents[k]`` is the reference latent at index k.
    """

    def __init__(self, backbone: Any, z_start: torch.Tensor, indices: list[int], timesteps: list[int],
                 patch_features: bool = False, on_step: Callable[[int, int], None] | None = None):
        self.backbone = backbone
        self.patch_features = patch_features  # hand out FeatureMaps (computed where read), not dense maps
        self.latents: dict[int, torch.Tensor] = {}
        self.prev: dict[int, torch.Tensor] = {}
        self._lowres: dict[int, torch.Tensor] = {}
        self._cached: tuple[int, torch.Tensor] | None = None
        assert indices, "a schedule must drag on at least one timestep"
        self._latent_hw = tuple(z_start.shape[-2:])  # (h, w): the feature grid is 4x this
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
    patch_features: bool = False  # features as a FeatureMap: upsampled only where read
    reuse_forward: bool = False  # the first gradient step of a timestep reuses the tracking forward
    features_only: bool = False  # the loss reads no eps: gradient-step passes stop after the feature block

    def forward(self, z: torch.Tensor, t: int, *, for_loss: bool = False) -> tuple[torch.Tensor | None, Features]:
        """eps (1, 4, h, w) and features (1, C, H/2, W/2) of the latent at t, in one UNet pass.

        ``for_loss``: the pass feeds the loss; when the loss reads no eps (``features_only``) the
        backbone may stop after the feature block and eps is None."""
        if for_loss and self.features_only:
            eps, low = self.backbone.eps_and_features(z, t, upsample=False, need_eps=False)
        else:
            eps, low = self.backbone.eps_and_features(z, t, upsample=False)
        return eps, grid_features(self.backbone, low, z.shape[-2:], self.patch_features)

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
        """Stop when the latent holds NaN/inf after dragging at timestep t (one host sync, once per
        drag timestep): a diverged drag would otherwise decode to a black image reported as success."""
        if not bool(torch.isfinite(z).all()):
            raise DivergedError(f"the latent became NaN/inf while dragging at timestep {t}: the drag diverged; "
                                "lower schedule.lr or the loss weights (e.g. loss.lam)")

    def preservation(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """sum |(DDIM_t(z, eps) - z0_{t-1}) * (1 - M)| over latent elements (0-d); 0 without a mask."""
        if self.mask is None:
            return z.new_zeros(())
        z_prev = self.backbone.ddim_step(z, eps.to(z.dtype), t)
        return ((z_prev - self.reference.prev[t]) * (1 - self.mask)).abs().sum()


def grid_features(backbone: Any, lowres: torch.Tensor, latent_hw: Any, lazy: bool) -> Features:
    """The backbone's raw features on the feature grid (H/2, W/2): a FeatureMap, computed only where
    read (``lazy``; the grid is ``feature_scale`` times the latent (h, w)), or the dense upsampled map."""
    if lazy:
        s = backbone.feature_scale
        return FeatureMap(lowres, (s * int(latent_hw[0]), s * int(latent_hw[1])))
    return backbone.upsample_features(lowres, latent_hw)


def drag_window(schedule: Any, num_steps: int) -> tuple[int, list[int]]:
    """(start index, drag indices) of a schedule from its Params."""
    sp = schedule.params
    start = _start_index(num_steps, sp.inversion_strength)
    return start, schedule.drag_indices(start, num_steps)


def make_optimizer(z: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """A fresh Adam on the latent (re-created at every drag timestep, as the method does)."""
    return torch.optim.Adam([z], lr=lr)
