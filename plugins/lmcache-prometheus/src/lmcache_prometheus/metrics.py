"""The collectors, and the HTTP endpoint that exposes them.

One `Metrics` object per process (`METRICS`), registered in prometheus_client's
default registry, so that an application that already serves ``/metrics`` from that
registry (vLLM's API server does) serves lmcache's metrics too. Engines in the same
process share the collectors; the ``engine_id`` label tells them apart.

The endpoint is opt-in, configured by environment variables rather than lmcache's
configuration (this plugin adds nothing to the engine's schema):

``LMCACHE_PROMETHEUS_PORT``
    Port of a ``/metrics`` HTTP server, started once per process when the first engine
    starts. Unset or empty: no server. ``0`` picks a free port (see `server_address`).
``LMCACHE_PROMETHEUS_ADDR``
    Address it listens on; ``127.0.0.1`` unless set.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

logger = logging.getLogger(__name__)

PORT_ENV = "LMCACHE_PROMETHEUS_PORT"
ADDR_ENV = "LMCACHE_PROMETHEUS_ADDR"
DEFAULT_ADDR = "127.0.0.1"

#: Seconds. From a CPU-tier hit of one chunk (well under a millisecond) to a remote
#: store at its timeout.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Values of the ``operation`` label of the request metrics (`lmcache_lookup_finished`).
REQUEST_OPERATIONS = ("lookup", "retrieve")

_ENGINE = ("engine_id",)
_TIER = ("engine_id", "tier")


class Metrics:
    """Every collector of the plugin, and what each hook adds to them."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        self.registry = registry
        req = ("engine_id", "operation")
        self.hits = Counter("lmcache_hits", "Lookups or retrieves that found at least one "
                            "cached prefix token.", req, registry=None)
        self.misses = Counter("lmcache_misses", "Lookups or retrieves that found no cached "
                              "prefix token.", req, registry=None)
        self.requested_tokens = Counter("lmcache_requested_tokens", "Tokens asked for by "
                                        "lookups or retrieves.", req, registry=None)
        self.hit_tokens = Counter("lmcache_hit_tokens", "Tokens of the cached prefix found "
                                  "by lookups, or loaded by retrieves.", req, registry=None)
        self.lookup_duration = Histogram(
            "lmcache_lookup_duration_seconds", "Wall time of a lookup, or of a whole "
            "retrieve including its loads.", req, buckets=LATENCY_BUCKETS, registry=None)

        self.stored_chunks = Counter("lmcache_stored_chunks", "Chunks written to a tier.",
                                     _TIER, registry=None)
        self.stored_tokens = Counter("lmcache_stored_tokens", "Tokens in the chunks written "
                                     "to a tier.", _TIER, registry=None)
        self.stored_bytes = Counter("lmcache_stored_bytes", "Payload bytes written to a "
                                    "tier.", _TIER, registry=None)
        self.store_duration = Histogram(
            "lmcache_store_duration_seconds", "Wall time of a write to a tier: a whole store "
            "for the CPU tier, one chunk's write for the asynchronous tiers below it.",
            _TIER, buckets=LATENCY_BUCKETS, registry=None)

        self.retrieved_chunks = Counter("lmcache_retrieved_chunks", "Chunks read from a "
                                        "tier to serve a retrieve.", _TIER, registry=None)
        self.retrieved_tokens = Counter("lmcache_retrieved_tokens", "Tokens in the chunks "
                                        "read from a tier.", _TIER, registry=None)
        self.retrieved_bytes = Counter("lmcache_retrieved_bytes", "Payload bytes read from "
                                       "a tier.", _TIER, registry=None)
        self.retrieve_duration = Histogram(
            "lmcache_retrieve_duration_seconds", "Wall time of a retrieve that read chunks "
            "from a tier, per tier it read from.", _TIER, buckets=LATENCY_BUCKETS,
            registry=None)

        self.evicted_chunks = Counter("lmcache_evicted_chunks", "Chunks a tier evicted to "
                                      "make room.", _TIER, registry=None)
        self.evicted_bytes = Counter("lmcache_evicted_bytes", "Payload bytes a tier "
                                     "evicted to make room.", _TIER, registry=None)

        self.storage_errors = Counter(
            "lmcache_storage_errors", "Tier operations that failed and became misses.",
            ("engine_id", "tier", "operation"), registry=None)
        self.dropped_puts = Counter(
            "lmcache_dropped_puts", "Chunks a tier declined to write (remote store "
            "unavailable, or too many writes pending).", ("engine_id", "tier", "reason"),
            registry=None)
        self.tier_available = Gauge(
            "lmcache_tier_available", "1 while a tier is tried, 0 while it is in back-off "
            "after a failure.", _TIER, registry=None, multiprocess_mode="livemin")
        self.tier_outages = Counter("lmcache_tier_outages", "Times a tier became "
                                    "unavailable.", _TIER, registry=None)

        self.engines_started = Counter("lmcache_engines_started", "Engines built in this "
                                       "process.", (), registry=None)
        self.engines_closed = Counter("lmcache_engines_closed", "Engines closed in this "
                                      "process.", (), registry=None)
        if registry is not None:
            self._register(registry)

    def collectors(self) -> list:
        return [value for value in vars(self).values()
                if isinstance(value, (Counter, Gauge, Histogram))]

    def _register(self, registry: CollectorRegistry) -> None:
        # All or nothing: a name already taken (another copy of these collectors, or an
        # application's own) must neither break the engine nor leave half the metrics in
        # the shared registry. Then they live in a private registry of their own.
        done = []
        try:
            for collector in self.collectors():
                registry.register(collector)
                done.append(collector)
        except ValueError as exc:
            for collector in done:
                registry.unregister(collector)
            self.registry = CollectorRegistry()
            for collector in self.collectors():
                self.registry.register(collector)
            logger.warning("lmcache-prometheus: %s; lmcache's metrics are kept in a private "
                           "registry, served only by LMCACHE_PROMETHEUS_PORT", exc)

    # -- what the hooks report ---------------------------------------------------------

    def engine_started(self, engine_id: str, tiers: Iterable[str]) -> None:
        # Series exist (at 0) from the start, so rates and ratios are defined at once.
        self.engines_started.inc()
        for operation in REQUEST_OPERATIONS:
            for counter in (self.hits, self.misses, self.requested_tokens, self.hit_tokens):
                counter.labels(engine_id, operation)
        for tier in tiers:
            for counter in (self.stored_chunks, self.stored_tokens, self.stored_bytes,
                            self.retrieved_chunks, self.retrieved_tokens,
                            self.retrieved_bytes, self.evicted_chunks, self.evicted_bytes,
                            self.tier_outages):
                counter.labels(engine_id, tier)
            self.tier_available.labels(engine_id, tier).set(1)

    def request(self, engine_id: str, operation: str, num_tokens: int, hit_tokens: int,
                duration_s: float) -> None:
        (self.hits if hit_tokens > 0 else self.misses).labels(engine_id, operation).inc()
        self.requested_tokens.labels(engine_id, operation).inc(num_tokens)
        self.hit_tokens.labels(engine_id, operation).inc(hit_tokens)
        self.lookup_duration.labels(engine_id, operation).observe(duration_s)

    def stored(self, engine_id: str, tier: str, num_chunks: int, num_tokens: int,
               num_bytes: int, duration_s: float) -> None:
        self.stored_chunks.labels(engine_id, tier).inc(num_chunks)
        self.stored_tokens.labels(engine_id, tier).inc(num_tokens)
        self.stored_bytes.labels(engine_id, tier).inc(num_bytes)
        self.store_duration.labels(engine_id, tier).observe(duration_s)

    def retrieved(self, engine_id: str, tier: str, num_chunks: int, num_tokens: int,
                  num_bytes: int, duration_s: float) -> None:
        self.retrieved_chunks.labels(engine_id, tier).inc(num_chunks)
        self.retrieved_tokens.labels(engine_id, tier).inc(num_tokens)
        self.retrieved_bytes.labels(engine_id, tier).inc(num_bytes)
        self.retrieve_duration.labels(engine_id, tier).observe(duration_s)

    def evicted(self, engine_id: str, tier: str, num_chunks: int, num_bytes: int) -> None:
        self.evicted_chunks.labels(engine_id, tier).inc(num_chunks)
        self.evicted_bytes.labels(engine_id, tier).inc(num_bytes)

    def storage_error(self, engine_id: str, tier: str, operation: str) -> None:
        self.storage_errors.labels(engine_id, tier, operation).inc()

    def puts_dropped(self, engine_id: str, tier: str, num_chunks: int, reason: str) -> None:
        self.dropped_puts.labels(engine_id, tier, reason).inc(num_chunks)

    def availability(self, engine_id: str, tier: str, available: bool) -> None:
        self.tier_available.labels(engine_id, tier).set(1 if available else 0)
        if not available:
            self.tier_outages.labels(engine_id, tier).inc()


#: The process's collectors, in prometheus_client's default registry.
METRICS = Metrics()

# -- the endpoint ----------------------------------------------------------------------

_server_lock = threading.Lock()
_server = None
_server_tried = False


def start_server_from_env() -> None:
    """Start the HTTP endpoint if ``LMCACHE_PROMETHEUS_PORT`` asks for one and none was
    tried yet in this process. A port that cannot be bound is a warning, not an error:
    metrics must never stop an engine from serving."""
    global _server, _server_tried
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return
    with _server_lock:
        if _server_tried:
            return
        _server_tried = True
        addr = os.environ.get(ADDR_ENV, "").strip() or DEFAULT_ADDR
        try:
            port = int(raw)
            if not 0 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port")
        except ValueError as exc:
            logger.warning("lmcache-prometheus: %s=%r is not a port number (%s); no "
                           "metrics endpoint", PORT_ENV, raw, exc)
            return
        try:
            server, _thread = _start_http_server(port, addr, registry=METRICS.registry)
        except OSError as exc:
            logger.warning("lmcache-prometheus: cannot serve metrics on %s:%s (%s); no "
                           "metrics endpoint", addr, port, exc)
            return
        _server = server
    host, bound = server.server_address[:2]
    logger.info("lmcache-prometheus: metrics at http://%s:%s/metrics", host, bound)


def server_address() -> tuple[str, int] | None:
    """``(host, port)`` the endpoint listens on, or None when there is none."""
    with _server_lock:
        if _server is None:
            return None
        host, port = _server.server_address[:2]
        return host, port
