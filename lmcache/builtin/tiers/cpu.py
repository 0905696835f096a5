"""``local_cpu``, the hot tier: chunks kept as memory objects in the engine's own allocator.

It is a `lmcache.abc.storage_backend.HotTier` (the storage manager asks it to
``evict_for`` memory when the allocator is full) and `SupportsPinning`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from pydantic import Field

from lmcache.abc.memory import MemoryObj
from lmcache.abc.storage_backend import StorageBackendInterface, TierContext
from lmcache.plugin.options import PluginOptions
from lmcache.utils import CacheEngineKey

EvictedCallback = Callable[[Sequence[CacheEngineKey], int], None]


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class LocalCPUBackend(StorageBackendInterface):
    """Chunks in CPU memory, least recently used first out.

    The tier holds one reference to each stored object; the memory itself belongs to
    the engine's allocator, so the tier's budget is the allocator's region (plus an
    optional smaller ``max_size_gb``). An object is evictable only while the tier's
    reference is its last one and it is not pinned: an object that a retrieve is
    copying out, that a lower tier is still writing, or that a caller pinned stays.
    Eviction happens when the budget is exceeded and when the storage manager cannot
    allocate (`evict_for`).
    """

    answers_from_memory = True

    class Options(PluginOptions):
        max_size_gb: float | None = Field(
            None, ge=0, description="Budget of the tier in GB; by default the whole "
            "allocator region (max_local_cpu_size).")

    def __init__(self, max_size_bytes: int | None = None,
                 on_evicted: EvictedCallback | None = None):
        self._max_bytes = max_size_bytes
        self._on_evicted = on_evicted
        self._lock = threading.Lock()
        self._objects: OrderedDict[CacheEngineKey, MemoryObj] = OrderedDict()
        self._bytes = 0

    @classmethod
    def from_options(cls, options: Options, config: Any, metadata: Any,
                     context: TierContext) -> LocalCPUBackend:
        gb = options.max_size_gb
        return cls(None if gb is None else int(gb * 1024**3), context.events.evicted)

    # -- the interface ---------------------------------------------------------------------

    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._objects

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return False  # puts complete before submit_put_task returns

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        evicted: list[tuple[CacheEngineKey, MemoryObj]] = []
        with self._lock:
            if key in self._objects:
                self._objects.move_to_end(key)
                return None
            memory_obj.ref_count_up()
            self._objects[key] = memory_obj
            self._bytes += memory_obj.metadata.phy_size
            if self._max_bytes is not None:
                while self._bytes > self._max_bytes:
                    victim = self._pop_evictable(exclude=key)
                    if victim is None:
                        break
                    evicted.append(victim)
        self._release(evicted)
        return _done(None)

    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        obj = self.get_blocking(key)
        return None if obj is None else _done(obj)

    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                return None
            self._objects.move_to_end(key)
            obj.ref_count_up()
            return obj

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            obj = self._objects.pop(key, None)
            if obj is None:
                return False
            self._bytes -= obj.metadata.phy_size
        obj.ref_count_down()
        return True

    def close(self) -> None:
        with self._lock:
            objects = list(self._objects.values())
            self._objects.clear()
            self._bytes = 0
        for obj in objects:
            obj.ref_count_down()

    # -- eviction and pinning --------------------------------------------------------------

    def _pop_evictable(self, exclude: CacheEngineKey | None = None
                       ) -> tuple[CacheEngineKey, MemoryObj] | None:
        # caller holds the lock; the first evictable entry is the least recently used one
        for key, obj in self._objects.items():
            if key != exclude and not obj.is_pinned and obj.get_ref_count() == 1:
                del self._objects[key]
                self._bytes -= obj.metadata.phy_size
                return key, obj
        return None

    def _release(self, evicted: list[tuple[CacheEngineKey, MemoryObj]]) -> None:
        if not evicted:
            return
        freed = sum(obj.get_size() for _, obj in evicted)
        for _, obj in evicted:
            obj.ref_count_down()
        if self._on_evicted is not None:
            self._on_evicted([k for k, _ in evicted], freed)

    def evict_for(self, nbytes: int) -> bool:
        """Evict least recently used chunks until about ``nbytes`` are freed.

        Returns False when nothing could be evicted (everything in use or pinned).
        """
        evicted: list[tuple[CacheEngineKey, MemoryObj]] = []
        freed = 0
        with self._lock:
            while freed < nbytes:
                victim = self._pop_evictable()
                if victim is None:
                    break
                evicted.append(victim)
                freed += victim[1].metadata.phy_size
        self._release(evicted)
        return bool(evicted)

    def pin(self, key: CacheEngineKey) -> bool:
        """Keep ``key`` from being evicted until `unpin`; returns whether it is here."""
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                return False
            obj.pin()
            return True

    def unpin(self, key: CacheEngineKey) -> bool:
        with self._lock:
            obj = self._objects.get(key)
            if obj is None or not obj.is_pinned:
                return False
        obj.unpin()
        return True

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._objects)
