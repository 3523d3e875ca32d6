"""Plugin manager and registry: built-ins via entry points, errors for unknown/duplicate names."""

from __future__ import annotations

from importlib.metadata import entry_points

import attrs
import pytest

from gooddrag.core.errors import ConfigError, PluginError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.registry import Registry, default_registry, make_plugin_manager

BUILTIN = {
    "schedule": {"aldd", "single-step"},
    "loss": {"info-preserving", "patch-following"},
    "tracker": {"nearest"},
    "backbone": {"stable-diffusion", "tiny-random"},
    "preset": {"gooddrag", "gooddrag-bench", "dragdiffusion", "dragdiffusion-star"},
}


def test_builtins_arrive_through_the_entry_point_group():
    names = {ep.name for ep in entry_points(group="gooddrag")}
    assert {"aldd", "single-step", "info-preserving", "patch-following", "nearest", "presets"} <= names
    reg = default_registry()
    for kind, expected in BUILTIN.items():
        assert expected <= set(reg.names(kind)), kind
    assert reg.owner("schedule", "aldd") == "aldd"  # the entry-point name is the plugin name


def test_without_entry_points_nothing_is_registered():
    reg = Registry(make_plugin_manager(entry_points=False))
    assert reg.names("schedule") == [] and reg.names("loss") == []


def test_unknown_name_lists_what_exists():
    with pytest.raises(ConfigError) as exc:
        default_registry().get("tracker", "nope")
    msg = str(exc.value)
    assert "unknown tracker 'nope'" in msg and "nearest" in msg


class _Tracker:
    """A tracker for registry tests."""

    name = "nearest"

    @attrs.frozen(kw_only=True)
    class Params:
        pass


class _DupPlugin:
    @hookimpl
    def gooddrag_register_trackers(self):
        return [_Tracker]


def test_duplicate_name_names_both_plugins_and_costs_only_the_newcomer():
    pm = make_plugin_manager(entry_points=True)
    pm.register(_DupPlugin(), name="my-plugin")
    reg = Registry(pm)
    info = reg.infos["my-plugin"]
    assert info.status == "broken"
    assert "tracker 'nearest'" in info.reason and "plugin 'nearest' already registered" in info.reason
    assert reg.get("tracker", "nearest").__module__ == "gooddrag.trackers.nearest"  # the built-in still works


class _NoParams:
    """No Params."""

    name = "bare"


class _BadPlugin:
    @hookimpl
    def gooddrag_register_losses(self):
        return [_NoParams]


def test_component_without_params_is_refused():
    pm = make_plugin_manager(entry_points=False)
    pm.register(_BadPlugin(), name="bad")
    reg = Registry(pm)
    assert "loss 'bare' has no attrs 'Params' class" in reg.infos["bad"].reason
    with pytest.raises(PluginError, match="loss 'bare' comes from plugin 'bad', which failed to load: .*Params"):
        reg.get("loss", "bare")


class _Other(_Tracker):
    """Another tracker."""

    name = "other"


class _OtherPlugin:
    @hookimpl
    def gooddrag_register_trackers(self):
        return [_Other]


def test_extra_plugin_is_found_by_its_hook():
    pm = make_plugin_manager(entry_points=True, extra_plugins=[_OtherPlugin()])
    reg = Registry(pm)
    assert reg.get("tracker", "other") is _Other
    assert "nearest" in reg.names("tracker")


class _Crashing:
    @hookimpl
    def gooddrag_register_schedules(self):
        raise RuntimeError("boom")


def test_a_crashing_plugin_is_named():
    pm = make_plugin_manager(entry_points=False)
    pm.register(_Crashing(), name="crashy")
    reg = Registry(pm)
    assert reg.infos["crashy"].status == "broken"
    assert reg.infos["crashy"].reason == "gooddrag_register_schedules raised RuntimeError: boom"
    with pytest.raises(ConfigError, match="unknown schedule 'x'; available: \\(none registered\\); "
                                          "plugins not loaded: 'crashy' \\(broken\\)"):
        reg.get("schedule", "x")
