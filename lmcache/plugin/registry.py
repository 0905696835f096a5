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

URL schemes
    A storage backend that serves a scheme of ``remote_url`` claims it in the group
    ``lmcache.url_schemes``: the entry-point name is the scheme, the value the backend's
    ``module:Class`` (the same string as its ``lmcache.storage_backends`` entry)::

        [project.entry-points."lmcache.url_schemes"]
        acme = "acme_lmcache.backend:AcmeBackend"

    The ``remote`` tier then builds that backend for ``acme://...`` URLs
    (`Registry.backend_for_scheme`); two distributions claiming one scheme is an error
    naming both. Resolving a scheme reads metadata only.
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

#: Entry-point group of remote URL schemes: scheme → ``module:Class`` of the storage
#: backend that serves it.
URL_SCHEMES_GROUP = "lmcache.url_schemes"
#: The registry's table of URL schemes (not a component kind: nothing is built from it).
URL_SCHEME = "url_scheme"

#: Every table the registry reads: the component kinds, and the URL schemes.
TABLES: dict[str, str] = {**KINDS, URL_SCHEME: URL_SCHEMES_GROUP}

#: The abstract base each kind's classes must derive from (imported only on load).
BASES: dict[str, str] = {
    "allocator": "lmcache.abc.memory:MemoryAllocatorInterface",
    "gpu_connector": "lmcache.abc.gpu_connector:GPUConnectorInterface",
    "token_database": "lmcache.abc.token_database:TokenDatabase",
    "storage_backend": "lmcache.abc.storage_backend:StorageBackendInterface",
    "serde": "lmcache.abc.serde:Serde",
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
        return TABLES[self.kind]

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
        self._runtime: dict[str, dict[str, PluginEntry]] = {k: {} for k in TABLES}
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
            table: dict[str, dict[str, list[PluginEntry]]] = {k: {} for k in TABLES}
            source = _source_checkout_entry_points()
            for kind, group in TABLES.items():
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

        ``obj`` is the class itself or a ``"module:Class"`` string. With ``kind``
        ``"url_scheme"``, ``name`` is a URL scheme and ``obj`` the storage backend that
        serves it.
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
        if kind not in TABLES:
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
        """Every registration (duplicates included), by kind then name; all component
        kinds when ``kind`` is None (the URL schemes only when asked for by name)."""
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

    def backend_for_scheme(self, scheme: str) -> str | None:
        """The name of the storage backend that claims the URL scheme ``scheme``, or None
        when no distribution claims it.

        :raises DuplicatePluginError: two distributions claim the scheme.
        :raises PluginLoadError: the claimed class is not a registered storage backend.
        """
        scheme = scheme.lower()
        if not self._candidates(URL_SCHEME, scheme):
            return None
        claim = self.entry(URL_SCHEME, scheme)
        backends = [e for e in self.entries("storage_backend") if e.value == claim.value]
        if not backends:
            raise PluginLoadError(
                f"URL scheme {scheme!r} is claimed by distribution {claim.distribution!r} "
                f"for {claim.value}, which is not a registered storage backend; expected "
                f"the same module:Class as one of its lmcache.storage_backends entries")
        return backends[0].name

    # -- loading -----------------------------------------------------------------------

    def load(self, kind: str, name: str) -> type:
        """Import and return the class registered as ``name`` for ``kind``."""
        if kind not in BASES:
            raise ValueError(f"{kind!r} entries are not components; expected one of "
                             f"{sorted(KINDS)}")
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
               config: Any, metadata: Any, context: Any = None) -> Any:
        """Load, validate and build the component ``name`` of ``kind``.

        ``context`` is what the kind's ``from_options`` receives besides options, config
        and metadata: a `lmcache.abc.storage_backend.TierContext` for a storage backend
        (required), a `lmcache.abc.gpu_connector.ConnectorContext` for a GPU connector
        (optional); the other kinds take none.
        """
        if kind == "storage_backend" and context is None:
            raise ValueError(f"storage backend {name!r} is built with a TierContext "
                             "(lmcache.abc.storage_backend); got context=None")
        cls = self.load(kind, name)
        if not isinstance(options, PluginOptions):
            options = self.validate_options(kind, name, options)
        if context is None:
            return cls.from_options(options, config, metadata)
        return cls.from_options(options, config, metadata, context=context)


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
    "TABLES",
    "URL_SCHEMES_GROUP",
    "URL_SCHEME",
    "DuplicatePluginError",
    "PluginEntry",
    "PluginError",
    "PluginLoadError",
    "Registry",
    "UnknownPluginError",
    "plugin_modules",
    "registry",
]
