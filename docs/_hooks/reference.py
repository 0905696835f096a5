"""mkdocs hook: generate reference tables from the code, so the docs cannot drift.

A page that contains ``<!-- lmcache:config-fields -->`` gets a table of every field of
``LMCacheEngineConfig``; ``<!-- lmcache:plugin-options -->`` gets, for every first-party
component, a table of its options model; ``<!-- lmcache:options KIND NAME -->`` gets the
table of one installed component, whatever distribution ships it (``lmcache-redis``).
"""

from __future__ import annotations

import re
import typing
from typing import Any

CONFIG_MARK = "<!-- lmcache:config-fields -->"
OPTIONS_MARK = "<!-- lmcache:plugin-options -->"
ONE_OPTIONS_MARK = re.compile(r"<!-- lmcache:options (\w+) ([\w.-]+) -->")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is not None:
        text = str(annotation)
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("lmcache.kernel.config.", "")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(fields: dict[str, Any]) -> str:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in fields.items():
        if info.default_factory is not None:
            made = info.default_factory()
            default = f"`{made.name}`" if hasattr(made, "name") else _cell(made)
        elif info.is_required():
            default = "*required*"
        else:
            default = f"`{info.default!r}`"
        rows.append(f"| `{name}` | `{_cell(_type_name(info.annotation))}` | {default} | "
                    f"{_cell(info.description or '')} |")
    return "\n".join(rows)


def config_fields_table() -> str:
    from lmcache.experimental.config import LMCacheEngineConfig

    return _table(LMCacheEngineConfig.model_fields)


def plugin_options_tables() -> str:
    from lmcache.plugin.registry import KINDS, registry

    out = []
    for kind in KINDS:
        for entry in registry.entries(kind):
            if not entry.first_party:
                continue
            model = registry.options_model(kind, entry.name)
            out.append(f"### `{entry.name}` ({kind.replace('_', ' ')})\n")
            out.append(f"Class: `{entry.value.replace(':', '.')}`\n")
            out.append(_table(model.model_fields) if model.model_fields else "No options.")
            out.append("")
    return "\n".join(out)


def plugin_options_table(kind: str, name: str) -> str:
    """The options table of one component, or a note when it is not installed."""
    from lmcache.plugin.registry import PluginError, registry

    try:
        entry = registry.entry(kind, name)
        model = registry.options_model(kind, name)
    except PluginError as exc:
        return f"*The options table needs the component installed ({exc}).*"
    return (f"Class: `{entry.value.replace(':', '.')}` (distribution `{entry.dist_name}`)\n\n"
            + (_table(model.model_fields) if model.model_fields else "No options."))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = ONE_OPTIONS_MARK.sub(lambda m: plugin_options_table(m[1], m[2]), markdown)
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_fields_table())
    if OPTIONS_MARK in markdown:
        markdown = markdown.replace(OPTIONS_MARK, plugin_options_tables())
    return markdown
