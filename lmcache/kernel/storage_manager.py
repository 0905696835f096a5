"""The storage manager: tiers in order, write-through puts, promotion, prefetch, faults.

It knows tiers only through the contract (`lmcache.abc.storage_backend`): which tier is
the hot one, and whether it can free memory, it asks with the `HotTier` protocol, so a
third party's hot tier gets promotion and eviction-on-allocation like ``local_cpu``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from lmcache.abc.memory import MemoryAllocatorInterface, MemoryFormat, MemoryObj
from lmcache.abc.storage_backend import (
    ChunkSpec,
    HotTier,
    StorageBackendInterface,
    TierContext,
    TierEvents,
)
from lmcache.plugin.manager import hooks
from lmcache.plugin.registry import registry
from lmcache.utils import CacheEngineKey, LogOnce, release_late_result

if TYPE_CHECKING:
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

logger = logging.getLogger(__name__)

#: The seed's name of the hot tier in ``search_range``; a tier may also be named there by
#: its backend's class name (the seed's ``LocalCPUBackend``, ``LocalDiskBackend``).
HOT_ALIAS = "Hot"
#: Where the search for a tier's class-name aliases stops in its MRO.
_NOT_ALIASES = (StorageBackendInterface, object)
#: Longest a retrieve waits for a chunk that a prefetch is already loading.
PREFETCH_WAIT_S = 30.0
#: Chunks `StorageManager.iter_get` reads ahead from the tiers below the hot tier.
READ_AHEAD = 3
#: Longest an allocation waits for writes to lower tiers to release memory.
WRITE_BACKPRESSURE_S = 10.0


class StorageFault(RuntimeError):
    """A tier failed an operation and ``error_handling`` is off."""


class _Search(Future):
    """The future of `StorageManager._search_below`: the chunk's memory object (or None
    for a miss), and in `tier` the tier it came from or whose exception it carries."""

    tier = ""


def _wait_s(bound: float, deadline: float | None) -> float:
    """The longest wait: ``bound``, or less when ``deadline`` (`time.monotonic`) comes
    first; never negative."""
    if deadline is None:
        return bound
    return max(0.0, min(bound, deadline - time.monotonic()))


class _ReclaimingAllocator(MemoryAllocatorInterface):
    """The engine's allocator as the tiers see it: a failed allocation first evicts
    least recently used chunks from the hot tier, then tries again."""

    def __init__(self, manager: StorageManager):
        self._manager = manager
        self._base = manager.allocator

    def allocate(self, shape: Any, dtype: Any, fmt: MemoryFormat = MemoryFormat.KV_BLOB
                 ) -> MemoryObj | None:
        return self._manager.allocate(shape, dtype, fmt)

    def free(self, memory_obj: MemoryObj) -> None:
        self._base.free(memory_obj)

    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        return self._base.get_ref_count(memory_obj)


class _HookEvents(TierEvents):
    """A tier's reports, forwarded to the hooks with the engine and tier they concern.
    Faults the tier turned into misses were logged by the tier itself, so they only go
    to the hooks here. An observer that raises is logged, never re-raised."""

    def __init__(self, engine_id: str, tier: str) -> None:
        self.engine_id = engine_id
        self.tier = tier

    def _call(self, hook: str, **kwargs: Any) -> None:
        try:
            getattr(hooks(), hook)(engine_id=self.engine_id, tier=self.tier, **kwargs)
        except Exception:
            logger.exception("a %s observer raised (tier %r)", hook, self.tier)

    def evicted(self, keys: Sequence[CacheEngineKey], num_bytes: int) -> None:
        self._call("lmcache_chunks_evicted", keys=list(keys), num_bytes=num_bytes)

    def error(self, operation: str, exc: BaseException) -> None:
        self._call("lmcache_storage_error", operation=operation, error=exc)

    def dropped(self, keys: Sequence[CacheEngineKey], num_bytes: int, reason: str) -> None:
        self._call("lmcache_puts_dropped", keys=list(keys), num_bytes=num_bytes,
                   reason=reason)

    def availability(self, available: bool, exc: BaseException | None) -> None:
        self._call("lmcache_tier_availability_changed", available=available, error=exc)


class StorageManager:
    """Owns the tiers of one engine and applies the storage semantics across them.

    - Tiers are searched in configuration order; a put goes to every tier
      (write-through), asynchronously for every tier below the CPU.
    - A hit below the hot tier (the first `HotTier`, normally ``local_cpu``) is promoted
      into it; when the allocator is full, the hot tier is asked to evict first.
    - A fault in a tier (an exception from a backend) is reported to the
      ``lmcache_storage_error`` hook; with ``error_handling`` it is logged once per tier
      and operation and becomes a miss, without it the exception propagates.
    """

    def __init__(self, allocator: MemoryAllocatorInterface, error_handling: bool = False,
                 engine_id: str = "lmcache", chunk_spec: ChunkSpec | None = None):
        self.allocator = allocator
        #: The chunks this engine stores; an object of another kind is never admitted.
        self.chunk_spec = chunk_spec
        self.error_handling = error_handling
        self.engine_id = engine_id
        self.tiers: dict[str, StorageBackendInterface] = {}
        self.hot_tier_name: str | None = None
        #: Objects tiers returned that were not this engine's chunks (see `_admit`).
        self.rejected = 0
        self.reclaiming_allocator = _ReclaimingAllocator(self)
        self._log_fault = LogOnce(logger)
        self._lock = threading.Lock()
        self._prefetching: dict[CacheEngineKey, Future] = {}
        self._pending_puts: dict[Future, None] = {}  # insertion order: oldest first

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                    allocator: MemoryAllocatorInterface, engine_id: str,
                    chunk_spec: ChunkSpec | None = None) -> StorageManager:
        manager = cls(allocator, config.error_handling, engine_id, chunk_spec)
        for spec in config.storage_backend_specs():
            try:
                backend = registry.create(
                    "storage_backend", spec.name, spec.options, config, metadata,
                    manager.tier_context(spec.name))
            except OSError as exc:  # a path that cannot be a cache directory, ...
                manager.close()
                options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
                raise ValueError(
                    f"cannot start storage tier {spec.name!r} ({options}): "
                    f"{type(exc).__name__}: {exc}; expected a location this process can "
                    f"create and write") from exc
            except BaseException:  # a missing plugin or module: release the tiers so far
                manager.close()
                raise
            manager.add_tier(spec.name, backend)
        return manager

    def tier_context(self, name: str) -> TierContext:
        """What the tier ``name`` of this engine is built with."""
        return TierContext(tier_name=name, memory_allocator=self.reclaiming_allocator,
                           events=_HookEvents(self.engine_id, name), engine_id=self.engine_id,
                           chunk_spec=self.chunk_spec, read_local=self._reader_above(name))

    def _reader_above(self, name: str) -> Callable[[CacheEngineKey], MemoryObj | None]:
        """``read_local`` of the tier ``name``: the tiers configured before it, in order;
        a chunk found is admitted (`_admit`), never promoted, and faults are misses."""
        def read(key: CacheEngineKey) -> MemoryObj | None:
            for other, tier in list(self.tiers.items()):
                if other == name:
                    break
                try:
                    obj = tier.get_blocking(key)  # answers a miss itself
                except Exception as exc:
                    self._report(other, "get", exc)
                    continue
                if obj is not None and self._admit(other, key, obj):
                    return obj
            return None
        return read

    def add_tier(self, name: str, backend: StorageBackendInterface) -> None:
        if name in self.tiers:
            raise ValueError(f"tier {name!r} is already configured")
        self.tiers[name] = backend
        if self.hot_tier_name is None and isinstance(backend, HotTier):
            self.hot_tier_name = name

    @property
    def memory_allocator(self) -> MemoryAllocatorInterface:
        """The seed's name of `allocator`."""
        return self.allocator

    @property
    def hot_tier(self) -> StorageBackendInterface | None:
        """The tier hits are promoted into (the first `HotTier`), or None."""
        return None if self.hot_tier_name is None else self.tiers[self.hot_tier_name]

    # -- faults ------------------------------------------------------------------------------

    def _report(self, tier: str, operation: str, exc: BaseException) -> None:
        """Tell the hooks about a fault and log the first of its kind."""
        hooks().lmcache_storage_error(engine_id=self.engine_id, tier=tier,
                                      operation=operation, error=exc)
        self._log_fault((tier, operation), "tier %r failed to %s (%s: %s)", tier, operation,
                        type(exc).__name__, exc)

    def _fault(self, tier: str, operation: str, exc: BaseException) -> None:
        """A fault on the caller's thread: a miss with ``error_handling``, else raised."""
        if not self.error_handling:
            hooks().lmcache_storage_error(engine_id=self.engine_id, tier=tier,
                                          operation=operation, error=exc)
            raise StorageFault(f"tier {tier!r} failed to {operation}: "
                               f"{type(exc).__name__}: {exc}") from exc
        self._report(tier, operation, exc)

    def _tiers_in(self, search_range: Sequence[str] | str | None) -> list[tuple[str, Any]]:
        if search_range is None:
            return list(self.tiers.items())
        if isinstance(search_range, str):  # the seed's callers pass one name bare
            search_range = [search_range]
        aliases: dict[str, set[str]] = {}
        for name, tier in self.tiers.items():
            # a tier answers to its class's name and its bases' (the seed's
            # ``RemoteBackend`` for every tier built on the remote kit)
            for cls in type(tier).__mro__:
                if cls in _NOT_ALIASES:
                    break
                aliases.setdefault(cls.__name__, set()).add(name)
        if self.hot_tier_name is not None:
            aliases[HOT_ALIAS] = {self.hot_tier_name}
        wanted: set[str] = set()
        unknown = []
        for n in search_range:
            if n in self.tiers:
                wanted.add(n)
            elif n in aliases:
                wanted |= aliases[n]
            else:
                unknown.append(n)
        if unknown:
            raise ValueError(f"search_range names unknown tiers {sorted(unknown)}; "
                             f"configured tiers: {list(self.tiers)}")
        return [(n, t) for n, t in self.tiers.items() if n in wanted]

    # -- memory --------------------------------------------------------------------------------

    def allocate(self, shape: Any, dtype: torch.dtype | None,
                 fmt: MemoryFormat = MemoryFormat.KV_BLOB) -> MemoryObj | None:
        """Allocate, evicting least recently used hot-tier chunks if memory is full."""
        obj = self.allocator.allocate(shape, dtype, fmt)
        hot = self.hot_tier
        itemsize = dtype.itemsize if dtype is not None else 1
        nbytes = int(torch.Size(shape).numel()) * itemsize
        deadline = time.monotonic() + WRITE_BACKPRESSURE_S
        while obj is None:
            if hot is not None and hot.evict_for(nbytes):  # type: ignore[attr-defined]
                pass
            elif not self._wait_for_one_put(deadline - time.monotonic()):
                return None  # everything is in use or pinned
            obj = self.allocator.allocate(shape, dtype, fmt)
        return obj

    def _wait_for_one_put(self, timeout: float) -> bool:
        # Memory held by writes to lower tiers comes back when they finish: wait for the
        # oldest one rather than dropping the chunk (backpressure from slow tiers).
        with self._lock:
            pending = next(iter(self._pending_puts), None)
        if pending is None or timeout <= 0:
            return False
        try:
            pending.result(timeout=timeout)
        except FutureTimeout:
            return False
        except Exception:
            pass
        return True

    # -- operations --------------------------------------------------------------------------

    def contains(self, key: CacheEngineKey,
                 search_range: Sequence[str] | str | None = None) -> bool:
        for name, tier in self._tiers_in(search_range):
            try:
                if tier.contains(key):
                    return True
            except Exception as exc:
                self._fault(name, "contains", exc)
        return False

    def is_stored_or_storing(self, key: CacheEngineKey) -> bool:
        """Whether a store of ``key`` can be skipped: a tier that answers from memory
        (`StorageBackendInterface.answers_from_memory`: the hot tier, the disk tier's
        index) holds it, or a tier is writing it. Other tiers are not asked: on a
        remote store that is a round trip per chunk on the serving engine's save path.
        A chunk only they hold is stored again; each tier skips a put of a chunk it
        knows it holds."""
        for name, tier in self.tiers.items():
            try:
                if tier.exists_in_put_tasks(key) or (
                        tier.answers_from_memory and tier.contains(key)):
                    return True
            except Exception as exc:
                self._fault(name, "contains", exc)
        return False

    def put(self, key: CacheEngineKey, memory_obj: MemoryObj, num_tokens: int
            ) -> tuple[list[str], bool]:
        """Write ``memory_obj`` to every tier; the caller keeps its own reference.

        Returns the tiers that stored it before returning (the caller reports those in
        one ``lmcache_chunks_stored`` call per operation; writes still in flight report
        themselves when they finish), and whether a tier below the hot one took the write
        (done or in flight): whether the chunk outlives its eviction from the hot tier.
        """
        done_now = []
        below = False
        for name, tier in self.tiers.items():
            started = time.perf_counter()
            try:
                future = tier.submit_put_task(key, memory_obj)
            except Exception as exc:
                self._fault(name, "put", exc)
                continue
            if future is None:
                continue
            below = below or name != self.hot_tier_name
            if future.done() and future.exception() is None:
                done_now.append(name)
                continue
            with self._lock:
                self._pending_puts[future] = None
            future.add_done_callback(self._put_done(name, key, num_tokens,
                                                    memory_obj.get_size(), started))
        return done_now, below

    def _put_done(self, tier: str, key: CacheEngineKey, num_tokens: int, num_bytes: int,
                  started: float) -> Callable[[Future], None]:
        def done(future: Future) -> None:
            with self._lock:
                self._pending_puts.pop(future, None)
            exc = future.exception()
            if exc is not None:
                self._report(tier, "put", exc)  # no caller left to raise to
                return
            hooks().lmcache_chunks_stored(
                engine_id=self.engine_id, tier=tier, keys=[key], num_tokens=num_tokens,
                num_bytes=num_bytes, duration_s=time.perf_counter() - started)
        return done

    def get(self, key: CacheEngineKey, search_range: Sequence[str] | None = None,
            deadline: float | None = None) -> tuple[MemoryObj, str] | None:
        """The chunk and the tier it came from, or None. The caller owns one reference.

        With a ``deadline`` (a `time.monotonic` value), every wait ends by then and a
        chunk that has not arrived is a miss: the hot tier is read as always (its chunks
        are in memory), the tiers below it only while time remains, through their
        prefetch (`_search_below`), never their blocking get; what arrives late is
        released.
        """
        pending = self._prefetching.get(key)
        if pending is not None:
            try:
                pending.result(timeout=_wait_s(PREFETCH_WAIT_S, deadline))
            except Exception:  # a failed or slow prefetch is just not there
                pass
        tiers = self._tiers_in(search_range)
        if deadline is not None:
            return self._get_by(key, tiers, deadline)
        for name, tier in tiers:
            found = self._get_now(name, tier, key)
            if found is not None:
                return found
        return None

    def _get_now(self, name: str, tier: StorageBackendInterface, key: CacheEngineKey
                 ) -> tuple[MemoryObj, str] | None:
        """``key`` from ``tier`` by its blocking get (admitted, promoted), or None. The
        get answers a miss itself: no `contains` first (a second round trip to a remote
        store)."""
        try:
            obj = tier.get_blocking(key)
        except Exception as exc:
            self._fault(name, "get", exc)
            return None
        if obj is None or not self._admit(name, key, obj):
            return None
        if name != self.hot_tier_name and self.hot_tier is not None:
            self._promote(key, obj)
        return obj, name

    def _get_hot(self, key: CacheEngineKey, tiers: list[tuple[str, Any]]
                 ) -> tuple[MemoryObj, str] | None:
        """``key`` from the hot tier, if it is among ``tiers`` (a read of memory)."""
        for name, tier in tiers:
            if name == self.hot_tier_name:
                return self._get_now(name, tier, key)
        return None

    def _get_by(self, key: CacheEngineKey, tiers: list[tuple[str, Any]], deadline: float
                ) -> tuple[MemoryObj, str] | None:
        """`get` under a deadline: the hot tier, then the tiers below it while time
        remains."""
        found = self._get_hot(key, tiers)
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0 or not any(name != self.hot_tier_name for name, _ in tiers):
            return None
        search = self._search_below(key, tiers)
        return self._take(key, search, "", deadline)

    def _take(self, key: CacheEngineKey, future: Future, source: str,
              deadline: float | None) -> tuple[MemoryObj, str] | None:
        """What a load's ``future`` (from ``source``, or a `_Search`) brought, admitted
        and promoted, waited for at most `PREFETCH_WAIT_S` and until ``deadline``. A
        load that is not done by then is left to finish on its own: what it brings
        then is released. Reaching the deadline is a miss; reaching the last-resort
        bound, or a load that failed, is a fault of the tier."""
        wait = _wait_s(PREFETCH_WAIT_S, deadline)
        try:  # tiers bound their own loads; PREFETCH_WAIT_S is the last resort
            obj = future.result(timeout=wait)
        except FutureTimeout as exc:
            future.add_done_callback(release_late_result)
            if wait >= PREFETCH_WAIT_S:
                self._fault(getattr(future, "tier", "") or source, "get", exc)
            return None
        except Exception as exc:
            self._fault(getattr(future, "tier", "") or source, "get", exc)
            return None
        if isinstance(future, _Search):
            source = future.tier  # the search admitted it already
        elif obj is not None and not self._admit(source, key, obj):
            obj = None
        if obj is None:
            return None
        if source != self.hot_tier_name and self.hot_tier is not None:
            self._promote(key, obj)
        return obj, source

    def _search_below(self, key: CacheEngineKey, tiers: list[tuple[str, Any]]) -> _Search:
        """Load ``key`` from the first of ``tiers`` below the hot tier that holds it,
        without a thread of its own: each tier's prefetch is asked (it returns at once;
        the load runs on the tier's threads, which bound it), and when it brings a miss
        (``None``) or an object that is not this engine's chunk, the next tier is asked
        from the callback. A caller with a deadline waits on the returned future for no
        longer than it has. A tier's exception ends the search with it when
        ``error_handling`` is off (the caller raises it), else it is reported and the
        next tier is asked."""
        search = _Search()
        search.set_running_or_notify_cancel()
        below = [(name, tier) for name, tier in tiers if name != self.hot_tier_name]

        def failed(name: str, exc: BaseException) -> bool:
            """Whether the search goes on after ``exc`` from tier ``name``."""
            if not self.error_handling:
                search.tier = name
                search.set_exception(exc)
                return False
            self._report(name, "get", exc)
            return True

        def ask(i: int) -> None:
            while i < len(below):
                name, tier = below[i]
                search.tier = name  # the tier a wait that ends too soon is blamed on
                try:
                    future = tier.submit_prefetch_task(key)  # None: not stored
                except Exception as exc:
                    if not failed(name, exc):
                        return
                    i += 1
                    continue
                if future is not None:
                    future.add_done_callback(lambda done, i=i: landed(done, i))
                    return
                i += 1
            search.set_result(None)

        def landed(done: Future, i: int) -> None:
            name = below[i][0]
            try:
                obj = done.result()
            except Exception as exc:
                if failed(name, exc):
                    ask(i + 1)
                return
            if obj is not None and self._admit(name, key, obj):
                search.tier = name
                search.set_result(obj)
                return
            ask(i + 1)

        ask(0)
        return search

    def _admit(self, tier: str, key: CacheEngineKey, obj: MemoryObj) -> bool:
        """Whether ``obj``, found for ``key`` in ``tier``, is one of this engine's chunks;
        one that is not (a tier that does not check its objects) is released and is a
        miss: never promoted, never loaded."""
        spec = self.chunk_spec
        if spec is None or spec.admits(obj.get_memory_format(), obj.get_dtype(),
                                       obj.get_shape()):
            return True
        obj.ref_count_down()
        self.rejected += 1
        self._log_fault((tier, "admit"), "tier %r returned %s for %s, not one of this "
                        "engine's chunks (%s); treated as a miss", tier,
                        f"a {obj.get_memory_format().name} {obj.get_dtype()} object of shape "
                        f"{tuple(obj.get_shape())}", key, spec)
        return False

    def iter_get(self, keys: Sequence[CacheEngineKey],
                 search_range: Sequence[str] | None = None,
                 read_ahead: int = READ_AHEAD, deadline: float | None = None
                 ) -> Iterator[tuple[MemoryObj, str] | None]:
        """`get` for a run of keys, reading up to ``read_ahead`` chunks ahead from the
        tiers below the hot tier, so that loading chunk i+1 overlaps the caller's work on
        chunk i. Yields what `get` returns, in order. Close the iterator (or let it end)
        when stopping early: chunks read ahead and not taken are released then.

        With a ``deadline`` (a `time.monotonic` value) no wait lasts beyond it: a chunk
        below the hot tier that has not arrived by then is None, and so is every later
        one that the hot tier does not hold (nothing more is asked of the tiers below
        it); a chunk that arrived in time is yielded even when the caller comes to it
        after the deadline, and so is every chunk of the hot tier. What arrives late is
        released.

        Below the hot tier every chunk is asked of each tier once, through its prefetch
        (`_search_below`), never ``contains`` first: the prefetch answers a miss itself,
        and no tier's call holds the caller's thread.
        """
        tiers = self._tiers_in(search_range)
        pending: deque[tuple[CacheEngineKey, Future | None, str]] = deque()
        upcoming = iter(keys)
        has_below = any(name != self.hot_tier_name for name, _ in tiers)

        def launch() -> None:
            key = next(upcoming, None)
            if key is None:
                return
            future, source = None, ""
            hot = self.hot_tier
            if (hot is not None and hot.contains(key)) or key in self._prefetching:
                pass
            elif has_below and (deadline is None or deadline > time.monotonic()):
                # every tier below, in order, each asked once (its prefetch answers a
                # miss itself); the caller's thread never waits for a tier here
                future = self._search_below(key, tiers)
            pending.append((key, future, source))

        try:
            for _ in range(max(1, read_ahead)):
                launch()
            while pending:
                key, future, source = pending.popleft()
                launch()
                if future is None:
                    yield self.get(key, search_range, deadline)
                    continue
                found = self._take(key, future, source, deadline)
                if found is None:
                    # the tiers below were asked (or time is up): only the hot tier,
                    # which a prefetch may have filled meanwhile, is asked again
                    found = self._get_hot(key, tiers)
                yield found
        finally:
            for _, future, _ in pending:  # read ahead, never taken: released when done
                if future is not None:
                    future.add_done_callback(release_late_result)

    def _promote(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        try:
            self.hot_tier.submit_put_task(key, obj)  # type: ignore[union-attr]
        except Exception as exc:
            self._fault(self.hot_tier_name or "", "put", exc)

    def prefetch(self, key: CacheEngineKey) -> bool:
        """Start moving ``key`` into the hot tier; returns whether the hot tier holds it
        or a load started (a tier that must ask a remote store may find a miss then)."""
        hot = self.hot_tier
        if hot is not None and hot.contains(key):
            return True
        if key in self._prefetching:
            return True
        for name, tier in self.tiers.items():
            if name == self.hot_tier_name:
                continue
            try:
                future = tier.submit_prefetch_task(key)  # None: not stored
            except Exception as exc:
                self._fault(name, "get", exc)
                continue
            if future is None:
                continue
            with self._lock:
                self._prefetching[key] = future
            future.add_done_callback(self._prefetched(key, name))
            return True
        return False

    def _prefetched(self, key: CacheEngineKey, tier: str) -> Callable[[Future], None]:
        def done(future: Future) -> None:
            try:
                exc = future.exception()
                obj = None if exc is not None else future.result()
                if exc is not None:
                    self._report(tier, "get", exc)
                if obj is not None and self._admit(tier, key, obj):
                    if self.hot_tier is not None:
                        self._promote(key, obj)
                    obj.ref_count_down()
            finally:
                with self._lock:
                    self._prefetching.pop(key, None)
        return done

    def remove(self, key: CacheEngineKey) -> bool:
        found = False
        for name, tier in self.tiers.items():
            try:
                found = tier.remove(key) or found
            except Exception as exc:
                self._fault(name, "remove", exc)
        return found

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every put submitted so far is written (or failed)."""
        with self._lock:
            pending = list(self._pending_puts)
        for future in pending:
            try:
                future.result(timeout=timeout)
            except Exception:
                pass  # reported by the done callback

    def wait_for_prefetches(self, timeout: float | None = None) -> None:
        for future in list(self._prefetching.values()):
            try:
                future.result(timeout=timeout)
            except Exception:
                pass

    def close(self) -> None:
        """Finish pending prefetches and writes, then close every tier, lowest first."""
        self.wait_for_prefetches(PREFETCH_WAIT_S)
        for name, tier in reversed(list(self.tiers.items())):
            try:
                tier.close()
            except Exception as exc:  # closing must release the rest regardless
                logger.error("closing tier %r failed: %s", name, exc)
