"""Component parameters: frozen keyword-only attrs classes, typed conversion of CLI overrides.

Every component declares ``Params`` with the method's numbers as defaults and attrs validators for
ranges. This module turns ``field=value`` strings into typed values and turns attrs' validation
errors into one-line :class:`ConfigError` messages naming the field.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Mapping

import attrs

from gooddrag.core.errors import ConfigError


def parse_assignments(items: Any, what: str, example: str) -> dict[str, dict[str, str]]:
    """``["loss.lam=0.1", ...]`` -> ``{"loss": {"lam": "0.1"}}``: the one parser of every
    ``name.field=value`` option (-p, --metric-param, --runner-param); one-line errors naming ``what``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not field or not name:
            raise ConfigError(f"bad {what} {item!r}; write it as {example}")
        out.setdefault(name, {})[field] = value.strip()
    return out

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def params_class(component: type) -> type:
    """The component's Params class, checked to be a frozen keyword-only attrs class."""
    cls = getattr(component, "Params", None)
    if cls is None or not attrs.has(cls):
        raise ConfigError(f"component {getattr(component, 'name', component)!r} has no attrs Params class")
    return cls


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of each Params field (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in attrs.fields(cls)}


def _convert(kind: str, field: str, tp: Any, raw: Any) -> Any:
    """Convert ``raw`` (usually a CLI string) to ``tp``; raise ConfigError naming the field."""
    where = f"{kind}.{field}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"}):
            return None
        return _convert(kind, field, args[0], raw)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c) == str(raw):
                return c
        raise ConfigError(f"{where}={raw!r} is not one of {', '.join(map(str, choices))}")
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError
                return int(raw)
            return int(str(raw).strip())
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):
                raise ConfigError(f"{where}={raw!r} is not a finite number; pass a finite value")
            return value
        if tp is str:
            return str(raw)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={raw!r} is not a valid {getattr(tp, '__name__', tp)}; "
                          f"pass e.g. {kind}.{field}={_example(tp)}") from None
    return raw


def _example(tp: Any) -> str:
    return {int: "3", float: "0.1", bool: "true", str: "text"}.get(tp, "<value>")


def build_params(kind: str, component: type, values: Mapping[str, Any]) -> Any:
    """Instantiate ``component.Params`` from defaults + ``values`` (strings or typed), validated."""
    cls = params_class(component)
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        known = ", ".join(types_) or "(none)"
        raise ConfigError(f"unknown parameter {kind}.{unknown[0]} for {kind} {component.name!r}; "
                          f"its parameters are: {known}")
    typed = {k: _convert(kind, k, types_[k], v) for k, v in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:  # attrs validators raise these
        field = _culprit(exc, typed)
        raise ConfigError(f"bad value for {kind}.{field}: {_first_line(exc)}") from None


def _culprit(exc: Exception, typed: Mapping[str, Any]) -> str:
    """Field named by an attrs validator error (its args carry the Attribute), else the first override."""
    for arg in getattr(exc, "args", ()):
        name = getattr(arg, "name", None)
        if isinstance(name, str):
            return name
    quoted = re.match(r"'(\w+)'", _first_line(exc))
    if quoted:
        return quoted.group(1)
    return next(iter(typed), "?")


def _first_line(exc: Exception) -> str:
    msg = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return msg.splitlines()[0] if msg else type(exc).__name__


def params_to_dict(params: Any) -> dict[str, Any]:
    """JSON-friendly dict of a Params instance."""
    return attrs.asdict(params)


def describe_params(component: type) -> list[tuple[str, str, str, str]]:
    """(field, type, default, help) rows for ``gooddrag plugins --params``."""
    cls = params_class(component)
    types_ = field_types(cls)
    rows = []
    for f in attrs.fields(cls):
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[union-attr]
        tp = types_[f.name]
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((f.name, tname, repr(default), f.metadata.get("help", "")))
    return rows


def p(default: Any, help: str, *validators: Any) -> Any:
    """A Params field: default, one-line help (shown by ``gooddrag plugins --params``), validators."""
    return attrs.field(default=default, metadata={"help": help},
                       validator=list(validators) if validators else None)


def finite(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: reject NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be finite (got {value})", attribute)


@attrs.frozen
class ParamSpec:
    """One Params field as a front-end needs it to build a control: type, default, help, range, choices."""

    field: str
    type: Any  # bool, int, float, str, or the resolved annotation for anything else
    default: Any
    help: str
    minimum: float | None = None  # from ge/gt validators (gt is reported as its bound)
    maximum: float | None = None  # from le/lt validators
    choices: tuple | None = None  # from in_ validators or a Literal annotation
    optional: bool = False  # the annotation allows None


def param_specs(component: type) -> list[ParamSpec]:
    """Every field of ``component.Params`` with the range and choices its attrs validators declare, so
    a UI can show a third-party component's parameters without knowing it."""
    cls = params_class(component)
    types_ = field_types(cls)
    out = []
    for f in attrs.fields(cls):
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[union-attr]
        tp, optional = types_[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = len(args) < len(typing.get_args(tp)), (args[0] if len(args) == 1 else tp)
        lo = hi = choices = None
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
        for v in _validators(f.validator):
            op, bound = getattr(v, "compare_op", None), getattr(v, "bound", None)
            if op in (">=", ">") and isinstance(bound, (int, float)):
                lo = bound if lo is None else max(lo, bound)
            elif op in ("<=", "<") and isinstance(bound, (int, float)):
                hi = bound if hi is None else min(hi, bound)
            elif isinstance(getattr(v, "options", None), (tuple, list, set, frozenset)):
                choices = tuple(v.options)
        out.append(ParamSpec(f.name, tp, default, f.metadata.get("help", ""), lo, hi, choices, optional))
    return out


def _validators(v: Any) -> list[Any]:
    """Flatten attrs' and_/optional wrappers into the validators they hold."""
    if v is None:
        return []
    inner = getattr(v, "_validators", None)
    if inner is not None:
        return [x for w in inner for x in _validators(w)]
    wrapped = getattr(v, "validator", None)  # attrs.validators.optional(...)
    if wrapped is not None and wrapped is not v:
        return _validators(wrapped)
    return [v]
