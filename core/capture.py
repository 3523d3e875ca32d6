"""The drag's gradient step as one function of device buffers, so a GPU can run it without waiting
on Python (docs/performance.md, "Whole-step capture").

A drag step is a UNet forward and backward, the loss and an Adam update: about 1,500 small kernels.
Launched one by one from Python, a GPU spends more time waiting for launches than computing. Here
the whole step is one function with static shapes whose state lives in buffers that are updated in
place (the latent, Adam's moments and step count); what changes between drags (the handles, and the
patch positions the loss works out from them) is prepared outside it, and what changes per timestep
(t) selects one graph per timestep. Nothing in it reads a value back to the host, so
``torch.compile(mode="reduce-overhead")`` captures it whole into a CUDA graph (``--compile`` on
CUDA); elsewhere it runs eagerly, the same code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from gooddrag.core.errors import GoodDragWarning
from gooddrag.core.geometry import FeatureMap


#: torch.compile backend of the captured step (tests use "aot_eager": the same capture, no code generation)
BACKEND = "inductor"


def adam_factors(lr: float, betas: tuple[float, float], eps: float, steps: int,
                 device: torch.device) -> torch.Tensor:
    """(steps + 1, 2) fp64: row s holds Adam's bias-corrected factors (c1, c2) of step s, for the
    update ``p += m / (sqrt(v) * c1 + c2)`` (row 0 unused). Worked out on the host, where fp64 is
    exact enough that 1 - 0.999^s loses nothing at the first steps; a step reads its row by a
    device step count, so no kernel recomputes them."""
    b1, b2 = betas
    rows = [(0.0, 0.0)]  # no step 0
    for s in range(1, steps + 1):
        a = lr / (1 - b1 ** s)
        rows.append((-1 / (math.sqrt(1 - b2 ** s) * a), -eps / a))
    return torch.tensor(rows, dtype=torch.float64, device=device)


class LatentAdam:
    """Adam (Kingma & Ba) on one tensor, its state in device buffers: the moments and the step count
    (a device integer), so an update never reads anything back to the host. Same update as
    ``torch.optim.Adam`` up to float rounding.

    Adam's bias corrections depend only on the step number, so they are worked out on the host
    once, in fp64, as a table of the two factors of the update
    ``z += m / (sqrt(v) * c1 + c2)``, with ``c1 = -1 / (sqrt(1 - b2^s) * a_s)``, ``c2 = -eps / a_s``
    and ``a_s = lr / (1 - b1^s)``; a step reads its row by the device step count. An update is 8
    kernels (computing the corrections on the device took 19). The table holds ``capacity`` steps
    and grows (on the host, between steps) when :meth:`advance` is about to pass it.
    """

    def __init__(self, z: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 capacity: int = 1024):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(z)  # (1, 4, h, w)
        self.exp_avg_sq = torch.zeros_like(z)
        self.step = torch.zeros(1, dtype=torch.int64, device=z.device)  # (1,) steps since reset, on the device
        self.taken = 0  # the same count on the host (advance), which never reads the device's
        self.factors = self._factors(capacity, z.device)  # (capacity + 1, 2) fp64: row s = (c1, c2) of step s

    def _factors(self, capacity: int, device: torch.device) -> torch.Tensor:
        return adam_factors(self.lr, self.betas, self.eps, capacity, device)

    def reset(self) -> None:
        """A fresh Adam (the method re-creates it at every drag timestep), in place."""
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step.zero_()
        self.taken = 0

    def advance(self) -> None:
        """Count the coming step on the host, and grow the table before it would run out (never
        inside a captured step: the table is a buffer the step reads)."""
        self.taken += 1
        if self.taken >= self.factors.shape[0]:
            self.factors = self._factors(2 * self.factors.shape[0], self.factors.device)

    @torch.no_grad()
    def update(self, z: torch.Tensor, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.step += 1
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        c = self.factors.index_select(0, self.step)[0]  # (2,): this step's (c1, c2)
        z.addcdiv_(self.exp_avg, torch.addcmul(c[1], self.exp_avg_sq.sqrt(), c[0]))


class GradientStep:
    """Forward, loss, backward and Adam on the latent of one drag timestep.

    ``z`` is a static leaf buffer (1, 4, h, w): ``start`` copies each timestep's latent into it and
    resets Adam. Calling the step returns the loss parts (detached) and the features the step's
    forward pass computed (detached, for tracking). ``compiled``: the step runs through
    ``torch.compile`` (``reduce-overhead``: CUDA graphs, on CUDA); a compile error falls back to
    the same function run eagerly, with one warning.
    """

    def __init__(self, ctx: Any, lr: float):
        self.ctx, self.lr = ctx, lr
        self.z = ctx.z_start.detach().clone().requires_grad_(True)  # (1, 4, h, w) fp32, updated in place
        #: the faithful path keeps the reference form: torch.optim.Adam (re-created per timestep) and backward()
        self.reference = not getattr(ctx, "fast_step", False)
        self.adam = LatentAdam(self.z, lr)
        self.opt: torch.optim.Optimizer | None = None
        capture = getattr(ctx, "capture", False) and not self.reference
        self._compiled: Callable | None = compile_step(self._step, ctx.backbone.device) if capture else None

    @property
    def captured(self) -> bool:
        """The step runs compiled (its forward pass cannot be shared with a tracking pass)."""
        return self._compiled is not None

    def start(self, z: torch.Tensor) -> None:
        """A new drag timestep from latent ``z``: a fresh Adam, as the method."""
        with torch.no_grad():
            self.z.copy_(z)
        if self.reference:
            self.opt = torch.optim.Adam([self.z], lr=self.lr)
        else:
            self.adam.reset()

    def prepare(self, t: int) -> None:
        """Per-drag constants of the loss (where its patches lie), outside the captured step."""
        prepare = getattr(self.ctx.loss, "prepare", None)
        if prepare is not None:
            prepare(self.ctx, t)

    def __call__(self, t: int, ahead: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """One step at timestep t -> (LossParts detached, features detached). ``ahead``: a forward pass
        already made at this z and t (eager only), used instead of a new one."""
        if not self.reference:
            self.adam.advance()
        if ahead is None and self._compiled is not None:
            self.prepare(t)
            try:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    parts, raw = self._compiled(t)
                passes = getattr(self.ctx.backbone, "passes", None)
                if passes is not None:  # the counting autograd node stays out of the captured graph
                    passes.backward += 1
                return parts, _wrap(raw, self.ctx, self.z)
            except Exception as exc:
                if not _is_compile_error(self.ctx.backbone, exc):
                    raise
                self._compiled = None
                warnings.warn(f"torch.compile of the drag step failed ({type(exc).__name__}); running it eagerly "
                              "(drop --compile to skip the attempt)", GoodDragWarning, stacklevel=2)
        parts, raw = self._step(t, ahead)
        return parts, _wrap(raw, self.ctx, self.z)

    def _step(self, t: int, ahead: tuple[Any, Any] | None = None) -> tuple[Any, torch.Tensor]:
        ctx, z = self.ctx, self.z
        eps, feats = ahead if ahead is not None else ctx.forward(z, t, for_loss=True)  # may be the tracking pass
        parts = ctx.loss(ctx, z, t, feats, eps)
        if self.reference:
            self.opt.zero_grad(set_to_none=True)
            parts.total.backward()
            self.opt.step()
        else:
            (grad,) = torch.autograd.grad(parts.total, [z])
            self.adam.update(z, grad)
        raw = feats.lowres if isinstance(feats, FeatureMap) else feats
        return type(parts)(*(p.detach() for p in parts)), raw.detach()


def _wrap(raw: torch.Tensor, ctx: Any, z: torch.Tensor) -> Any:
    """The step's raw features as the context hands them out (a FeatureMap or the dense map)."""
    if not ctx.patch_features:
        return raw
    s = ctx.backbone.feature_scale
    return FeatureMap(raw, (s * z.shape[-2], s * z.shape[-1]))


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """``fn`` through torch.compile: ``reduce-overhead`` (CUDA graphs) on CUDA, the default mode
    elsewhere; shapes static (one graph per drag timestep)."""
    mode = "reduce-overhead" if device.type == "cuda" and BACKEND == "inductor" else None
    return torch.compile(fn, backend=BACKEND, mode=mode, dynamic=False)


def _is_compile_error(backbone: Any, exc: BaseException) -> bool:
    check = getattr(backbone, "is_compile_error", None)
    if check is not None:
        return bool(check(exc))
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def explain(fn: Callable, *args: Any) -> dict:
    """``torch._dynamo.explain`` of ``fn(*args)`` (with autograd ops traced, as the captured step is
    compiled): graphs, graph breaks and their reasons."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        out = torch._dynamo.explain(fn)(*args)
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "ops": out.op_count,
            "break_reasons": [str(b.reason).splitlines()[0] for b in out.break_reasons]}
