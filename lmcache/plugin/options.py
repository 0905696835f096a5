"""The options model every plugin class carries.

A component class found through an entry point (an allocator, a token database, a GPU
connector, a storage backend, a serde) declares what it accepts in YAML as a nested
``Options`` model derived from `PluginOptions`, and how it is built from those
options as a ``from_options`` classmethod::

    class MyBackend(StorageBackendInterface):
        class Options(PluginOptions):
            url: str
            timeout_s: float = 5.0

        @classmethod
        def from_options(cls, options, config, metadata, context):
            return cls(options.url, options.timeout_s, context.allocator_for(cls), ...)

This module imports nothing heavy (no torch), so configuration tooling can use it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PluginOptions(BaseModel):
    """Base of every plugin's options model: unknown keys are refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(PluginOptions):
    """The options model of a component that takes no options."""
