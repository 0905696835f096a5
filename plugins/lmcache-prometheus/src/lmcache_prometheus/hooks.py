"""lmcache hook implementations that feed the collectors (``lmcache.plugins``:
``prometheus``). Each hook takes only the arguments it needs, and only public ones."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lmcache.plugin import hookimpl
from lmcache_prometheus.metrics import METRICS, start_server_from_env

logger = logging.getLogger(__name__)


def _tier_names(config: Any) -> list[str]:
    try:
        return [spec.name for spec in config.storage_backend_specs()]
    except Exception as exc:  # an unusual config only costs the pre-created series
        logger.debug("lmcache-prometheus: no tier names from the configuration: %s", exc)
        return []


@hookimpl
def lmcache_engine_started(engine_id: str, config: Any) -> None:
    METRICS.engine_started(engine_id, _tier_names(config))
    start_server_from_env()


@hookimpl
def lmcache_engine_closing(engine_id: str) -> None:
    METRICS.engines_closed.inc()


@hookimpl
def lmcache_lookup_finished(engine_id: str, num_tokens: int, hit_tokens: int,
                            duration_s: float, operation: str) -> None:
    METRICS.request(engine_id, operation, num_tokens, hit_tokens, duration_s)


@hookimpl
def lmcache_chunks_stored(engine_id: str, tier: str, keys: Sequence, num_tokens: int,
                          num_bytes: int, duration_s: float) -> None:
    METRICS.stored(engine_id, tier, len(keys), num_tokens, num_bytes, duration_s)


@hookimpl
def lmcache_chunks_retrieved(engine_id: str, tier: str, keys: Sequence, num_tokens: int,
                             num_bytes: int, duration_s: float) -> None:
    METRICS.retrieved(engine_id, tier, len(keys), num_tokens, num_bytes, duration_s)


@hookimpl
def lmcache_chunks_evicted(engine_id: str, tier: str, keys: Sequence, num_bytes: int) -> None:
    METRICS.evicted(engine_id, tier, len(keys), num_bytes)


@hookimpl
def lmcache_storage_error(engine_id: str, tier: str, operation: str) -> None:
    METRICS.storage_error(engine_id, tier, operation)


@hookimpl
def lmcache_puts_dropped(engine_id: str, tier: str, keys: Sequence, reason: str) -> None:
    METRICS.puts_dropped(engine_id, tier, len(keys), reason)


@hookimpl
def lmcache_tier_availability_changed(engine_id: str, tier: str, available: bool) -> None:
    METRICS.availability(engine_id, tier, available)
