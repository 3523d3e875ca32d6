"""Presets carry SPEC's numbers; overrides are typed, range-checked and name their field."""

from __future__ import annotations

import json

import attrs
import pytest

from gooddrag.core.config import resolve_config
from gooddrag.core.errors import ConfigError
from gooddrag.core.registry import default_registry


def cfg(**kw):
    return resolve_config(default_registry(), **kw)


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
    for kw, word in [({"dtype": "fp8"}, "--dtype"), ({"device": "tpu"}, "--device"),
                     ({"attention": "flash"}, "--attention"), ({"width": 100}, "--width")]:
        with pytest.raises(ConfigError, match=word):
            cfg(**kw)


def test_config_is_frozen():
    c = cfg()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.loss = "x"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.loss_params.lam = 1.0


def test_missing_lora_path_is_refused_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="--lora .*no such file or folder"):
        cfg(lora=str(tmp_path / "none.safetensors"))
    (tmp_path / "lora").mkdir()
    assert cfg(lora=str(tmp_path / "lora")).lora == str(tmp_path / "lora")
