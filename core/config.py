"""Presets and the resolved, validated, frozen ``EditConfig``.

A config is resolved before any model loads: preset -> chosen components -> preset parameter values
(only for the preset's own components) -> ``-p kind.field=value`` overrides -> validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from gooddrag.core.errors import ConfigError
from gooddrag.core.lora import LoraParams
from gooddrag.core.params import build_params, params_to_dict
from gooddrag.core.registry import Registry

#: the method's model (Stable Diffusion 1.5), used when --model is not given
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

STRATEGY_KINDS = ("schedule", "loss", "tracker")
OVERRIDE_KINDS = STRATEGY_KINDS + ("lora",)  # what `-p kind.field=value` may name
DEVICES_HELP = "auto, cpu, cuda or cuda:<index>"


@attrs.frozen(kw_only=True)
class Preset:
    """A named method: which schedule, loss and tracker, with which parameter values."""

    name: str
    doc: str
    schedule: str
    loss: str
    tracker: str
    params: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class EditConfig:
    """Everything that determines an edit, printed by ``--dry-run`` and saved in ``run.json``."""

    preset: str
    schedule: str
    loss: str
    tracker: str
    schedule_params: Any
    loss_params: Any
    tracker_params: Any
    model: str = DEFAULT_MODEL
    vae: str = "auto"
    lora: str = "auto"
    lora_params: Any = None
    device: str = "auto"
    dtype: str = "fp32"
    attention: str = "auto"
    seed: int = 0
    width: int = 512
    faithful: bool = False  # the reference code path: no fast paths (slower; same result up to rounding)

    def params(self, kind: str) -> Any:
        return getattr(self, f"{kind}_params")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in attrs.fields(EditConfig):
            v = getattr(self, f.name)
            out[f.name] = params_to_dict(v) if attrs.has(type(v)) else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["loss.lam=0.1", ...]`` -> ``{"loss": {"lam": "0.1"}}``; one-line errors for bad syntax."""
    out: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        kind, dot, field = key.strip().partition(".")
        if not sep or not dot or not field or not kind:
            raise ConfigError(f"bad override {item!r}; write it as kind.field=value, e.g. -p loss.lam=0.1")
        if kind not in OVERRIDE_KINDS:
            raise ConfigError(f"bad override {item!r}: unknown kind {kind!r}; use one of {', '.join(OVERRIDE_KINDS)}")
        out.setdefault(kind, {})[field] = value.strip()
    return out


def resolve_config(
    registry: Registry,
    *,
    preset: str = "gooddrag",
    schedule: str | None = None,
    loss: str | None = None,
    tracker: str | None = None,
    overrides: Sequence[str] | Mapping[str, Mapping[str, Any]] = (),
    **runtime: Any,
) -> EditConfig:
    """Resolve and validate a config. Raises ConfigError (one line, names the culprit)."""
    pre: Preset = registry.get("preset", preset)
    chosen = {"schedule": schedule or pre.schedule, "loss": loss or pre.loss, "tracker": tracker or pre.tracker}
    given = parse_overrides(overrides) if not isinstance(overrides, Mapping) else {k: dict(v) for k, v in overrides.items()}
    resolved: dict[str, Any] = {}
    for kind in STRATEGY_KINDS:
        comp = registry.get(kind, chosen[kind])
        values: dict[str, Any] = {}
        if chosen[kind] == getattr(pre, kind):
            values.update(pre.params.get(kind, {}))
        values.update(given.get(kind, {}))
        resolved[f"{kind}_params"] = build_params(kind, comp, values)
    resolved["lora_params"] = build_params("lora", _LoraSettings, {**pre.params.get("lora", {}), **given.get("lora", {})})
    _check_runtime(runtime)
    return EditConfig(preset=preset, **chosen, **resolved, **runtime)


class _LoraSettings:
    """The per-image LoRA settings go through the same typed override path as components."""

    name = "lora"
    Params = LoraParams


def _check_runtime(runtime: Mapping[str, Any]) -> None:
    dtype = runtime.get("dtype", "fp32")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--dtype {dtype!r} is not supported; use fp32, fp16 or bf16")
    attention = runtime.get("attention", "auto")
    if attention not in ("auto", "sdpa", "xformers"):
        raise ConfigError(f"--attention {attention!r} is not supported; use auto, sdpa or xformers")
    device = runtime.get("device", "auto")
    base, _, index = device.partition(":")
    if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device {device!r} is not supported; use {DEVICES_HELP}")
    width = runtime.get("width", 512)
    if not isinstance(width, int) or width < 16 or width % 8:
        raise ConfigError(f"--width {width!r}: the working width must be a multiple of 8, at least 16")
    lora = runtime.get("lora", "auto")
    if lora not in ("auto", "off") and not Path(lora).exists():
        raise ConfigError(f"--lora {lora}: no such file or folder; pass auto, off or a LoRA path")
    seed = runtime.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed {seed!r} must be a non-negative integer")
