"""What the cache server keeps: values in lmcache's own tiers.

A value is whatever a client's serde made of a chunk (the self-describing object of
`lmcache.kits.object_format`); the server never decodes it. It lives

* in memory: one memory object (``uint8``, format ``BINARY``) from a `HostMemoryAllocator`
  whose region is the CPU budget, held by a `LocalCPUBackend` in least recently used
  order. When the region is full, the least recently used values that nobody is reading
  are evicted until the new one fits; a value that is being sent is never evicted;
* optionally on disk: a `LocalDiskBackend` with its own budget, written through
  (asynchronously) on every put. It rebuilds its index from its directory at start, so a
  restarted server finds its chunks again; a value found only on disk is read back into
  memory by the GET that asks for it.

Names
    A request's key is ``<namespace>/<chunk key string>``: the namespace of the client's
    tier (``[A-Za-z0-9_.-]``, at most 64 characters, possibly empty) and a key in the
    canonical form of `CacheEngineKey.from_string`. Anything else is refused. Inside the
    server (and in the disk tier's file names) the namespace is folded into the key's
    model name, ``<namespace>|<model>``, so that namespaces never share values.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lmcache.abc.memory import MemoryFormat, MemoryObj
from lmcache.builtin.allocators.region import HostMemoryAllocator
from lmcache.builtin.tiers.cpu import LocalCPUBackend
from lmcache.builtin.tiers.disk.tier import LocalDiskBackend
from lmcache.utils import CacheEngineKey

__all__ = ["BadName", "ChunkStore", "parse_name"]

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{0,64}")
GiB = 1024**3


class BadName(ValueError):
    """A request's key is not ``<namespace>/<chunk key>``."""


def parse_name(name: bytes) -> CacheEngineKey:
    """The server's key for the request key ``name`` (see the module documentation)."""
    try:
        text = name.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise BadName("the key is not UTF-8") from None
    namespace, slash, key_string = text.partition("/")
    if not slash or not _NAMESPACE.fullmatch(namespace):
        raise BadName(f"expected '<namespace>/<chunk key>' with a namespace of at most 64 "
                      f"characters of [A-Za-z0-9_.-], got {text[:200]!r}")
    try:
        key = CacheEngineKey.from_string(key_string)
    except ValueError as exc:
        raise BadName(str(exc)[:300]) from None
    return CacheEngineKey(key.fmt, f"{namespace}|{key.model_name}", key.world_size,
                          key.worker_id, key.chunk_hash)


class _EvictingAllocator(HostMemoryAllocator):
    """The server's region, evicting least recently used values when it is full."""

    def __init__(self, size: int, cpu: LocalCPUBackend, *,
                 prefault: bool | str = False) -> None:
        super().__init__(size, prefault=prefault)
        self.cpu = cpu

    def allocate(self, shape: Any, dtype: torch.dtype | None,
                 fmt: MemoryFormat = MemoryFormat.UNDEFINED) -> MemoryObj | None:
        need = max(int(torch.Size(shape).numel()) * (dtype.itemsize if dtype else 1), 1)
        while True:
            obj = super().allocate(shape, dtype, fmt)
            if obj is not None:
                return obj
            # freed space may not be contiguous: evict until it fits or nothing is left
            if not self.cpu.evict_for(need):
                return None


class ChunkStore:
    """Values by key in a CPU budget (LRU) and, optionally, a disk tier.

    Thread-safe: the server calls it from every connection's thread.
    """

    def __init__(self, cpu_bytes: int, disk_path: str | None = None, disk_bytes: int = 0,
                 *, prefault: bool | str = False) -> None:
        if cpu_bytes <= 0:
            raise ValueError(f"the CPU budget must be > 0 bytes, got {cpu_bytes}")
        if disk_path is not None and disk_bytes <= 0:
            raise ValueError(f"the disk budget must be > 0 bytes, got {disk_bytes}")
        self.cpu = LocalCPUBackend(None, on_evicted=self._on_evicted)
        self.memory = _EvictingAllocator(cpu_bytes, self.cpu, prefault=prefault)
        self.disk = (None if disk_path is None else LocalDiskBackend(
            disk_path, self.memory, disk_bytes / GiB, tier_name="server-disk"))
        self._lock = threading.Lock()  # a put replaces a value atomically
        self._counts = {"hits": 0, "misses": 0, "puts": 0, "deletes": 0, "evicted": 0,
                        "no_space": 0, "disk_hits": 0}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _on_evicted(self, keys: Any, num_bytes: int) -> None:
        self._count("evicted", len(keys))

    # -- the operations --------------------------------------------------------------------

    def put(self, key: CacheEngineKey, length: int,
            fill: Callable[[memoryview], None]) -> bool:
        """Store a value of ``length`` bytes that ``fill`` writes into the memory it is
        given (the payload, received straight into it). Returns False, without calling
        ``fill``, when the CPU budget cannot hold it (even after evicting everything
        that is not in use). The value becomes visible only once ``fill`` returned; if
        it raises, nothing is stored."""
        obj = self.memory.allocate((length,), torch.uint8, MemoryFormat.BINARY)
        if obj is None:
            self._count("no_space")
            return False
        try:
            fill(obj.byte_array)
            with self._lock:
                self.cpu.remove(key)
                self.cpu.submit_put_task(key, obj)
                if self.disk is not None:
                    self.disk.remove(key)
                    self.disk.submit_put_task(key, obj)  # written through, asynchronously
                self._counts["puts"] += 1
        finally:
            obj.ref_count_down()
        return True

    def get(self, key: CacheEngineKey) -> MemoryObj | None:
        """The value of ``key`` (a reference the caller releases), or ``None``. A value
        found on disk only is brought back into memory."""
        obj = self.cpu.get_blocking(key)
        if obj is None and self.disk is not None:
            obj = self.disk.get_blocking(key)
            if obj is not None:
                self.cpu.submit_put_task(key, obj)
                self._count("disk_hits")
        self._count("hits" if obj is not None else "misses")
        return obj

    def contains(self, key: CacheEngineKey) -> bool:
        return self.cpu.contains(key) or (self.disk is not None and self.disk.contains(key))

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            removed = self.cpu.remove(key)
            if self.disk is not None:
                removed = self.disk.remove(key) or removed
            if removed:
                self._counts["deletes"] += 1
        return removed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        out.update(chunks=len(self.cpu), bytes=self.cpu.used_bytes,
                   capacity_bytes=self.memory.capacity)
        if self.disk is not None:
            out.update(disk_chunks=len(self.disk.index), disk_bytes=self.disk.used_bytes,
                       disk_capacity_bytes=self.disk.max_bytes)
        return out

    def close(self) -> None:
        """Finish the disk writes in flight, then drop everything held in memory."""
        started = time.monotonic()
        if self.disk is not None:
            self.disk.close()
            logger.info("disk tier closed in %.1f s", time.monotonic() - started)
        self.cpu.close()
        self.memory.close()  # stops the region's prefault, if one is running
