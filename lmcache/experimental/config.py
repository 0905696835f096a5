"""The seed's ``lmcache.experimental.config``: see `lmcache.kernel.config` (the
configuration), `lmcache.kernel.metadata` and `lmcache.kernel.config_schema`."""

from lmcache.kernel.config import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    FLAT_BACKEND_OPTIONS,
    LEGACY_BACKENDS,
    ComponentSpec,
    ConfigError,
    ConfigIssue,
    LMCacheEngineConfig,
    env_overrides,
    format_loc,
)
from lmcache.kernel.config_schema import config_json_schema
from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "FLAT_BACKEND_OPTIONS",
    "LEGACY_BACKENDS",
    "ComponentSpec",
    "ConfigError",
    "ConfigIssue",
    "LMCacheEngineConfig",
    "LMCacheEngineMetadata",
    "config_json_schema",
    "env_overrides",
    "format_loc",
]
