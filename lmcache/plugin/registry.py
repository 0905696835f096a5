"""Component registry: entry points → classes, one lazy table per component kind.

Every component that the YAML configuration selects by name — allocator, GPU connector,
token database, storage backend, serde — is a class published as an entry point::

    [project.entry-points."lmcache.storage_backends"]
    "acme.s3" = "acme_lmcache.backend:S3Backend"

The entry-point name is the name used in YAML; the value is ``module:Class``. lmcache's
own components are entry points of the ``lmcache`` distribution and go through exactly
the same table. Listing names reads metadata only; a module is imported when its name
is selected (`Registry.load`), so a broken plugin only fails the configurations
that use it, and the error names its distribution.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache.plugin.options import NoOptions, PluginOptions

#: Component kind → entry-point group.
KINDS: dict[str, str] = {
    "allocator": "lmcache.allocators",
    "gpu_connector": "lmcache.gpu_connectors",
    "token_database": "lmcache.token_databases",
    "storage_backend": "lmcache.storage_backends",
    "serde": "lmcache.serdes",
}

#: Entry-point group of modules that hold pluggy hook implementations.
PLUGINS_GROUP = "lmcache.plugins"

#: The abstract base each kind's classes must derive from (imported only on load).
BASES: dict[str, str] = {
    "allocator": "lmcache.experimental.memory_management:MemoryAllocatorInterface",
    "gpu_connector": "lmcache.experimental.gpu_connector:GPUConnectorInterface",
    "token_database": "lmcache.experimental.token_database:TokenDatabase",
    "storage_backend":
        "lmcache.experimental.storage_backend.abstract_backend:StorageBackendInterface",
    "serde": "lmcache.experimental.storage_backend.serde:Serde",
}

RUNTIME_DISTRIBUTION = "<registered at runtime>"


class PluginError(Exception):
    """Base of the registry's errors."""


class UnknownPluginError(PluginError, LookupError):
    """No installed component of this kind has this name."""

    def __init__(self, kind: str, name: str, installed: list[str]):
        self.kind, self.name, self.installed = kind, name, installed
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.5)
        msg = f"unknown {kind} {name!r}; installed {kind}s: " + (
            ", ".join(installed) if installed else "(none)"
        )
        if close:
            msg += f"; did you mean {close[0]!r}?"
        super().__init__(msg)


class DuplicatePluginError(PluginError):
    """Two distributions publish the same name for one kind."""

    def __init__(self, kind: str, name: str, entries: list[PluginEntry]):
        self.kind, self.name, self.entries = kind, name, entries
        owners = " and ".join(f"{e.distribution} ({e.value})" for e in entries)
        super().__init__(
            f"{kind} name {name!r} is registered by more than one distribution: {owners}; "
            f"uninstall one of them"
        )


class PluginLoadError(PluginError, ImportError):
    """The selected plugin exists but its class cannot be imported or is not valid."""


@dataclass(frozen=True)
class PluginEntry:
    """One registered component: where it comes from and where its class lives."""

    kind: str
    name: str
    value: str
    dist_name: str
    dist_version: str = ""

    @property
    def distribution(self) -> str:
        return f"{self.dist_name} {self.dist_version}".strip()

    @property
    def group(self) -> str:
        return KINDS[self.kind]

    @property
    def first_party(self) -> bool:
        return _normalize(self.dist_name) == "lmcache"


def _normalize(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _import_object(value: str) -> Any:
    module_name, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module_name.strip())
    for part in attr.strip().split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _source_checkout_entry_points() -> dict[str, dict[str, str]] | None:
    """Entry points declared in the pyproject.toml of a source checkout, if we run from one.

    When ``lmcache`` is imported from a checkout (editable install or plain ``sys.path``),
    its pyproject.toml is the truth: installed metadata may be stale or missing.
    """
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return None
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    project = data.get("project", {})
    if project.get("name") != "lmcache":
        return None
    return {g: dict(eps) for g, eps in project.get("entry-points", {}).items()}


class Registry:
    """The table of installed components per kind, read from entry points on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, list[PluginEntry]]] | None = None
        self._runtime: dict[str, dict[str, PluginEntry]] = {k: {} for k in KINDS}
        self._runtime_objects: dict[tuple[str, str], Any] = {}
        self._loaded: dict[PluginEntry, type] = {}

    # -- discovery ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget what was discovered; the next query reads entry points again."""
        with self._lock:
            self._entries = None
            self._loaded.clear()

    def _discover(self) -> dict[str, dict[str, list[PluginEntry]]]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            table: dict[str, dict[str, list[PluginEntry]]] = {k: {} for k in KINDS}
            source = _source_checkout_entry_points()
            for kind, group in KINDS.items():
                for name, entry in self._group_entries(kind, group, source):
                    bucket = table[kind].setdefault(name, [])
                    # the same distribution seen twice on sys.path is one registration
                    if not any(_normalize(e.dist_name) == _normalize(entry.dist_name)
                               for e in bucket):
                        bucket.append(entry)
            self._entries = table
            return table

    @staticmethod
    def _group_entries(
        kind: str, group: str, source: dict[str, dict[str, str]] | None
    ) -> Iterable[tuple[str, PluginEntry]]:
        from lmcache import __version__

        if source is not None:
            for name, value in source.get(group, {}).items():
                yield name, PluginEntry(kind, name, value, "lmcache", __version__)
        for ep in md.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
            dist_version = dist.version if dist is not None else ""
            if source is not None and _normalize(dist_name) == "lmcache":
                continue
            yield ep.name, PluginEntry(kind, ep.name, ep.value, dist_name, dist_version)

    def register(self, kind: str, name: str, obj: type | str,
                 distribution: str = RUNTIME_DISTRIBUTION) -> PluginEntry:
        """Add a component at run time (from a ``lmcache_register_components`` hook or a test).

        ``obj`` is the class itself or a ``"module:Class"`` string.
        """
        self._check_kind(kind)
        value = obj if isinstance(obj, str) else f"{obj.__module__}:{obj.__qualname__}"
        entry = PluginEntry(kind, name, value, distribution)
        with self._lock:
            self._runtime[kind][name] = entry
            if not isinstance(obj, str):
                self._runtime_objects[(kind, name)] = obj
        return entry

    def unregister(self, kind: str, name: str) -> None:
        with self._lock:
            entry = self._runtime[kind].pop(name, None)
            self._runtime_objects.pop((kind, name), None)
            if entry is not None:
                self._loaded.pop(entry, None)

    # -- queries (no plugin code is imported) -------------------------------------------

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {sorted(KINDS)}")

    def _candidates(self, kind: str, name: str) -> list[PluginEntry]:
        self._check_kind(kind)
        found = list(self._discover()[kind].get(name, []))
        if name in self._runtime[kind]:
            found.append(self._runtime[kind][name])
        return found

    def names(self, kind: str) -> list[str]:
        """Sorted names installed for ``kind``."""
        self._check_kind(kind)
        return sorted(set(self._discover()[kind]) | set(self._runtime[kind]))

    def entries(self, kind: str | None = None) -> list[PluginEntry]:
        """Every registration (duplicates included), by kind then name."""
        kinds = [kind] if kind is not None else list(KINDS)
        out: list[PluginEntry] = []
        for k in kinds:
            for name in self.names(k):
                out.extend(self._candidates(k, name))
        return out

    def entry(self, kind: str, name: str) -> PluginEntry:
        """The one registration of ``name``; unknown and duplicate names are errors."""
        found = self._candidates(kind, name)
        if not found:
            raise UnknownPluginError(kind, name, self.names(kind))
        if len(found) > 1:
            raise DuplicatePluginError(kind, name, found)
        return found[0]

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return bool(self._candidates(kind, name))

    # -- loading -----------------------------------------------------------------------

    def load(self, kind: str, name: str) -> type:
        """Import and return the class registered as ``name`` for ``kind``."""
        entry = self.entry(kind, name)
        with self._lock:
            if entry in self._loaded:
                return self._loaded[entry]
        where = f"{kind} {name!r} ({entry.value}) from distribution {entry.distribution!r}"
        obj = self._runtime_objects.get((kind, name)) if entry.dist_name == RUNTIME_DISTRIBUTION \
            else None
        if obj is None:
            try:
                obj = _import_object(entry.value)
            except Exception as exc:
                raise PluginLoadError(
                    f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
        base = _import_object(BASES[kind])
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginLoadError(
                f"{where} must be a subclass of {base.__module__}.{base.__qualname__}, "
                f"got {obj!r}")
        options = getattr(obj, "Options", NoOptions)
        if not (isinstance(options, type) and issubclass(options, PluginOptions)):
            raise PluginLoadError(
                f"{where}: its Options must derive from lmcache.plugin.options.PluginOptions")
        if not callable(getattr(obj, "from_options", None)):
            raise PluginLoadError(f"{where} has no from_options() classmethod")
        with self._lock:
            self._loaded[entry] = obj
        return obj

    def options_model(self, kind: str, name: str) -> type[PluginOptions]:
        """The pydantic model that validates this component's YAML options."""
        return getattr(self.load(kind, name), "Options", NoOptions)

    def validate_options(self, kind: str, name: str, options: Mapping[str, Any]) -> PluginOptions:
        """Validate ``options``; raises pydantic's ValidationError on bad input."""
        return self.options_model(kind, name).model_validate(dict(options))

    def create(self, kind: str, name: str, options: Mapping[str, Any] | PluginOptions,
               config: Any, metadata: Any, **context: Any) -> Any:
        """Load, validate and build the component ``name`` of ``kind``."""
        cls = self.load(kind, name)
        if not isinstance(options, PluginOptions):
            options = self.validate_options(kind, name, options)
        return cls.from_options(options, config, metadata, **context)


def plugin_modules() -> list[tuple[str, str, str]]:
    """``(name, module, distribution)`` of every ``lmcache.plugins`` entry point."""
    out = []
    source = _source_checkout_entry_points()
    if source is not None:
        from lmcache import __version__

        for name, value in source.get(PLUGINS_GROUP, {}).items():
            out.append((name, value, f"lmcache {__version__}"))
    for ep in md.entry_points(group=PLUGINS_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
        if source is not None and _normalize(dist_name) == "lmcache":
            continue
        out.append((ep.name, ep.value, f"{dist_name} {dist.version if dist else ''}".strip()))
    return out


#: The process-wide registry.
registry = Registry()

__all__ = [
    "BASES",
    "KINDS",
    "PLUGINS_GROUP",
    "DuplicatePluginError",
    "PluginEntry",
    "PluginError",
    "PluginLoadError",
    "Registry",
    "UnknownPluginError",
    "plugin_modules",
    "registry",
]
