"""Presets and the resolved, validated, frozen ``EditConfig``.

A config is resolved before any model loads: preset -> chosen components -> preset parameter values
(only for the preset's own components) -> ``kind.field=value`` overrides -> validation. The config
remembers where each value came from (``sources``) and what the user should hear about (``notes``:
preset values dropped because a component was swapped, overrides that cannot apply).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from gooddrag.core.errors import ConfigError, GoodDragError, GoodDragWarning
from gooddrag.core.lora import LoraParams
from gooddrag.core.params import build_params, params_to_dict, parse_assignments
from gooddrag.core.registry import Registry

#: compute precision of the UNet passes that dominate an edit (LoRA training, reference, drag);
#: resolved per device by core.devices.resolve_precision
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: the method's model (Stable Diffusion 1.5), used when --model is not given
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

STRATEGY_KINDS = ("schedule", "loss", "tracker")
OVERRIDE_KINDS = STRATEGY_KINDS + ("lora", "backbone")  # what a kind.field=value override may name
#: the backbone whose parameters ``backbone.*`` overrides check when the model cannot be read before loading
DEFAULT_BACKBONE = "stable-diffusion"
#: LoRA settings that still matter when a trained LoRA is loaded from a path (the rest shape training)
LORA_PATH_FIELDS = ("fuse",)
DEVICES_HELP = "auto, cpu, cuda or cuda:<index>"
#: what the engine can build for a schedule before it runs: the per-image LoRA, the loss, the tracker and
#: the reference trajectory over the drag window; a schedule's ``needs`` names the ones it uses
SCHEDULE_NEEDS = frozenset({"lora", "loss", "tracker", "reference"})


@attrs.frozen(kw_only=True)
class Preset:
    """A named method: which schedule, loss and tracker, with which parameter values."""

    name: str
    doc: str
    schedule: str
    loss: str | None = None  # None: the schedule needs no loss (its ``needs``)
    tracker: str | None = None
    params: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    """A load option: its default and the help every front-end shows (``flag``: the CLI spelling)."""
    return attrs.field(default=default, metadata={"help": help, "flag": flag})


@attrs.frozen(kw_only=True)
class LoadOptions:
    """What loading a backbone depends on: one Editor per distinct value (the UI's editor pool and the
    bench key on it). The single definition of these options: the CLI, the UI and the bench build
    their flags and settings from these fields."""

    model: str = _opt(DEFAULT_MODEL, "Hub id, diffusers folder, .safetensors/.ckpt file, or tiny-random.")
    vae: str = _opt("auto", "auto (ft-MSE for SD1.x), model (keep own), hub id, folder or file.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:<i>.")
    dtype: str = _opt("fp32", "Weights dtype: fp32, fp16 or bf16.")
    attention: str = _opt("auto", "auto, sdpa or xformers (CUDA + the xformers extra).")
    faithful: bool = _opt(False, "Reference code path: no fast paths, no TF32 (slower; for checking that the fast "
                                 "paths change nothing).")
    precision: str = _opt("auto", "Compute precision of the LoRA, reference and drag passes: auto (bf16 autocast "
                                  "where the device has native bf16, else fp32), fp32, bf16 or fp16. Weights, latent "
                                  "and losses stay fp32.")
    low_memory: bool = _opt(False, "Keep the VAE and text encoder in host memory except during their calls (same "
                                   "results; for GPUs with about 6 GB).", "--low-memory")
    compile: bool = _opt(False, "torch.compile the UNet's transformer blocks (the first edit of each size compiles, "
                                "later ones run faster; a compile error falls back to eager).")
    backbone: str | None = _opt(None, "Backbone by name (see `gooddrag plugins`); by default the one that claims the "
                                      "model's files (model_index.json's pipeline class, a file's tensor names).")
    model_config: str | None = _opt(None, "For a single-file .safetensors/.ckpt model: the local diffusers folder of "
                                          "its base model, whose configs it loads with (offline).", "--model-config")

    def check(self) -> "LoadOptions":
        """One-line ConfigError for a value no backbone could load with (before anything loads)."""
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use fp32, fp16 or bf16")
        check_precision(self.precision, self.dtype, self.faithful)
        if self.attention not in ("auto", "sdpa", "xformers"):
            raise ConfigError(f"attention {self.attention!r} is not supported; use auto, sdpa or xformers")
        base, _, index = self.device.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ConfigError(f"device {self.device!r} is not supported; use {DEVICES_HELP}")
        if base == "cuda":
            from gooddrag.core.devices import resolve_device

            resolve_device(self.device)  # a machine without that GPU is refused here, before any model loads
        return self

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class EditConfig:
    """Everything that determines an edit, printed by ``--dry-run`` and saved in ``run.json``."""

    preset: str
    schedule: str
    loss: str | None  # None when the schedule needs none (then its params are None too)
    tracker: str | None
    schedule_params: Any
    loss_params: Any
    tracker_params: Any
    load: LoadOptions = attrs.field(factory=LoadOptions)  # how the backbone is loaded
    lora: str = "auto"
    lora_params: Any = None
    seed: int = 0
    width: int = 512
    backbone_params: Any = None
    #: where each value came from: {"loss": "preset gooddrag", "loss.lam": "override", ...}
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)
    #: one-line warnings about this config (also issued as GoodDragWarning)
    notes: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    def params(self, kind: str) -> Any:
        return getattr(self, f"{kind}_params")

    def to_dict(self) -> dict[str, Any]:
        """Flat, as saved in run.json: the load options sit beside the method's settings."""
        out: dict[str, Any] = {}
        for f in attrs.fields(EditConfig):
            if f.name in ("sources", "notes"):
                continue
            v = getattr(self, f.name)
            if f.name == "load":
                out.update(v.to_dict())
            else:
                out[f.name] = params_to_dict(v) if attrs.has(type(v)) else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["loss.lam=0.1", ...]`` -> ``{"loss": {"lam": "0.1"}}``; one-line errors for bad syntax."""
    out = parse_assignments(overrides, "override", "kind.field=value, e.g. loss.lam=0.1")
    for kind in out:
        if kind not in OVERRIDE_KINDS:
            item = next(o for o in overrides if o.strip().startswith(f"{kind}."))
            raise ConfigError(f"bad override {item!r}: unknown kind {kind!r}; use one of {', '.join(OVERRIDE_KINDS)}")
    return out


def resolve_config(
    registry: Registry,
    *,
    preset: str = "gooddrag",
    schedule: str | None = None,
    loss: str | None = None,
    tracker: str | None = None,
    overrides: Sequence[str] | Mapping[str, Mapping[str, Any]] = (),
    backbone: str | type | None = None,
    load: LoadOptions | None = None,
    lora: str = "auto",
    seed: int = 0,
    width: int = 512,
) -> EditConfig:
    """Resolve and validate a config. Raises ConfigError (one line, names the culprit); each note
    (see EditConfig.notes) is also issued as a GoodDragWarning. ``backbone`` is the backbone
    component (class or registered name) whose parameters ``backbone.*`` overrides set; by default
    the one ``load.model`` selects."""
    load = (load or LoadOptions()).check()
    pre: Preset = registry.get("preset", preset)
    chosen = {"schedule": schedule or pre.schedule, "loss": loss or pre.loss, "tracker": tracker or pre.tracker}
    given = parse_overrides(overrides) if not isinstance(overrides, Mapping) else {k: dict(v) for k, v in overrides.items()}
    resolved: dict[str, Any] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    needs = schedule_needs(registry.get("schedule", chosen["schedule"]))
    for kind in STRATEGY_KINDS:
        if kind != "schedule" and kind not in needs:  # the schedule uses none: build none, say so if one was asked for
            asked = [f"--{kind} {chosen[kind]}"] if {"loss": loss, "tracker": tracker}[kind] else []
            asked += [f"{kind}.{k}" for k in given.get(kind, {})]
            if asked:
                notes.append(f"{', '.join(asked)} {'has' if len(asked) == 1 else 'have'} no effect: schedule "
                             f"{chosen['schedule']!r} uses no {kind}")
            chosen[kind], resolved[f"{kind}_params"] = None, None
            sources[kind] = f"not used by schedule {chosen['schedule']}"
            continue
        if chosen[kind] is None:
            raise ConfigError(f"schedule {chosen['schedule']!r} needs a {kind} and preset {preset!r} names none; "
                              f"choose one with --{kind} NAME (see gooddrag plugins)")
        comp = registry.get(kind, chosen[kind])
        own = chosen[kind] == getattr(pre, kind)
        sources[kind] = f"preset {preset}" if own else "chosen"
        preset_values = dict(pre.params.get(kind, {}))
        values: dict[str, Any] = {}
        if own:
            values.update(preset_values)
        elif preset_values:
            dropped = ", ".join(f"{kind}.{k}={v}" for k, v in preset_values.items())
            notes.append(f"{kind} {chosen[kind]!r} replaces preset {preset}'s {getattr(pre, kind)!r}, so the preset's "
                         f"values for it are not used ({dropped}); set any you want as overrides")
        values.update(given.get(kind, {}))
        resolved[f"{kind}_params"] = built = build_params(kind, comp, values)
        _sources(sources, kind, built, given.get(kind, {}), preset_values if own else {}, preset)
    lora_preset, lora_given = dict(pre.params.get("lora", {})), given.get("lora", {})
    resolved["lora_params"] = built = build_params("lora", _LoraSettings, {**lora_preset, **lora_given})
    _sources(sources, "lora", built, lora_given, lora_preset, preset)
    mode = lora
    if "lora" not in needs:
        if mode not in ("auto", "off"):
            notes.append(f"lora {mode} has no effect: schedule {chosen['schedule']!r} uses no LoRA")
        lora = mode = "off"
    idle = [k for k in lora_given if mode == "off" or (mode != "auto" and k not in LORA_PATH_FIELDS)]
    if idle:
        why = ("the LoRA is off" if "lora" in needs else f"schedule {chosen['schedule']!r} uses no LoRA") \
            if mode == "off" else "a trained LoRA is loaded from a path"
        notes.append(f"{', '.join(f'lora.{k}' for k in idle)} {'has' if len(idle) == 1 else 'have'} no effect: {why}")
    bcomp = _backbone_component(registry, backbone or load.backbone, load.model, load.model_config)
    if bcomp is None:
        if given.get("backbone"):
            raise ConfigError(f"backbone {backbone!r} is not registered, so backbone.* overrides cannot be checked")
    else:
        resolved["backbone_params"] = built = build_params("backbone", bcomp, given.get("backbone", {}))
        _sources(sources, "backbone", built, given.get("backbone", {}), {}, preset)
    _check_edit(lora, seed, width)
    for note in notes:
        warnings.warn(note, GoodDragWarning, stacklevel=2)
    return EditConfig(preset=preset, **chosen, **resolved, load=load, lora=lora, seed=seed, width=width,
                      sources=sources, notes=tuple(notes))


def schedule_needs(component: type) -> frozenset[str]:
    """What the engine builds for a schedule (its ``needs``; see SCHEDULE_NEEDS). A schedule that does
    not say needs everything, as the built-in optimising schedules do."""
    needs = getattr(component, "needs", SCHEDULE_NEEDS)
    unknown = set(needs) - SCHEDULE_NEEDS
    if unknown:
        raise ConfigError(f"schedule {getattr(component, 'name', component)!r} needs {sorted(unknown)}, which the "
                          f"engine does not know; use a subset of {sorted(SCHEDULE_NEEDS)}")
    return frozenset(needs)


def _sources(out: dict[str, str], kind: str, params: Any, given: Mapping, from_preset: Mapping, preset: str) -> None:
    for field in params_to_dict(params):
        out[f"{kind}.{field}"] = ("override" if field in given else f"preset {preset}" if field in from_preset
                                  else "default")


def _backbone_component(registry: Registry, backbone: str | type | None, model: str,
                        config: str | None = None) -> type | None:
    """The backbone class for ``backbone`` (class or name), else the one ``model`` selects."""
    if isinstance(backbone, type):
        return backbone
    if backbone is None:
        from gooddrag.core.backbone import select_backbone

        try:  # the backbone that claims the model's files (read, not loaded)
            return select_backbone(registry, model, config=config)[0]
        except GoodDragError:  # a model that cannot be read here: loading says why, in one line
            backbone = DEFAULT_BACKBONE
    return registry.get("backbone", backbone) if backbone in registry.names("backbone") else None


class _LoraSettings:
    """The per-image LoRA settings go through the same typed override path as components."""

    name = "lora"
    Params = LoraParams


def _check_edit(lora: str, seed: Any, width: Any) -> None:
    """The per-edit settings that are not a component's parameters."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 16 or width % 8:
        raise ConfigError(f"width {width!r}: the working width must be a multiple of 8, at least 16")
    if lora not in ("auto", "off") and not Path(lora).exists() and not _written(Path(lora)):
        raise ConfigError(f"lora {lora!r}: no such file or folder; use auto, off or a LoRA path")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed {seed!r} must be an integer from 0 to 2**63-1")


def _written(path: Path) -> bool:
    """Whether ``path`` exists once the writes still running are done (an earlier edit's LoRA cache
    entry, reported by its path before it is on disk: core/deferred.py)."""
    from gooddrag.core import deferred

    deferred.wait()
    return path.exists()


def check_precision(precision: str, dtype: str, faithful: bool) -> None:
    """Refuse an unknown precision, or one that contradicts the weights' dtype or the faithful path."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; use {', '.join(PRECISIONS)}")
    if faithful and precision not in ("auto", "fp32"):
        raise ConfigError(f"precision {precision} and faithful contradict each other: the faithful path computes "
                          "in fp32; drop faithful, or use precision fp32")
    if dtype != "fp32" and precision not in ("auto", dtype):
        raise ConfigError(f"precision {precision} needs fp32 weights, but dtype is {dtype} (reduced-precision "
                          f"weights compute in their own dtype); use dtype fp32, or precision auto")
