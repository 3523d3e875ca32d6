"""Parameter controls generated from a component's ``Params`` (types, ranges, help), so every
registered schedule, loss and tracker (a third-party plugin's too) gets its controls with no UI code."""

from __future__ import annotations

import math
from typing import Any, Mapping

from gooddrag.core.config import Preset
from gooddrag.core.params import ParamSpec, param_specs


def make_control(spec: ParamSpec, kind: str, value: Any) -> Any:
    """The gradio component for one field: checkbox, dropdown, slider (both bounds), number or text."""
    import gradio as gr

    common = dict(label=f"{kind}.{spec.field}", info=spec.help or None, elem_id=f"param-{kind}-{spec.field}",
                  min_width=220)
    if spec.optional or spec.type not in (bool, int, float, str):
        return gr.Textbox(value=_text(value), **common)
    if spec.type is bool:
        return gr.Checkbox(value=bool(value), **common)
    if spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.type is str:
        return gr.Textbox(value=value, **common)
    integer = spec.type is int
    step = 1 if integer else _step(value)
    if not integer and spec.minimum is not None and spec.maximum is not None and spec.maximum - spec.minimum <= 1:
        # a fraction: a slider, on a grid that holds the default exactly (the browser snaps to the grid)
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, value=value, step=min(0.01, step), **common)
    return gr.Number(value=value, minimum=spec.minimum, maximum=spec.maximum, precision=0 if integer else None,
                     step=step, **common)


def _step(value: Any) -> float:
    """A tenth of the default's leading decimal (0.02 -> 0.001, 5e-4 -> 1e-5, 2.0 -> 0.1); 0.01 for 0."""
    if not isinstance(value, (int, float)) or not value:
        return 0.01
    return 10.0 ** (math.floor(math.log10(abs(value))) - 1)


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def to_override(spec: ParamSpec, value: Any) -> Any:
    """A control's value in the form ``build_params`` converts (text goes through the typed parser)."""
    if spec.optional or spec.type not in (bool, int, float, str):
        return "none" if value in (None, "") else str(value)
    return value


class ParamControls:
    """All parameter controls of one component, keyed by field."""

    def __init__(self, kind: str, component: type, preset: Preset | None = None):
        self.kind, self.component = kind, component
        self.specs = param_specs(component)
        self.controls = [make_control(s, kind, v) for s, v in zip(self.specs, self.values_for(preset))]

    def overrides(self, values: list[Any]) -> dict[str, Any]:
        """{field: value} from the controls' current values (in the order of ``self.controls``)."""
        return {s.field: to_override(s, v) for s, v in zip(self.specs, values)}

    def values_for(self, preset: Preset | None) -> list[Any]:
        """Defaults, with the preset's values where the preset uses this component."""
        uses = preset is not None and (self.kind == "lora" or getattr(preset, self.kind) == self.component.name)
        given = dict(preset.params.get(self.kind, {})) if uses else {}
        out = []
        for s in self.specs:
            v = given.get(s.field, s.default)
            out.append(_text(v) if (s.optional or s.type not in (bool, int, float, str)) else v)
        return out
