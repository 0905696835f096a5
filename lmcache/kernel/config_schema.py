"""The JSON schema of the configuration, with every installed plugin's options."""

from __future__ import annotations

from typing import Any

from lmcache.kernel.config import LMCacheEngineConfig
from lmcache.plugin.registry import KINDS, PluginError, registry

__all__ = ["config_json_schema"]


def config_json_schema() -> dict[str, Any]:
    """JSON schema of the configuration, with every installed plugin's options.

    Each component field accepts a bare name or a mapping; the mapping's schema is a
    ``oneOf`` over the installed plugins of that kind, each with ``name`` fixed. Plugins
    that fail to load are left out (``lmcache plugins list`` shows why).
    """
    schema = LMCacheEngineConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for kind in KINDS:
        variants = []
        for name in registry.names(kind):
            try:
                options = registry.options_model(kind, name).model_json_schema()
            except PluginError:
                continue
            for key, sub in options.pop("$defs", {}).items():
                defs.setdefault(key, sub)
            options.setdefault("properties", {})
            options["properties"] = {"name": {"const": name}, **options["properties"]}
            options["required"] = ["name", *options.get("required", [])]
            options["title"] = f"{kind} {name}"
            options["additionalProperties"] = False
            variants.append(options)
        defs[f"{kind}_selection"] = {
            "title": f"{kind} selection",
            "oneOf": [{"type": "string", "enum": registry.names(kind)}, *variants],
        }
    props = schema["properties"]
    for field in ("allocator", "token_database"):
        props[field] = {**_doc(props[field]), "$ref": f"#/$defs/{field}_selection"}
    props["gpu_connector"] = {**_doc(props["gpu_connector"]), "anyOf": [
        {"$ref": "#/$defs/gpu_connector_selection"}, {"type": "null"}]}
    props["storage_backends"] = {**_doc(props["storage_backends"]), "anyOf": [
        {"type": "array", "items": {"$ref": "#/$defs/storage_backend_selection"}},
        {"type": "null"}]}
    return schema


def _doc(prop: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prop.items() if k in ("description", "title", "default")}

