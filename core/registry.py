"""Plugin manager and component registry.

Every component, built-in or third-party, arrives through the registration hooks of
``core/hookspecs.py`` from a module listed in the ``gooddrag`` entry-point group. The registry keeps
them by kind and name; unknown names list what exists.

A plugin that fails (its module does not import, it implements a hook that does not exist, a hook
raises or returns something that is not a list of valid components, or it reuses a taken name) costs
only itself: it is recorded as broken with the reason and the fix, a warning names it, and every
other plugin works. A plugin can be switched off by its entry-point name (``--disable-plugin NAME``
or ``GOODDRAG_DISABLE_PLUGINS=NAME,NAME``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import warnings
from importlib.metadata import entry_points
from typing import Any, Iterable

import attrs
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
DISABLE_ENV = "GOODDRAG_DISABLE_PLUGINS"
_BUILTIN_PREFIX = "gooddrag."


class PluginWarning(UserWarning):
    """A plugin was skipped (broken or disabled by name). The CLI prints these as one line."""


@attrs.frozen
class PluginInfo:
    """One plugin as ``gooddrag plugins`` lists it."""

    name: str  # the entry-point name (or the name it was registered under)
    source: str  # module and distribution it came from
    status: str  # loaded | broken | disabled
    reason: str = ""  # why it is broken: what was expected and what came back
    fix: str = ""
    components: tuple[tuple[str, str], ...] = ()  # (kind, name) it offers (or tried to offer)

    def warning(self) -> str:
        return (f"plugin {self.name!r} is broken and was skipped: {self.reason}; {self.fix} "
                f"(or switch it off: --disable-plugin {self.name})")


class _Broken(Exception):
    def __init__(self, reason: str, fix: str, components: Iterable[tuple[str, str]] = ()):
        super().__init__(reason)
        self.reason, self.fix, self.components = reason, fix, tuple(components)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what happened to each plugin while loading (see :class:`PluginInfo`)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}

    def add_plugin(self, plugin: Any, name: str, source: str = "") -> None:
        """Register ``plugin`` unless it is malformed; a malformed one is recorded as broken."""
        source = source or _module_of(plugin)
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            self._broke(name, source, _Broken(_one_line(exc), "match the hook's argument names in gooddrag.core.hookspecs"))
            return
        except ValueError as exc:  # already registered under another name, or the name is taken
            self._broke(name, source, _Broken(_one_line(exc), "give the plugin a unique entry-point name"))
            return
        unknown = [c.name for c in self.get_hookcallers(plugin) or [] if not c.has_spec()]
        unmarked = [n for n in dir(plugin) if n.startswith("gooddrag_") and callable(getattr(plugin, n))
                    and not hasattr(getattr(plugin, n), f"{hookspecs.PROJECT}_impl")]
        if unknown or unmarked:
            self.unregister(plugin)
            self._broke(name, source, _Broken(*_unknown_hook(unknown[0])) if unknown else _Broken(
                f"its function {unmarked[0]!r} is not marked as a hook implementation",
                "decorate it with @gooddrag.core.hookspecs.hookimpl"))
            return
        self.infos[name] = PluginInfo(name, source, "loaded")

    def _broke(self, name: str, source: str, exc: _Broken) -> None:
        self.infos[name] = PluginInfo(name, source, "broken", exc.reason, exc.fix, exc.components)


def _module_of(plugin: Any) -> str:
    return plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unknown_hook(name: str) -> tuple[str, str]:
    known = [n for n in dir(hookspecs) if n.startswith("gooddrag_")]
    close = difflib.get_close_matches(name, known, n=1)
    fix = f"did you mean {close[0]!r}?" if close else "see gooddrag.core.hookspecs for the hook names"
    return f"it implements {name!r}, which is not a gooddrag hook", f"rename it ({fix})"


def disabled_from_env() -> frozenset[str]:
    """Plugin names in ``$GOODDRAG_DISABLE_PLUGINS`` (comma- or space-separated)."""
    return frozenset(n for n in os.environ.get(DISABLE_ENV, "").replace(",", " ").split() if n)


def make_plugin_manager(extra_plugins: Iterable[Any] = (), entry_points: bool = True,
                        disabled: Iterable[str] = ()) -> PluginManager:
    """A fresh plugin manager: hook specs, every ``gooddrag`` entry point except the ``disabled``
    names, then ``extra_plugins`` (objects or modules with hookimpls, e.g. a plugin under test).
    A plugin that fails to import or is malformed is recorded in ``pm.infos``, not raised."""
    pm = PluginManager()
    disabled = set(disabled)
    if entry_points:
        for ep in sorted(_entry_points(), key=_load_order):
            source = f"{ep.value}" + (f" ({ep.dist.name} {ep.dist.version})" if ep.dist else "")
            if ep.name in disabled:
                pm.infos[ep.name] = PluginInfo(ep.name, source, "disabled")
                continue
            if ep.name in pm.infos or pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a third-party module is its own
                pm._broke(ep.name, source, _Broken(f"importing {ep.value} failed ({_one_line(exc)})",
                                                   "fix or reinstall that package"))
                continue
            pm.add_plugin(plugin, ep.name, source)
    for plugin in extra_plugins:
        pm.add_plugin(plugin, pm.get_canonical_name(plugin))
    return pm


def _entry_points() -> list[Any]:
    return list(entry_points(group=hookspecs.PROJECT))


def _load_order(ep: Any) -> tuple[bool, str]:
    """Built-ins first, so a third-party plugin that reuses a built-in name is the one refused."""
    return (not ep.value.startswith(_BUILTIN_PREFIX), ep.name)


class Registry:
    """Components by kind and name, with the plugin that registered each; broken plugins recorded."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._owner: dict[tuple[str, str], str] = {}
        self.infos: dict[str, PluginInfo] = dict(getattr(pm, "infos", {}))
        # registration order: make_plugin_manager registers built-ins first (_load_order), so a
        # third-party plugin that reuses a built-in name is the one refused
        for name, plugin in pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            try:
                found = self._collect(name, plugin)
            except _Broken as exc:
                source = self.infos[name].source if name in self.infos else _module_of(plugin)
                self.infos[name] = PluginInfo(name, source, "broken", exc.reason, exc.fix, exc.components)
                pm.unregister(plugin)  # it receives no events either
                continue
            for kind, comp in found:
                self._items[kind][comp.name] = comp
                self._owner[(kind, comp.name)] = name
            info = self.infos.get(name) or PluginInfo(name, _module_of(plugin), "loaded")
            self.infos[name] = attrs.evolve(info, components=tuple((k, c.name) for k, c in found))

    def _collect(self, plugin_name: str, plugin: Any) -> list[tuple[str, Any]]:
        """Every component the plugin registers, validated as a whole: one bad item refuses the plugin."""
        found: list[tuple[str, Any]] = []
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    items = impl.function()
                except Exception as exc:
                    raise _Broken(f"{hook_name} raised {_one_line(exc)}", "fix the plugin") from None
                if items is None:
                    items = []
                if not isinstance(items, (list, tuple)):
                    what = f"the class {items.__name__}" if isinstance(items, type) else f"a {type(items).__name__}"
                    hint = f"return [{items.__name__}]" if isinstance(items, type) else "return a list"
                    raise _Broken(f"{hook_name} returned {what}; it must return a list of {kind} classes",
                                  hint, _names(kind, [items]))
                for comp in items:
                    found.append((kind, self._check(kind, comp, found, _names(kind, items))))
        return found

    def _check(self, kind: str, comp: Any, found: list[tuple[str, Any]], offered: list[tuple[str, str]]) -> Any:
        name = getattr(comp, "name", None)
        if not isinstance(name, str) or not name:
            raise _Broken(f"it registered a {kind} without a string 'name': {comp!r}",
                          "give the class a class attribute name = '...'", offered)
        if kind != "preset":
            try:
                params_class(comp)
            except ConfigError:
                raise _Broken(f"{kind} {name!r} has no attrs 'Params' class",
                              "declare one (it may be empty): @attrs.frozen(kw_only=True) class Params: pass",
                              offered) from None
        if name in self._items[kind] or any(k == kind and c.name == name for k, c in found):
            holder = self._owner.get((kind, name), "itself")
            raise _Broken(f"it registers {kind} {name!r}, which plugin {holder!r} already registered",
                          f"rename its {kind}", offered)
        return comp

    def get(self, kind: str, name: str) -> Any:
        """The component ``name`` of ``kind``; a one-line error naming the broken plugin that offered
        it, or listing what exists."""
        try:
            return self._items[kind][name]
        except KeyError:
            pass
        for info in self.infos.values():
            if (kind, name) in info.components and info.status == "broken":
                raise PluginError(f"{kind} {name!r} comes from plugin {info.name!r}, which failed to load: "
                                  f"{info.reason}; {info.fix}")
        have = ", ".join(sorted(self._items[kind])) or "(none registered)"
        skipped = [f"{i.name!r} ({i.status})" for i in self.infos.values() if i.status != "loaded"]
        tail = f"; plugins not loaded: {', '.join(skipped)} (see 'gooddrag plugins')" if skipped else ""
        raise ConfigError(f"unknown {kind} {name!r}; available: {have}{tail}")

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> Iterable[tuple[str, Any]]:
        return sorted(self._items[kind].items())

    def owner(self, kind: str, name: str) -> str:
        return self._owner[(kind, name)]

    def broken(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "broken"]


def _names(kind: str, items: Iterable[Any]) -> list[tuple[str, str]]:
    return [(kind, n) for n in (getattr(c, "name", None) for c in items) if isinstance(n, str)]


#: plugin names the command line switched off (``--disable-plugin``), added to the environment's
_cli_disabled: frozenset[str] = frozenset()


def set_disabled(names: Iterable[str]) -> None:
    """Switch plugins off by name for this process's default registry (the CLI's --disable-plugin)."""
    global _cli_disabled
    _cli_disabled = frozenset(names)


def default_registry() -> Registry:
    """The process-wide registry over all installed plugins, minus disabled ones (built once per
    set of disabled names). Each broken plugin is reported once as a :class:`PluginWarning`."""
    return _registry_for(_cli_disabled | disabled_from_env())


@functools.lru_cache(maxsize=4)
def _registry_for(disabled: frozenset[str]) -> Registry:
    reg = Registry(make_plugin_manager(disabled=disabled))
    known = set(reg.infos)
    for name in sorted(disabled - known):
        warnings.warn(f"--disable-plugin {name}: no plugin of that name is installed; installed: "
                      f"{', '.join(sorted(known))}", PluginWarning, stacklevel=2)
    for info in reg.broken():
        warnings.warn(info.warning(), PluginWarning, stacklevel=2)
    return reg


default_registry.cache_clear = _registry_for.cache_clear  # type: ignore[attr-defined]
