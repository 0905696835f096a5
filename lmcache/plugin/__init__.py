"""Plugin machinery: the component registry, the options base and the pluggy hooks."""

import pluggy

#: Decorate hook implementations with this (``@hookimpl``).
hookimpl = pluggy.HookimplMarker("lmcache")

from lmcache.plugin.options import NoOptions, PluginOptions  # noqa: E402
from lmcache.plugin.registry import (  # noqa: E402
    KINDS,
    DuplicatePluginError,
    PluginError,
    PluginLoadError,
    UnknownPluginError,
)

__all__ = [
    "KINDS",
    "DuplicatePluginError",
    "NoOptions",
    "PluginError",
    "PluginLoadError",
    "PluginOptions",
    "UnknownPluginError",
    "hookimpl",
]
