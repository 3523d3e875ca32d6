"""Presets carry the method's numbers; overrides are typed, range-checked and name their field."""

from __future__ import annotations

import json
import warnings

import attrs
import pytest

from gooddrag.core.config import LoadOptions, resolve_config
from gooddrag.core.errors import ConfigError, GoodDragWarning
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.registry import Registry, default_registry, make_plugin_manager


def cfg(**kw):
    """resolve_config with the load options given flat, as a front-end's flags."""
    load = {k: kw.pop(k) for k in [f.name for f in attrs.fields(LoadOptions)] if k in kw}
    return resolve_config(default_registry(), load=LoadOptions(**load), **kw)


def test_gooddrag_preset_is_the_ui_defaults():
    c = cfg()
    s, l, t = c.schedule_params, c.loss_params, c.tracker_params
    assert (c.schedule, c.loss, c.tracker) == ("aldd", "info-preserving", "nearest")
    assert (s.num_inference_steps, s.inversion_strength, s.drag_timesteps) == (50, 0.75, 7)
    assert (s.drags_per_timestep, s.steps_per_drag, s.lr, s.patience) == (10, 3, 0.02, 10)
    assert (s.reach_distance, s.loss_threshold, s.fresh_tracking) == (2.0, 0.0, False)
    assert (l.patch_radius, l.max_step, l.skip_distance, l.lam) == (4, 4.0, 2.0, 0.2)
    assert (t.radius, t.metric) == (12, "l1")
    lp = c.lora_params
    assert (lp.rank, lp.steps, lp.lr, lp.batch_size, lp.weight_decay, lp.seed) == (16, 70, 5e-4, 4, 1e-2, 0)


def test_bench_and_baseline_presets():
    b = cfg(preset="gooddrag-bench")
    assert b.loss_params.lam == 0.1 and b.schedule_params.patience == 5
    d = cfg(preset="dragdiffusion")
    assert (d.schedule, d.loss) == ("single-step", "patch-following")
    assert (d.schedule_params.inversion_strength, d.schedule_params.steps, d.schedule_params.lr) == (0.7, 80, 0.01)
    assert (d.loss_params.patch_radius, d.loss_params.max_step, d.loss_params.lam) == (1, 1.0, 0.1)
    assert d.tracker_params.radius == 3
    assert cfg(preset="dragdiffusion-star").schedule_params.steps == 210


def test_override_is_typed_and_applied():
    c = cfg(overrides=["loss.lam=0.1", "schedule.drag_timesteps=3", "schedule.fresh_tracking=true"])
    assert c.loss_params.lam == 0.1 and isinstance(c.loss_params.lam, float)
    assert c.schedule_params.drag_timesteps == 3 and c.schedule_params.fresh_tracking is True
    assert json.loads(c.to_json())["loss_params"]["lam"] == 0.1


def test_preset_values_apply_only_to_the_presets_own_components():
    # dragdiffusion sets tracker.radius=3 and patch-following; choosing info-preserving gets its own defaults
    c = cfg(preset="dragdiffusion", loss="info-preserving")
    assert c.loss_params.patch_radius == 4 and c.tracker_params.radius == 3


@pytest.mark.parametrize("override, culprit", [
    ("loss.nope=1", "loss.nope"),
    ("loss.lam=abc", "loss.lam"),
    ("schedule.drag_timesteps=2.5", "schedule.drag_timesteps"),
    ("schedule.lr=-1", "schedule.lr"),
    ("schedule.lr=nan", "schedule.lr"),
    ("loss.lam=inf", "loss.lam"),
    ("schedule.fresh_tracking=maybe", "schedule.fresh_tracking"),
    ("tracker.metric=cosine", "tracker.metric"),
    ("lora.rank=0", "lora.rank"),
    ("lam=0.1", "lam=0.1"),
    ("foo.lam=0.1", "foo"),
])
def test_bad_overrides_name_the_culprit_in_one_line(override, culprit):
    with pytest.raises(ConfigError) as exc:
        cfg(overrides=[override])
    msg = str(exc.value)
    assert culprit in msg and "\n" not in msg


def test_runtime_options_are_checked():
    for kw, word in [({"dtype": "fp8"}, "dtype"), ({"device": "tpu"}, "device"),
                     ({"attention": "flash"}, "attention"), ({"width": 100}, "width")]:
        with pytest.raises(ConfigError, match=word):
            cfg(**kw)


def test_config_is_frozen():
    c = cfg()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.loss = "x"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.loss_params.lam = 1.0


def test_missing_lora_path_is_refused_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="lora .*no such file or folder"):
        cfg(lora=str(tmp_path / "none.safetensors"))
    (tmp_path / "lora").mkdir()
    assert cfg(lora=str(tmp_path / "lora")).lora == str(tmp_path / "lora")


class _OtherTracker:
    """A second tracker, to swap in under a preset."""

    name = "other"

    @attrs.frozen(kw_only=True)
    class Params:
        radius: int = 5

    def __init__(self, params):
        self.params = params


class _OtherPlugin:
    @hookimpl
    def gooddrag_register_trackers(self):
        return [_OtherTracker]


def test_swapping_a_component_under_a_preset_warns_naming_the_dropped_values():
    reg = Registry(make_plugin_manager(entry_points=True, extra_plugins=[_OtherPlugin()]))
    with pytest.warns(GoodDragWarning) as caught:
        c = resolve_config(reg, preset="dragdiffusion", tracker="other")
    (note,) = [str(w.message) for w in caught]
    assert "tracker 'other' replaces preset dragdiffusion's 'nearest'" in note and "tracker.radius=3" in note
    assert c.tracker_params.radius == 5 and c.notes == (note,)
    assert c.sources["tracker"] == "chosen" and c.sources["tracker.radius"] == "default"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preset's own tracker: nothing dropped, no warning
        c = resolve_config(reg, preset="dragdiffusion", overrides=["loss.lam=0.3"])
    assert c.sources["tracker.radius"] == "preset dragdiffusion" and c.sources["loss.lam"] == "override"
    assert c.sources["schedule.lr"] == "default" and c.sources["schedule"] == "preset dragdiffusion"


def _listed(kind, comp):
    from gooddrag.core.params import describe_params

    return [(f, d) for f, _, d, _ in describe_params(comp)]


def test_every_listed_parameter_is_settable_and_every_settable_one_is_listed():
    from gooddrag.core.config import OVERRIDE_KINDS
    from gooddrag.core.lora import LoraParams

    reg = default_registry()
    assert set(OVERRIDE_KINDS) == {"schedule", "loss", "tracker", "lora", "backbone"}
    lora = type("L", (), {"Params": LoraParams})
    for kind, name, comp in [*((k, n, c) for k in ("schedule", "loss", "tracker", "backbone") for n, c in reg.items(k)),
                             ("lora", "lora", lora)]:
        for field, default in _listed(kind, comp):
            value = default.strip("'")
            extra = {"backbone": name} if kind == "backbone" else {kind: name} if kind != "lora" else {}
            c = resolve_config(reg, overrides=[f"{kind}.{field}={value}"], **extra)
            assert c.sources[f"{kind}.{field}"] == "override", (kind, name, field)
    c = resolve_config(reg, overrides=["backbone.feature_block=1"])  # the model selects stable-diffusion
    assert c.backbone_params.feature_block == 1 and c.to_dict()["backbone_params"]["feature_block"] == 1


@pytest.mark.parametrize("lora, overrides, idle", [
    ("off", ["lora.rank=8"], "lora.rank has no effect: the LoRA is off"),
    ("PATH", ["lora.rank=8", "lora.fuse=false"], "lora.rank has no effect: a trained LoRA is loaded from a path"),
])
def test_settings_that_cannot_apply_warn(tmp_path, lora, overrides, idle):
    lora = str(tmp_path) if lora == "PATH" else lora
    with pytest.warns(GoodDragWarning, match=idle):
        c = cfg(lora=lora, overrides=overrides)
    assert c.notes == (idle,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg(lora="auto", overrides=overrides)
