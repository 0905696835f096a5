"""The storage backend interface: one tier of the cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryObj
    from lmcache.utils import CacheEngineKey


class StorageBackendInterface(ABC):
    """One tier of the cache: a place where chunks (memory objects) are kept by key.

    The storage manager searches tiers in configuration order and writes to all of
    them. A backend must keep these promises:

    - **Visibility.** A chunk becomes visible to `contains` and
      `get_blocking` only once it is completely written. Until then,
      `exists_in_put_tasks` reports it.
    - **Integrity.** `get_blocking` returns exactly the bytes, shape, dtype and
      format that were put, or ``None``. A missing, truncated, corrupt or foreign
      object is a miss, never an exception and never wrong data.
    - **Ownership.** `submit_put_task` may keep a reference to the memory object
      (``ref_count_up``) until the write is done and must release it afterwards. An
      object returned by `get_blocking` belongs to the caller, who releases it
      with ``ref_count_down``.
    - **No blocking without a bound.** Calls return promptly; slow work runs on the
      backend's own threads, and anything that waits on a remote system has a timeout.
    - `close` waits for pending writes, then releases every resource.

    Backends are plugins (group ``lmcache.storage_backends``): a class with an
    ``Options`` model and a ``from_options`` classmethod.
    """

    @abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether the chunk is stored and completely written."""

    @abstractmethod
    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        """Whether a put of this chunk was submitted and has not finished yet."""

    @abstractmethod
    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        """Start storing ``memory_obj`` under ``key``; returns a future of the write, or
        ``None`` when the put was skipped (already stored or being stored)."""

    @abstractmethod
    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        """Start loading ``key`` into memory; returns a future of the memory object (or
        of ``None`` for a miss), or ``None`` when the key is not stored."""

    @abstractmethod
    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        """Load the chunk and return it as a memory object, or ``None`` on a miss."""

    @abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Remove the chunk; returns whether it was there."""

    @abstractmethod
    def close(self) -> None:
        """Finish pending writes and release every resource."""

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> StorageBackendInterface:
        """Build the backend from its validated plugin options (plugin protocol).

        ``context`` carries what the engine shares with its tiers, by keyword:
        ``memory_allocator`` (where `get_blocking` allocates the objects it
        returns) and ``tier_name`` (the name the backend was selected by), and
        observers that end in the hooks: ``on_evicted(keys, num_bytes)``
        (`lmcache_chunks_evicted`); for a tier that turns its own faults into misses,
        ``on_error(operation, exc)`` (`lmcache_storage_error`),
        ``on_dropped(keys, num_bytes, reason)`` (`lmcache_puts_dropped`) and
        ``on_availability(available, exc)`` (`lmcache_tier_availability_changed`).
        A backend ignores the keywords it has no use for.
        """
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")
