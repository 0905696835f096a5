"""The pluggy plugin manager: hook modules from ``lmcache.plugins`` entry points."""

from __future__ import annotations

import importlib
import os
import threading

import pluggy

from lmcache.plugin import hookspecs
from lmcache.plugin.registry import PluginLoadError, plugin_modules, registry

PROJECT = "lmcache"
DISABLE_ENV = "LMCACHE_DISABLE_PLUGINS"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def _disabled() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created (and hook modules loaded) on first use."""
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        disabled = _disabled()
        for name, value, distribution in plugin_modules():
            if "all" in disabled or name in disabled:
                pm.set_blocked(name)
                continue
            try:
                module = importlib.import_module(value.partition(":")[0].strip())
            except Exception as exc:
                raise PluginLoadError(
                    f"cannot load hook plugin {name!r} ({value}) from distribution "
                    f"{distribution!r}: {type(exc).__name__}: {exc}; set {DISABLE_ENV}={name} "
                    f"to skip it") from exc
            pm.register(module, name=name)
        pm.check_pending()
        pm.hook.lmcache_register_components(registry=registry)
        _manager = pm
        return pm


def reset_plugin_manager() -> None:
    """Forget the manager; the next `get_plugin_manager` builds a new one (tests)."""
    global _manager
    with _lock:
        _manager = None


def hooks() -> pluggy.HookRelay:
    """Shortcut for ``get_plugin_manager().hook``."""
    return get_plugin_manager().hook
