"""A storage tier that keeps copies of chunks in a dictionary of this process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import torch
from pydantic import Field

from lmcache.abc.memory import MemoryFormat
from lmcache.abc.storage_backend import StorageBackendInterface, TierContext, TierEvents
from lmcache.plugin.options import PluginOptions


# --8<-- [start:component]
class InMemoryBackend(StorageBackendInterface):
    """Chunks as bytes in an LRU dictionary; puts complete before they return."""

    class Options(PluginOptions):
        max_entries: int = Field(1024, gt=0, description="Chunks kept before LRU eviction.")

    def __init__(self, allocator: Any, max_entries: int = 1024,
                 events: TierEvents | None = None):
        self._allocator = allocator
        self._max_entries = max_entries
        self._events = events or TierEvents()  # evictions end in lmcache_chunks_evicted
        self._lock = threading.Lock()
        self._data: OrderedDict[Any, tuple[bytes, torch.Size, torch.dtype, MemoryFormat]] = \
            OrderedDict()

    @classmethod
    def from_options(cls, options: Options, config: Any, metadata: Any,
                     context: TierContext) -> InMemoryBackend:
        return cls(context.allocator_for(cls), options.max_entries, context.events)
    # --8<-- [end:component]

    def contains(self, key: Any) -> bool:
        with self._lock:
            return key in self._data

    def exists_in_put_tasks(self, key: Any) -> bool:
        return False  # puts are synchronous

    def submit_put_task(self, key: Any, memory_obj: Any) -> Future | None:
        record = (bytes(memory_obj.byte_array), memory_obj.get_shape(),
                  memory_obj.get_dtype(), memory_obj.get_memory_format())
        evicted = []
        with self._lock:
            self._data[key] = record
            self._data.move_to_end(key)
            while len(self._data) > self._max_entries:
                evicted.append(self._data.popitem(last=False))
        if evicted:
            self._events.evicted([k for k, _ in evicted], sum(len(r[0]) for _, r in evicted))
        done: Future = Future()
        done.set_result(None)
        return done

    def submit_prefetch_task(self, key: Any) -> Future | None:
        if not self.contains(key):
            return None
        done: Future = Future()
        done.set_result(self.get_blocking(key))
        return done

    def get_blocking(self, key: Any) -> Any:
        with self._lock:
            record = self._data.get(key)
            if record is not None:
                self._data.move_to_end(key)
        if record is None:
            return None
        payload, shape, dtype, fmt = record
        obj = self._allocator.allocate(shape, dtype, fmt)
        if obj is None:
            return None
        obj.byte_array[:] = payload
        return obj

    def remove(self, key: Any) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def close(self) -> None:
        with self._lock:
            self._data.clear()
