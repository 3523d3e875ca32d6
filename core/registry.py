"""Plugin manager and component registry.

Every component, built-in or third-party, arrives through the registration hooks of
``core/hookspecs.py`` from a module listed in the ``gooddrag`` entry-point group. The registry keeps
them by kind and name; unknown names list what exists, duplicates name both plugins.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import pluggy

from gooddrag.core import hookspecs
from gooddrag.core.errors import ConfigError, PluginError
from gooddrag.core.params import params_class

#: kind -> registration hook name
KINDS: dict[str, str] = {
    "schedule": "gooddrag_register_schedules",
    "loss": "gooddrag_register_losses",
    "tracker": "gooddrag_register_trackers",
    "backbone": "gooddrag_register_backbones",
    "metric": "gooddrag_register_metrics",
    "dataset": "gooddrag_register_datasets",
    "runner": "gooddrag_register_runners",
    "preset": "gooddrag_register_presets",
}


class Registry:
    """Components by kind and name, with the plugin that registered each."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._owner: dict[tuple[str, str], str] = {}
        for kind, hook_name in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                try:
                    found = impl.function() or []
                except Exception as exc:  # a broken plugin must not look like ours
                    raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}") from exc
                for comp in found:
                    self._add(kind, comp, impl.plugin_name)

    def _add(self, kind: str, comp: Any, plugin: str) -> None:
        name = getattr(comp, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} without a string 'name': {comp!r}")
        if kind != "preset":
            try:
                params_class(comp)
            except ConfigError:
                raise PluginError(f"plugin {plugin!r}: {kind} {name!r} has no attrs 'Params' class; "
                                  "declare one (it may be empty)") from None
        if name in self._items[kind]:
            raise PluginError(f"duplicate {kind} name {name!r}: registered by plugin "
                              f"{self._owner[(kind, name)]!r} and by plugin {plugin!r}; rename one")
        self._items[kind][name] = comp
        self._owner[(kind, name)] = plugin

    def get(self, kind: str, name: str) -> Any:
        """The component ``name`` of ``kind``; ConfigError listing what exists if unknown."""
        try:
            return self._items[kind][name]
        except KeyError:
            have = ", ".join(sorted(self._items[kind])) or "(none registered)"
            raise ConfigError(f"unknown {kind} {name!r}; available: {have}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> Iterable[tuple[str, Any]]:
        return sorted(self._items[kind].items())

    def owner(self, kind: str, name: str) -> str:
        return self._owner[(kind, name)]


def make_plugin_manager(extra_plugins: Iterable[Any] = (), entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager: hook specs, every ``gooddrag`` entry point, then ``extra_plugins``
    (objects or modules with hookimpls, e.g. a plugin under test)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as exc:
            raise PluginError(f"a 'gooddrag' entry-point plugin failed to load: {exc}; "
                              "uninstall or fix that package") from exc
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry over all installed plugins (built once)."""
    return Registry(make_plugin_manager())
