"""Engine configuration: the seed's flat fields plus components selected by plugin name.

One `LMCacheEngineConfig` describes an engine. It is built from keyword
arguments, a YAML file (`from_file`), ``LMCACHE_*``
environment variables (`from_env`) or the pre-experimental
``backend`` names (`from_legacy`). Every way ends in the same
validation, and every failure is a `ConfigError` that lists each problem with
where it is (the file or variable, and the path inside it, like
``storage_backends[1].max_size_gb``) and what was expected.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmcache.plugin.options import PluginOptions
from lmcache.plugin.registry import PluginError, registry

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration: where it is and what was expected."""

    loc: str
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}" if self.loc else self.message


class ConfigError(ValueError):
    """An invalid configuration. ``issues`` lists every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None,
                 origins: dict[str, str] | None = None):
        self.issues = list(issues)
        self.source = source
        self.origins = dict(origins or {})
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"invalid lmcache configuration{where}:"]
        for issue in self.issues:
            top = issue.loc.split(".")[0].split("[")[0]
            origin = self.origins.get(top)
            prefix = f"{origin}: " if origin else ""
            lines.append(f"  {prefix}{issue}")
        return "\n".join(lines)

    def with_source(self, source: str, origins: dict[str, str] | None = None) -> ConfigError:
        return ConfigError(self.issues, source, origins if origins is not None else self.origins)


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``('storage_backends', 1, 'max_size_gb')`` → ``storage_backends[1].max_size_gb``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _issues_from_pydantic(exc: ValidationError, prefix: tuple[int | str, ...] = (),
                          known: list[str] | None = None) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1]) if err["loc"] else ""
            msg = "unknown key"
            if known:
                close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
                msg += f" (did you mean {close[0]!r}?)" if close else \
                    f"; expected one of: {', '.join(known)}"
        elif err["type"] != "missing" and "input" in err:
            msg += f" (got {err['input']!r})"
        issues.append(ConfigIssue(format_loc(loc), msg))
    return issues


# ---------------------------------------------------------------------------------------
# Component selection
# ---------------------------------------------------------------------------------------


class ComponentSpec(BaseModel):
    """A component chosen by plugin name, with that plugin's options beside the name.

    In YAML either a bare name (``allocator: mixed``) or a mapping
    (``{name: local_disk, path: file:///var/cache/lmcache, max_size_gb: 50}``).
    The options are checked against the plugin's own ``Options`` model.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, description="The plugin's entry-point name.")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @classmethod
    def coerce(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def _spec(name: str, **options: Any) -> ComponentSpec:
    return ComponentSpec(name=name, **options)


# Flat seed fields that describe a storage tier's options: field → (backend, option).
FLAT_BACKEND_OPTIONS: dict[str, tuple[str, str]] = {
    "max_local_cpu_size": ("local_cpu", "max_size_gb"),
    "local_disk": ("local_disk", "path"),
    "max_local_disk_size": ("local_disk", "max_size_gb"),
    "remote_url": ("remote", "url"),
    "remote_serde": ("remote", "serde"),
    "blocking_timeout_secs": ("remote", "timeout_s"),
    "lookup_url": ("p2p", "lookup_url"),
    "distributed_url": ("p2p", "distributed_url"),
}


# ---------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------


class LMCacheEngineConfig(BaseModel):
    """The configuration of one `LMCacheEngine`.

    The flat fields are the seed's. Beside them, ``allocator``, ``token_database``,
    ``gpu_connector`` and ``storage_backends`` choose components by plugin name. The
    two describe the same engine: when ``storage_backends`` is not given it is derived
    from the flat fields (``local_cpu`` → ``local_cpu`` tier, ``local_disk`` →
    ``local_disk`` tier, ``remote_url`` → ``remote`` tier); when it is given, every flat
    field that was also set explicitly must agree with it, and flat fields that were
    not set are filled from it.

    The constructor also accepts the seed's fields positionally, in the seed's order.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    SEED_FIELDS: ClassVar[tuple[str, ...]] = (
        "chunk_size", "local_cpu", "max_local_cpu_size", "local_disk", "max_local_disk_size",
        "remote_url", "remote_serde", "save_decode_cache", "enable_blending",
        "blend_recompute_ratio", "blend_min_tokens", "enable_p2p", "lookup_url",
        "distributed_url", "error_handling",
    )

    chunk_size: int = Field(256, gt=0, description="Tokens per chunk; the unit of storage.")
    local_cpu: bool = Field(True, description="Keep chunks in the local CPU memory tier.")
    max_local_cpu_size: float = Field(
        5.0, gt=0, description="Size of the CPU memory tier and its allocator, in GB (GiB); "
        "every chunk in flight lives there, so it must be > 0.")
    local_disk: str | None = Field(
        None, description="Directory or fsspec URL of the disk tier (`file:///path`, "
        "`memory://x`, `s3://bucket/prefix`); null (or false) disables the tier.")
    max_local_disk_size: float = Field(
        0.0, ge=0, description="Budget of the disk tier in GB; least recently used chunks "
        "are evicted beyond it.")
    remote_url: str | None = Field(
        None, description="URL of the remote tier (`redis://host:port`, `s3://bucket`, "
        "`lm://host:port`); null disables it.")
    remote_serde: str | None = Field(
        "naive", description="Serde used to turn chunks into bytes for the remote tier "
        "(`naive`, `zstd`; `lmcache.serdes`).")
    blocking_timeout_secs: float = Field(
        10.0, gt=0, description="Longest wait for one call to the remote tier; a slower "
        "or unreachable store is a miss, never an error.")
    load_timeout_s: float | None = Field(
        2.0, gt=0, description="Longest the vLLM connector's loads may hold one step, in "
        "seconds; chunks not loaded by then are recomputed. None: no bound beyond the "
        "tiers' own.")
    save_decode_cache: bool = Field(
        False, description="Also store the KV of tokens generated during decoding.")
    enable_blending: bool = Field(
        False, description="CacheBlend: reuse non-prefix chunks. Not implemented: must be "
        "false.")
    blend_recompute_ratio: float = Field(
        0.15, ge=0, le=1, description="CacheBlend recompute ratio (unused while blending "
        "is off).")
    blend_min_tokens: int = Field(
        256, ge=0, description="CacheBlend minimum tokens (unused while blending is off).")
    enable_p2p: bool = Field(
        False, description="Peer-to-peer sharing: every instance serves its chunks to the "
        "others, found through the Redis index at `lookup_url` (the `p2p` tier).")
    lookup_url: str | None = Field(
        None, description="The Redis of the peer-to-peer index: `redis://host:port` or "
        "`host:port` (requires enable_p2p).")
    distributed_url: str | None = Field(
        None, description="`host:port` where this instance serves its chunks to its peers, "
        "and by which they reach it (requires enable_p2p).")
    error_handling: bool = Field(
        False, description="Turn storage faults into misses (logged once) instead of "
        "raising them.")

    allocator: ComponentSpec = Field(
        default_factory=lambda: _spec("mixed"),
        description="Where chunks live in memory (`lmcache.allocators`).")
    token_database: ComponentSpec = Field(
        default_factory=lambda: _spec("chunked"),
        description="How tokens become chunk keys (`lmcache.token_databases`).")
    gpu_connector: ComponentSpec | None = Field(
        None, description="How KV moves between the serving engine and chunks "
        "(`lmcache.gpu_connectors`); null lets the integration choose.")
    storage_backends: list[ComponentSpec] | None = Field(
        None, description="Storage tiers in search order (`lmcache.storage_backends`); "
        "null derives them from the flat fields.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self.SEED_FIELDS):
            raise TypeError(
                f"LMCacheEngineConfig takes at most {len(self.SEED_FIELDS)} positional "
                f"arguments ({', '.join(self.SEED_FIELDS)}), got {len(args)}")
        for name, value in zip(self.SEED_FIELDS, args):
            if name in kwargs:
                raise TypeError(f"LMCacheEngineConfig got multiple values for {name!r}")
            kwargs[name] = value
        try:
            super().__init__(**kwargs)
        except ValidationError as exc:
            raise ConfigError(_issues_from_pydantic(exc, known=list(type(self).model_fields))) \
                from None
        issues = self._check()
        if issues:
            raise ConfigError(issues)

    @field_validator("chunk_size", "blend_min_tokens", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected an integer, not a boolean")
        return value

    @field_validator("load_timeout_s", mode="before")
    @classmethod
    def _seconds_not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number of seconds (or null), not a boolean")
        return value

    @field_validator("local_disk", mode="before")
    @classmethod
    def _false_is_no_disk(cls, value: Any) -> Any:
        # the seed's callers spell "no disk tier" local_disk=False as well as None
        return None if value is False else value

    @field_validator("allocator", "token_database", "gpu_connector", mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return ComponentSpec.coerce(value)

    @field_validator("storage_backends", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [ComponentSpec.coerce(v) for v in value]
        return value

    @field_validator("remote_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("expected a URL of the form scheme://host[:port][/path]")
        return value

    @field_validator("lookup_url", "distributed_url")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        # LMCache's own configurations write these as host:port, without a scheme
        if value is not None:
            rest = value.split("://", 1)[-1]
            host, _, port = rest.rpartition(":")
            if not host or not port.split("/", 1)[0].isdigit():
                raise ValueError("expected host:port (or redis://host:port for lookup_url)")
        return value

    # -- consistency and plugin options -------------------------------------------------

    def _check(self) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        if self.enable_blending:
            issues.append(ConfigIssue("enable_blending", "is not implemented by this "
                                      "lmcache; expected false"))
        if self.storage_backends is None:
            for url in ("lookup_url", "distributed_url"):
                if self.enable_p2p and getattr(self, url) is None:
                    issues.append(ConfigIssue(url, "is required by enable_p2p; expected "
                                              "host:port"))
                elif getattr(self, url) is not None and not self.enable_p2p:
                    issues.append(ConfigIssue(url, "only used with enable_p2p; expected "
                                              "null, or enable_p2p: true"))
        if self.remote_serde is not None:
            try:
                registry.entry("serde", self.remote_serde)
            except PluginError as exc:
                issues.append(ConfigIssue("remote_serde", str(exc)))
        if self.local_disk is not None and self.max_local_disk_size <= 0 \
                and self.storage_backends is None:
            issues.append(ConfigIssue(
                "max_local_disk_size", "must be > 0 (GB) when local_disk is set"))

        selections: list[tuple[str, str, ComponentSpec]] = [
            ("allocator", "allocator", self.allocator),
            ("token_database", "token_database", self.token_database),
        ]
        if self.gpu_connector is not None:
            selections.append(("gpu_connector", "gpu_connector", self.gpu_connector))
        if self.storage_backends is not None:
            names = [s.name for s in self.storage_backends]
            for i, spec in enumerate(self.storage_backends):
                selections.append((f"storage_backends[{i}]", "storage_backend", spec))
                if names.index(spec.name) != i:
                    issues.append(ConfigIssue(
                        f"storage_backends[{i}].name",
                        f"tier {spec.name!r} is listed twice; expected each tier once"))
            issues.extend(self._check_flat_against_backends())
        for loc, kind, spec in selections:
            issues.extend(_check_component(loc, kind, spec))
        return issues

    def _check_flat_against_backends(self) -> list[ConfigIssue]:
        assert self.storage_backends is not None
        issues: list[ConfigIssue] = []
        explicit = frozenset(self.model_fields_set)  # before any flat field is filled
        by_name = {s.name: s for s in self.storage_backends}
        presence = {"local_cpu": "local_cpu", "local_disk": "local_disk",
                    "remote_url": "remote", "enable_p2p": "p2p"}
        for field, backend in presence.items():
            if field not in explicit:
                continue
            flat_on = bool(getattr(self, field))
            if flat_on != (backend in by_name):
                issues.append(ConfigIssue(field, (
                    f"is {getattr(self, field)!r} but storage_backends "
                    f"{'does not list' if flat_on else 'lists'} the {backend!r} tier; "
                    f"expected both to agree (or set only one of them)")))
        for field, (backend, option) in FLAT_BACKEND_OPTIONS.items():
            spec = by_name.get(backend)
            if spec is None or option not in spec.options:
                continue
            value = spec.options[option]
            if field in explicit and getattr(self, field) is not None:
                if _normalized(getattr(self, field)) != _normalized(value):
                    i = self.storage_backends.index(spec)
                    issues.append(ConfigIssue(field, (
                        f"is {getattr(self, field)!r} but storage_backends[{i}].{option} is "
                        f"{value!r}; expected both to agree (or set only one of them)")))
            elif field not in explicit:
                self._fill(field, value)
        if "local_cpu" not in explicit:
            self._fill("local_cpu", "local_cpu" in by_name)
        if "local_disk" not in explicit and "local_disk" not in by_name:
            self._fill("local_disk", None)
        if "remote_url" not in explicit and "remote" not in by_name:
            self._fill("remote_url", None)
        if "enable_p2p" not in explicit:
            self._fill("enable_p2p", "p2p" in by_name)
        return issues

    def _fill(self, field: str, value: Any) -> None:
        """Set a flat field from a selection (the consistency check above reads which
        fields were given from its snapshot, taken before any is filled)."""
        try:
            setattr(self, field, value)
        except ValidationError:
            pass  # the selection's own validation reports the bad value

    # -- derived views --------------------------------------------------------------------

    def storage_backend_specs(self) -> list[ComponentSpec]:
        """The storage tiers in search order, explicit or derived from the flat fields."""
        if self.storage_backends is not None:
            return list(self.storage_backends)
        specs = []
        if self.local_cpu:
            specs.append(_spec("local_cpu", max_size_gb=self.max_local_cpu_size))
        if self.local_disk is not None:
            specs.append(_spec("local_disk", path=self.local_disk,
                               max_size_gb=self.max_local_disk_size))
        if self.enable_p2p:  # peers before a remote store: a peer's CPU is nearer
            specs.append(_spec("p2p", lookup_url=self.lookup_url,
                               distributed_url=self.distributed_url))
        if self.remote_url is not None:
            remote: dict[str, Any] = {"url": self.remote_url,
                                      "timeout_s": self.blocking_timeout_secs}
            if self.remote_serde is not None:
                remote["serde"] = self.remote_serde
            specs.append(_spec("remote", **remote))
        return specs

    def component_options(self, kind: str, spec: ComponentSpec) -> PluginOptions:
        """The validated options model of a selected component."""
        return registry.validate_options(kind, spec.name, spec.options)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that `from_dict` turns back into an equal config."""
        return self.model_dump(mode="json", exclude_unset=False)

    # -- constructors (the seed's) ----------------------------------------------------------

    @staticmethod
    def from_defaults(
        chunk_size: int = 256,
        local_cpu: bool = True,
        max_local_cpu_size: float = 5.0,
        local_disk: str | bool | None = None,
        max_local_disk_size: int = 0,
        remote_url: str | None = "lm://localhost:65432",
        remote_serde: str | None = "naive",
        save_decode_cache: bool = False,
        enable_blending: bool = False,
        blend_recompute_ratio: float = 0.15,
        blend_min_tokens: int = 256,
        enable_p2p: bool = False,
        lookup_url: str | None = None,
        distributed_url: str | None = None,
        error_handling: bool = False,
    ) -> LMCacheEngineConfig:
        return LMCacheEngineConfig(
            chunk_size, local_cpu, max_local_cpu_size, local_disk, max_local_disk_size,
            remote_url, remote_serde, save_decode_cache, enable_blending,
            blend_recompute_ratio, blend_min_tokens, enable_p2p, lookup_url,
            distributed_url, error_handling)

    @staticmethod
    def from_dict(data: dict[str, Any], source: str | None = None) -> LMCacheEngineConfig:
        """Build from a mapping (a parsed YAML document); errors name ``source``."""
        if not isinstance(data, dict):
            raise ConfigError([ConfigIssue("", f"expected a mapping of fields at the top "
                                               f"level, got {type(data).__name__}")], source)
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError([ConfigIssue("", f"keys must be strings, got {bad_keys!r}")],
                              source)
        try:
            return LMCacheEngineConfig(**data)
        except ConfigError as exc:
            raise exc.with_source(source) if source else exc from None

    @staticmethod
    def from_file(file_path: str) -> LMCacheEngineConfig:
        """Load the config from a YAML file."""
        return LMCacheEngineConfig.from_dict(_read_yaml(file_path), str(file_path))

    @staticmethod
    def from_env() -> LMCacheEngineConfig:
        """Load the config from the environment.

        Starts from the YAML file named by ``LMCACHE_CONFIG_FILE`` if set, otherwise
        from the defaults of a local cache (CPU tier only, no remote), then overrides
        every field from its ``LMCACHE_<FIELD>`` variable (``LMCACHE_CHUNK_SIZE``,
        ``LMCACHE_LOCAL_DISK``, ``LMCACHE_STORAGE_BACKENDS`` as YAML ...). The literal
        values ``None`` and ``null`` clear an optional field.
        """
        data: dict[str, Any] = {}
        origins: dict[str, str] = {}
        source = None
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            data = _read_yaml(path)
            if not isinstance(data, dict):
                raise ConfigError([ConfigIssue("", "expected a mapping at the top level")], path)
            source = path
        overrides = env_overrides()
        for field, value in overrides.items():
            data[field] = value
            origins[field] = f"${ENV_PREFIX}{field.upper()}"
        try:
            return LMCacheEngineConfig(**data)
        except ConfigError as exc:
            raise exc.with_source(source or "the environment", origins) from None

    @staticmethod
    def from_legacy(
        chunk_size: int = 256,
        backend: str = "cpu",
        remote_url: str | None = "lm://localhost:65432",
        remote_serde: str = "naive",
        save_decode_cache: bool = False,
        enable_blending: bool = False,
        blend_recompute_ratio: float = 0.15,
        blend_min_tokens: int = 256,
        max_local_disk_size: float = 0.0,
        enable_p2p: bool = False,
        lookup_url: str | None = None,
        distributed_url: str | None = None,
        error_handling: bool = False,
    ) -> LMCacheEngineConfig:
        """Translate the pre-experimental ``backend`` names.

        ``backend`` is one of ``cpu``, ``local_disk``, ``local_cpu_disk``, ``remote``,
        ``local_cpu_remote``, ``local_disk_remote``, ``local_cpu_disk_remote``. The disk
        tier lives under ``$XDG_CACHE_HOME/lmcache/local_disk`` (``~/.cache`` when unset)
        and, when ``max_local_disk_size`` is 0, gets 5 GB.
        """
        tiers = LEGACY_BACKENDS.get(backend)
        if tiers is None:
            raise ConfigError([ConfigIssue("backend", (
                f"unknown legacy backend {backend!r}; expected one of "
                f"{', '.join(LEGACY_BACKENDS)}"))])
        cpu, disk, remote = tiers
        disk_path = str(_default_cache_dir() / "local_disk") if disk else None
        return LMCacheEngineConfig(
            chunk_size=chunk_size,
            local_cpu=cpu,
            max_local_cpu_size=5.0,
            local_disk=disk_path,
            max_local_disk_size=(max_local_disk_size or 5.0) if disk else max_local_disk_size,
            remote_url=remote_url if remote else None,
            remote_serde=remote_serde,
            save_decode_cache=save_decode_cache,
            enable_blending=enable_blending,
            blend_recompute_ratio=blend_recompute_ratio,
            blend_min_tokens=blend_min_tokens,
            enable_p2p=enable_p2p,
            lookup_url=lookup_url,
            distributed_url=distributed_url,
            error_handling=error_handling,
        )


#: Legacy backend name → (local CPU, local disk, remote).
LEGACY_BACKENDS: dict[str, tuple[bool, bool, bool]] = {
    "cpu": (True, False, False),
    "local_disk": (False, True, False),
    "local_cpu_disk": (True, True, False),
    "remote": (False, False, True),
    "local_cpu_remote": (True, False, True),
    "local_disk_remote": (False, True, True),
    "local_cpu_disk_remote": (True, True, True),
}


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache"


def _normalized(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("file://"):
        return os.path.normpath(value[len("file://"):])
    if isinstance(value, str) and value.startswith("/"):
        return os.path.normpath(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_component(loc: str, kind: str, spec: ComponentSpec) -> list[ConfigIssue]:
    try:
        model = registry.options_model(kind, spec.name)
    except PluginError as exc:
        return [ConfigIssue(f"{loc}.name", str(exc))]
    try:
        model.model_validate(spec.options)
    except ValidationError as exc:
        known = list(model.model_fields)
        return [ConfigIssue(f"{loc}.{i.loc}" if i.loc else loc,
                            f"{i.message} [{kind} {spec.name!r}]")
                for i in _issues_from_pydantic(exc, known=known)]
    return []


def _read_yaml(file_path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(file_path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the file: {exc.strerror or exc}")],
                          str(file_path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"{where}not valid YAML: {problem}")],
                          str(file_path)) from None
    return {} if data is None else data


_NULLS = {"none", "null", "~"}
_STRUCTURED = {"allocator", "token_database", "gpu_connector", "storage_backends"}


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The config fields set by ``LMCACHE_<FIELD>`` variables (unknown variables ignored)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for field in LMCacheEngineConfig.model_fields:
        raw = env.get(f"{ENV_PREFIX}{field.upper()}")
        if raw is None:
            continue
        if raw.strip().lower() in _NULLS:
            out[field] = None
        elif field in _STRUCTURED:
            try:
                out[field] = yaml.safe_load(raw)
            except yaml.YAMLError:
                out[field] = raw
        else:
            out[field] = raw.strip()
    return out

