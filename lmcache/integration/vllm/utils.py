"""What LMCache's and vLLM's published examples import from
``lmcache.integration.vllm.utils``.

The examples of both eras end with ``LMCacheEngineBuilder.destroy(ENGINE_NAME)``. The
engines of the vLLM integration are registered under per-rank instance ids and aliased
as `ENGINE_NAME` (`LMCacheEngineBuilder.add_alias`), so that call closes every engine
the current process made and does nothing in a process that made none -- such as the
example's own process when vLLM runs its workers in processes of their own.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcache.kernel.config import LMCacheEngineConfig

__all__ = ["ENGINE_NAME", "is_false", "lmcache_get_config", "lmcache_get_or_create_config"]

#: The name the examples destroy the vLLM integration's engines by (the seed's value).
ENGINE_NAME = "vllm-instance"

_config: LMCacheEngineConfig | None = None
_config_lock = threading.Lock()


def lmcache_get_or_create_config() -> LMCacheEngineConfig:
    """The configuration of the vLLM integration, read once per process (thread-safe):
    ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*`` variables, as the connector reads them
    (`lmcache.integration.vllm.vllm_v1_adapter.load_config`)."""
    global _config
    with _config_lock:
        if _config is None:
            from lmcache.integration.vllm.vllm_v1_adapter import load_config

            _config = load_config()
        return _config


#: The older examples' name of `lmcache_get_or_create_config`.
lmcache_get_config = lmcache_get_or_create_config


def is_false(value: str) -> bool:
    """Whether an environment variable's text means false (``false``, ``0``, ``no``,
    ``n``, ``off``, in any case)."""
    return value.strip().lower() in ("false", "0", "no", "n", "off")
