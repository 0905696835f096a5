"""The storage backend contract: one tier of the cache.

Who calls what
    The storage manager owns the tiers of one engine and is their only caller. It builds
    each tier once with `StorageBackendInterface.from_options` and a `TierContext`, then
    calls the methods below from the serving engine's thread (``contains``,
    ``submit_put_task``, ``get_blocking``, ``submit_prefetch_task``, ``remove``) and, for
    ``close``, from whichever thread closes the engine. A tier's own threads (writers,
    readers) run the slow work; the futures it returns complete on those threads.

Optional capabilities
    Small protocols the storage manager checks with ``isinstance``, so that a third
    party's tier gets the same treatment as lmcache's own:

    * `HotTier` -- the tier holds chunks in the engine's own memory: hits in lower tiers
      are promoted into it, and when the allocator runs out the manager asks it to
      ``evict_for`` the bytes it needs (the first such tier in search order is *the* hot
      tier);
    * `SupportsPinning` -- chunks can be protected from eviction by key.

lmcache's tiers (``local_cpu``, ``local_disk``, ``remote``) are in
`lmcache.builtin.tiers`; the remote kit that a store-specific tier builds on is
`lmcache.kits.remote`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from lmcache.abc.memory import MemoryFormat

if TYPE_CHECKING:
    from lmcache.abc.gpu_connector import GPUConnectorInterface
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata
    from lmcache.utils import CacheEngineKey

__all__ = [
    "ChunkSpec",
    "HotTier",
    "StorageBackendInterface",
    "SupportsPinning",
    "TierContext",
    "TierEvents",
]


class TierEvents:
    """Where a tier reports what happens to it; each report ends in a plugin hook.

    The storage manager gives every tier an instance that forwards to the hooks named
    below; this base class drops every report (a tier used on its own). Reports may come
    from any of the tier's threads. Implementations never raise: a report must not turn
    a write or a miss into an exception on the serving path.
    """

    def evicted(self, keys: Sequence[CacheEngineKey], num_bytes: int) -> None:
        """Chunks left the tier to make room (``lmcache_chunks_evicted``)."""

    def error(self, operation: str, exc: BaseException) -> None:
        """A fault the tier turned into a miss itself (``lmcache_storage_error``);
        ``operation`` is ``contains``, ``get`` or ``remove``."""

    def dropped(self, keys: Sequence[CacheEngineKey], num_bytes: int, reason: str) -> None:
        """Puts the tier did not write (``lmcache_puts_dropped``); ``reason`` is
        ``unavailable`` or ``backlog``."""

    def availability(self, available: bool, exc: BaseException | None) -> None:
        """The store went down (``available=False`` with the fault) or came back
        (``lmcache_tier_availability_changed``)."""


@dataclass(frozen=True)
class ChunkSpec:
    """The memory objects an engine stores, so that a tier admits nothing else.

    An object read back from a tier is this engine's chunk only if its format is
    ``fmt``, its dtype ``dtype`` and its shape one of ``shapes`` (one per number of
    tokens a chunk can hold, 1 to ``chunk_size``). Anything else -- the chunk of a
    deployment with another KV dtype or layout, a byte buffer, a header crafted to
    announce a huge payload -- is a miss, decided on the header before any memory is
    allocated for the payload. `max_payload_bytes` bounds what a tier reads from outside.
    """

    fmt: MemoryFormat
    dtype: torch.dtype
    shapes: frozenset[tuple[int, ...]]

    def admits(self, fmt: MemoryFormat, dtype: torch.dtype | None,
               shape: Sequence[int]) -> bool:
        """Whether an object of ``fmt``, ``dtype`` and ``shape`` is one of these chunks."""
        return fmt == self.fmt and dtype == self.dtype and tuple(shape) in self.shapes

    @property
    def max_payload_bytes(self) -> int:
        """The payload of the largest chunk, in bytes."""
        return max(prod(s) for s in self.shapes) * self.dtype.itemsize

    @classmethod
    def for_connector(cls, connector: GPUConnectorInterface, chunk_size: int,
                      dtype: torch.dtype) -> ChunkSpec:
        """The KV_BLOB chunks ``connector`` fills, in ``dtype``, of 1 to ``chunk_size``
        tokens (its ``get_shape``)."""
        return cls(MemoryFormat.KV_BLOB, dtype, frozenset(
            tuple(connector.get_shape(n)) for n in range(1, chunk_size + 1)))

    def __str__(self) -> str:
        largest = max(self.shapes, key=prod)
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.fmt.name} {dtype} of shape {largest} (or fewer tokens)"


@dataclass(frozen=True)
class TierContext:
    """What the engine shares with each tier it builds.

    ``tier_name``
        The name the tier was selected by (for log messages and hooks).
    ``memory_allocator``
        Where `StorageBackendInterface.get_blocking` and prefetches allocate the objects
        they return. The storage manager's allocator evicts from the hot tier and waits
        for pending writes before it answers ``None``. A tier that returns the objects
        it holds (the hot tier itself) may ignore it.
    ``events``
        Where the tier reports evictions, faults it handles itself, dropped puts and
        outages (see `TierEvents`).
    ``engine_id``
        The engine the tier belongs to.
    ``chunk_spec``
        The chunks the engine stores (`ChunkSpec`): a tier admits nothing else from its
        storage, and reads no more bytes than the largest can need. ``None`` outside an
        engine: any well-formed object stored under the key is admitted.
    ``read_local``
        ``read_local(key)``: the chunk from this engine's tiers *before* this one (a new
        reference the caller releases), or ``None``; nothing is promoted. For a tier that
        serves this engine's chunks to others (``p2p``). ``None`` outside an engine.
    """

    tier_name: str = ""
    memory_allocator: MemoryAllocatorInterface | None = None
    events: TierEvents = field(default_factory=TierEvents)
    engine_id: str = "lmcache"
    chunk_spec: ChunkSpec | None = None
    read_local: Callable[[CacheEngineKey], MemoryObj | None] | None = None

    def allocator_for(self, component: type) -> MemoryAllocatorInterface:
        """The allocator, or a ``ValueError`` naming ``component`` when there is none."""
        if self.memory_allocator is None:
            raise ValueError(f"{component.__name__} needs the engine's memory allocator "
                             "(TierContext.memory_allocator)")
        return self.memory_allocator


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

    #: Whether `contains` answers from this process's memory (or a local file), never
    #: from a remote store. The engine asks such tiers before it stores a chunk, to skip
    #: chunks they hold; it never asks the others on the save path (a round trip per
    #: chunk), so a chunk only they hold is stored again and their put skips what they
    #: know they hold. Class attribute; False unless a tier says otherwise.
    answers_from_memory: bool = False

    @abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether the chunk is stored and completely written.

        Called on the serving engine's thread for every chunk of a ``lookup`` (also from
        the vLLM scheduler's lookup channel), so it answers from memory where it can;
        a tier that must ask a remote store bounds the wait and answers ``False`` when
        the store does not answer in time.
        """

    @abstractmethod
    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        """Whether a put of this chunk was submitted and has not finished yet.

        Called before every store of a chunk, on the serving engine's thread; never does
        I/O.
        """

    @abstractmethod
    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        """Start storing ``memory_obj`` under ``key``; returns a future of the write, or
        ``None`` when the put was skipped (already stored or being stored).

        Called on the serving engine's thread right after the chunk was copied out of
        its KV cache: it returns at once (the hot tier may complete the put before it
        returns) and never raises for a store that is full or down -- it skips or
        drops the put instead.
        """

    @abstractmethod
    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        """Start loading ``key`` into memory; returns a future of the memory object (or
        of ``None`` for a miss), or ``None`` when the key is not stored.

        Called on the serving engine's thread (``prefetch``, and the read-ahead of
        ``retrieve``); the load runs on the tier's threads, allocating from
        `TierContext.memory_allocator`. The future does not fail for a bad or missing
        object: it carries ``None``.
        """

    @abstractmethod
    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        """Load the chunk and return it as a memory object, or ``None`` on a miss.

        Called on the serving engine's thread during ``retrieve``: bounded in time, and
        what it returns has exactly the shape, dtype and format that were put.
        """

    @abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Remove the chunk; returns whether it was there."""

    @abstractmethod
    def close(self) -> None:
        """Finish pending writes and release every resource.

        Called once when the engine closes, lowest tier first, from the thread that
        closes it; the tier's threads are stopped when it returns. Idempotent.
        """

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata,
                     context: TierContext) -> StorageBackendInterface:
        """Build the backend from its validated plugin options (plugin protocol).

        ``context`` is what the engine shares with its tiers (`TierContext`): the tier's
        name, the allocator for the objects `get_blocking` returns, and where to report
        evictions, faults, dropped puts and outages. ``config`` and ``metadata`` may be
        ``None`` when a backend is built outside an engine (tests, tools).
        """
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")


@runtime_checkable
class HotTier(Protocol):
    """A tier that keeps chunks in the engine's own memory (the allocator's region).

    The storage manager promotes hits from lower tiers into the first such tier, reads
    ahead only from the tiers below it, and, when an allocation fails, asks it to free
    memory before it waits for pending writes or gives up.
    """

    def evict_for(self, nbytes: int) -> bool:
        """Evict least recently used chunks until about ``nbytes`` are freed; False when
        nothing could be evicted (everything in use or pinned). Called on the thread
        that allocates; never blocks on I/O."""


@runtime_checkable
class SupportsPinning(Protocol):
    """A tier whose chunks can be protected from eviction by key."""

    def pin(self, key: CacheEngineKey) -> bool:
        """Keep ``key`` from being evicted until `unpin`; returns whether it is here."""

    def unpin(self, key: CacheEngineKey) -> bool:
        """Undo one `pin`; returns whether ``key`` was here and pinned."""
