"""Hook specifications: what a ``lmcache.plugins`` module can implement.

Components that the engine *calls* (allocators, connectors, token databases, storage
backends, serdes) are classes found through entry points and chosen by name in YAML:
see `lmcache.plugin.registry`. Hooks are for everything around them —
registering components at run time, looking at the configuration, following an
engine's life, and observing what happens to chunks. The engine calls hooks once per
operation on a batch of chunks, never per token, so an implementation may do modest
work (update a counter, record a latency) but must not block.

Every hook is called with keyword arguments. An implementation may accept any subset
of a hook's arguments, so new arguments can be added without breaking it. Hook
exceptions are not caught: an observer that raises stops the operation it observes —
except in a remote tier's own reports (`lmcache_storage_error` for its lookups, reads
and deletes, `lmcache_puts_dropped`, `lmcache_tier_availability_changed`), which are
logged instead, since a remote tier never raises to the serving engine.

Implement hooks in a module and publish it under the ``lmcache.plugins`` group::

    # acme_lmcache/hooks.py
    from lmcache.plugin import hookimpl

    @hookimpl
    def lmcache_chunks_stored(tier, keys, num_bytes):
        STORED_BYTES.labels(tier).inc(num_bytes)

    # pyproject.toml
    [project.entry-points."lmcache.plugins"]
    acme = "acme_lmcache.hooks"

Set ``LMCACHE_DISABLE_PLUGINS`` to a comma-separated list of entry-point names (or
``all``) to keep such modules from loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata
    from lmcache.plugin.registry import Registry
    from lmcache.utils import CacheEngineKey

hookspec = pluggy.HookspecMarker("lmcache")

# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


@hookspec
def lmcache_register_components(registry: Registry) -> None:
    """Register components that are not published as entry points.

    Called once, when the plugin manager is first created, after every
    ``lmcache.plugins`` module is loaded. Use it for components whose class is only
    known at run time (generated classes, test doubles)::

        @hookimpl
        def lmcache_register_components(registry):
            registry.register("storage_backend", "acme.tmp", TmpBackend, "acme-lmcache")

    A component registered here under a name that an installed distribution also
    publishes makes that name ambiguous: selecting it is a
    `DuplicatePluginError`.

    :param registry: the process-wide `Registry`.
    """


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@hookspec
def lmcache_configure(config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata) -> None:
    """See the validated configuration of an engine that is about to be built.

    Called by `LMCacheEngineBuilder` before
    any component is created. The configuration has passed validation, including every
    selected component's options. Treat it as read-only: to refuse a configuration,
    raise ``ValueError`` with a message that names the offending field.

    :param config: the engine's `LMCacheEngineConfig`.
    :param metadata: the model and worker the engine serves
        (`LMCacheEngineMetadata`).
    """


# ---------------------------------------------------------------------------------------
# Engine lifecycle
# ---------------------------------------------------------------------------------------


@hookspec
def lmcache_engine_started(
    engine_id: str, engine: Any, config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata
) -> None:
    """An engine was built and is ready to serve.

    :param engine_id: the instance id the engine was registered under.
    :param engine: the `LMCacheEngine`.
    :param config: its configuration.
    :param metadata: its model and worker description.
    """


@hookspec
def lmcache_engine_closing(engine_id: str, engine: Any) -> None:
    """An engine is about to close its storage tiers and release its memory.

    Called once per engine, before any tier is closed, so the engine can still be
    inspected (for example to record final statistics).

    :param engine_id: the instance id of the engine.
    :param engine: the `LMCacheEngine`.
    """


# ---------------------------------------------------------------------------------------
# Observation: what happens to chunks
# ---------------------------------------------------------------------------------------


@hookspec
def lmcache_chunks_stored(
    engine_id: str, tier: str, keys: Sequence[CacheEngineKey], num_tokens: int,
    num_bytes: int, duration_s: float,
) -> None:
    """Chunks were written to a tier and became visible there.

    Called once per store operation and tier. For tiers below the CPU, writes are
    asynchronous: the hook fires from the writer thread when the write completes, not
    when it was submitted.

    :param engine_id: the instance id of the engine.
    :param tier: the storage backend's name in the configuration (``local_cpu``,
        ``local_disk``, ...).
    :param keys: the keys of the chunks written.
    :param num_tokens: how many tokens the chunks hold together.
    :param num_bytes: payload bytes written.
    :param duration_s: wall time of the write, in seconds.
    """


@hookspec
def lmcache_chunks_retrieved(
    engine_id: str, tier: str, keys: Sequence[CacheEngineKey], num_tokens: int,
    num_bytes: int, duration_s: float,
) -> None:
    """Chunks were read from a tier to serve a retrieve (or a prefetch).

    :param engine_id: the instance id of the engine.
    :param tier: the tier the chunks came from.
    :param keys: the keys of the chunks read.
    :param num_tokens: how many tokens the chunks hold together.
    :param num_bytes: payload bytes read.
    :param duration_s: wall time of the read, in seconds.
    """


@hookspec
def lmcache_chunks_evicted(
    engine_id: str, tier: str, keys: Sequence[CacheEngineKey], num_bytes: int
) -> None:
    """Chunks were removed from a tier to make room (not by an explicit remove).

    :param engine_id: the instance id of the engine.
    :param tier: the tier that evicted them.
    :param keys: the keys of the evicted chunks.
    :param num_bytes: payload bytes freed.
    """


@hookspec
def lmcache_lookup_finished(
    engine_id: str, num_tokens: int, hit_tokens: int, duration_s: float, operation: str
) -> None:
    """A lookup or retrieve decided how much of a prompt's prefix is cached.

    Called once per `LMCacheEngine.lookup` and once per `LMCacheEngine.retrieve`;
    ``operation`` tells them apart, so that a serving engine that looks a prompt up
    and then retrieves it is not counted twice. A request is a hit when
    ``hit_tokens > 0``.

    :param engine_id: the instance id of the engine.
    :param num_tokens: tokens in the request (for a retrieve: from the first chunk
        the mask selects to the end of the prompt).
    :param hit_tokens: tokens of the contiguous cached prefix (for a retrieve: the
        tokens actually loaded).
    :param duration_s: wall time of the lookup, or of the whole retrieve including
        the loads, in seconds.
    :param operation: ``"lookup"`` or ``"retrieve"``.
    """


@hookspec
def lmcache_storage_error(
    engine_id: str, tier: str, operation: str, error: BaseException
) -> None:
    """A tier failed an operation and the engine turned the failure into a miss.

    Called for every such fault, even when the log shows only the first one: faults
    that a tier raises to the storage manager, failed asynchronous writes, and the
    failures that a remote tier turns into misses by itself (a lookup, read or delete
    that failed or timed out). While a remote tier is unavailable after a failure
    (see `lmcache_tier_availability_changed`) its operations are misses without being
    tried, and are not reported here; its puts are reported to
    `lmcache_puts_dropped`.

    With ``error_handling`` off, the hook is called before the fault is raised to the
    caller as a `StorageFault`.

    :param engine_id: the instance id of the engine.
    :param tier: the tier that failed.
    :param operation: ``"put"``, ``"get"``, ``"contains"`` or ``"remove"``.
    :param error: the exception the tier raised.
    """


@hookspec
def lmcache_puts_dropped(
    engine_id: str, tier: str, keys: Sequence[CacheEngineKey], num_bytes: int, reason: str
) -> None:
    """A tier declined to write chunks, by design rather than by failure.

    A remote tier drops a put instead of making the serving engine wait when the
    store is unavailable (in the back-off after a failure) or when
    ``max_pending_puts`` writes are already waiting. The chunks stay in the tiers
    above; they are just not written to this one. A write that was accepted and then
    failed (or found the store gone when its turn came) is a `lmcache_storage_error`
    with operation ``"put"``, not a drop.

    Called on the thread that stored, once per dropped chunk.

    :param engine_id: the instance id of the engine.
    :param tier: the tier that dropped the put.
    :param keys: the keys of the chunks not written.
    :param num_bytes: payload bytes not written.
    :param reason: ``"unavailable"`` (the store is in back-off after a failure) or
        ``"backlog"`` (too many writes pending).
    """


@hookspec
def lmcache_tier_availability_changed(
    engine_id: str, tier: str, available: bool, error: BaseException | None
) -> None:
    """A tier that can go away (a remote store) became unavailable or came back.

    Called with ``available=False`` when a call to the store fails or times out and
    the tier starts its back-off (one call per outage, not per failed call), and with
    ``available=True`` when the store answers again. Tiers start available; a tier
    that never fails never calls this hook.

    :param engine_id: the instance id of the engine.
    :param tier: the tier whose availability changed.
    :param available: whether the tier is tried again from now on.
    :param error: the failure that started the outage; ``None`` when it ends.
    """
