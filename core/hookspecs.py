"""The gooddrag hook specification (pluggy project name ``gooddrag``).

Registration hooks are called once, when the plugin manager starts. Each returns a list of
*component classes*: a class with a unique ``name`` (str), a docstring, and a frozen keyword-only
attrs class ``Params`` whose defaults are the method's numbers. Built-ins are registered exactly
like third-party packages: through the ``gooddrag`` entry-point group.

Event hooks are called at the edges of the hot loop. They receive live tensors (no host copies are
made unless a plugin asks for them), must be cheap, and their return values are ignored.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "gooddrag"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: the phases of an edit, in order, as ``gooddrag_phase`` names them (core/engine.run_edit)
PHASES = ("lora", "inversion", "reference", "drag", "finish", "decode")


# --- registration hooks ------------------------------------------------------------------------


@hookspec
def gooddrag_register_schedules() -> list[type]:
    """Called once at start-up. Return drag schedule classes.

    A schedule has ``Params`` (with ``num_inference_steps`` and ``inversion_strength``: the engine
    inverts to ``core.ddim.start_index(num_inference_steps, inversion_strength)``),
    ``drag_indices(start, num_steps) -> list[int]`` (the timestep indices it drags on, so the engine
    caches the reference trajectory over them) and ``run(ctx: DragContext) -> Outcome``: it decides
    how many optimisation steps, when to track points and when to stop, denoises its own drag
    timesteps, and returns the latent and the index the engine's finish starts from.

    A class attribute ``needs`` (a frozenset, a subset of ``{"lora", "loss", "tracker", "reference"}``)
    says what the engine must build before ``run``; a schedule without it gets all four. For what is
    not needed the engine trains or loads nothing: ``ctx.loss`` and ``ctx.tracker`` are None, no
    reference pass is made (``ctx.reference`` holds only the inverted latent), no ``--loss`` or
    ``--tracker`` is asked for, and the LoRA is off. The closed-form ``warp`` schedule needs nothing.
    """


@hookspec
def gooddrag_register_losses() -> list[type]:
    """Called once at start-up. Return motion-supervision loss classes.

    A loss has ``Params`` and ``__call__(ctx, z, t, feats, eps) -> LossParts`` (the points are
    ``ctx.points``). Optional: ``uses_eps(ctx) -> bool`` (False lets the backbone stop the UNet after
    the feature block, and eps is None) and ``reads_patches = True`` (feats may be a lazy FeatureMap).
    """


@hookspec
def gooddrag_register_trackers() -> list[type]:
    """Called once at start-up. Return point tracker classes.

    A tracker has ``Params`` and ``track(ref_vectors, feats, points) -> points``.
    """


@hookspec
def gooddrag_register_backbones() -> list[type]:
    """Called once at start-up. Return backbone classes (a diffusion model adapter).

    A backbone has ``Params`` and a classmethod ``load(model, *, vae, device, dtype, attention)``
    returning the loaded model adapter the engine calls (encode, decode, eps, eps_and_features,
    sampler, ddim_step, invert, eps_mutual, use_lora, set_prompt; docs/architecture.md).
    """


@hookspec
def gooddrag_register_metrics() -> list[type]:
    """Called once at start-up. Return metric classes: ``Params``, ``check()`` (raises
    RequirementError before a run starts when a weight, package or key is missing),
    ``score(sample, result_image, final_points) -> dict`` and ``aggregate(rows) -> dict``."""


@hookspec
def gooddrag_register_datasets() -> list[type]:
    """Called once at start-up. Return dataset classes: ``Params``, ``detect(folder) -> bool`` and
    ``samples(folder)`` yielding samples (image, mask, handle/target pairs, prompt, id, group)."""


@hookspec
def gooddrag_register_runners() -> list[type]:
    """Called once at start-up. Return bench runner classes (how samples are spread over devices):
    ``Params``, optionally ``check()``, and ``run(jobs, make_worker, on_event=None)`` yielding one
    outcome (or ``JobLost``) per job; the contract is in ``gooddrag.core.runners``."""


@hookspec
def gooddrag_register_presets() -> list[Any]:
    """Called once at start-up. Return ``gooddrag.core.config.Preset`` objects: a named choice of
    schedule, loss and tracker plus parameter values."""


# --- event hooks (edges of the hot loop) --------------------------------------------------------


@hookspec
def gooddrag_edit_started(config: Any, image_size: tuple[int, int], points: Any) -> None:
    """Called once per edit, after the input is validated and before any model work."""


@hookspec
def gooddrag_drag_step(timestep: int, drag: int, step: int, loss: Any, motion: Any, preserve: Any) -> None:
    """Called after every gradient step on the latent. Loss parts are 0-d tensors on the device."""


@hookspec
def gooddrag_points_tracked(timestep: int, drag: int, points: Any) -> None:
    """Called after every tracking event with the current handles, a (N, 2) tensor of
    (row, col) feature-grid positions on the device."""


@hookspec
def gooddrag_drag_stopped(timestep: int, reason: str) -> None:
    """Called once when dragging ends: reason is ``reached``, ``patience``, ``schedule_end``,
    ``loss_threshold`` or ``warped`` (the ``warp`` schedule's closed-form move, which no tracker checks)."""


@hookspec
def gooddrag_phase(name: str, status: str) -> None:
    """Called when a phase (one of ``PHASES``: ``lora``, ``inversion``, ``reference``, ``drag``,
    ``finish``, ``decode``) starts (status ``start``) or ends (status ``end``)."""


@hookspec
def gooddrag_phase_step(name: str, step: int, total: int) -> None:
    """Called after each step of a phase that counts its steps: ``lora`` (training steps; not
    called for a cached or given LoRA), ``inversion``, ``reference`` and ``finish`` (denoising steps). ``step``
    runs from 1 to ``total``; progress bars and cancellation (raise to stop) hook in here."""


@hookspec
def gooddrag_preview(timestep: int, drag: int, latent: Any, x0: Any, handles: Any) -> None:
    """Called after each drag (B-loop iteration), for animations and live previews: ``latent`` is the
    current latent (1, 4, h, w) at ``timestep`` (mostly noise), ``x0`` the clean latent the model
    predicts from it (decode it to see what the image is becoming), ``handles`` the current handles
    (N, 2) (row, col) on the feature grid. Only called, and x0 only computed (one extra UNet pass
    per drag), when some plugin implements it."""


@hookspec
def gooddrag_edit_finished(result: Any) -> None:
    """Called once per successful edit with the EditResult."""
