"""The disk tier's index: which chunks are stored, in LRU order, within a byte budget.

The index is the tier's only shared state; one lock guards it. It records

* the stored chunks (key → `Entry`, least recently used first) and their bytes;
* the writes in flight (key → the memory object being written) and the room they
  reserved in the budget, so that concurrent writes never overshoot it together;
* the keys whose files are being deleted right now, which a new write of the same key
  must not race.

It does no I/O: operations that evict return the victims, and the tier deletes their
files outside the lock, then calls `DiskIndex.deleted`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from lmcache.abc.memory import MemoryObj
from lmcache.utils import CacheEngineKey

__all__ = ["DiskIndex", "Entry", "Victims"]


class Entry:
    """One stored chunk. Identity matters: a reader that found a bad file drops the key
    only if the index still holds the entry it read.

    ``verified``: the file's header was checked (its size, key and kind of chunk) since
    this process knows it -- true for what it wrote itself, false for what it found at
    start until a lookup or a read checks it."""

    __slots__ = ("size", "verified")

    def __init__(self, size: int, verified: bool = False) -> None:
        self.size = size
        self.verified = verified


#: Chunks evicted to make room, whose files are still to be deleted.
Victims = list[tuple[CacheEngineKey, Entry]]


class DiskIndex:
    """Stored chunks and writes in flight within ``max_bytes`` (see the module)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheEngineKey, Entry] = OrderedDict()  # LRU first
        self._used_bytes = 0  # sizes of the stored chunks
        self._reserved_bytes = 0  # room taken by writes in flight
        self._writing: dict[CacheEngineKey, MemoryObj] = {}
        self._deleting: set[CacheEngineKey] = set()
        self._closed = False

    # -- queries -----------------------------------------------------------------------

    def __contains__(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: CacheEngineKey) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def is_writing(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._writing

    def keys(self) -> list[CacheEngineKey]:
        """The stored keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # -- room --------------------------------------------------------------------------

    def _make_room_locked(self, size: int) -> Victims | None:
        # Evict least recently used chunks until ``size`` more bytes fit. Returns the
        # victims, or None when even evicting everything would not make room; then
        # nothing is evicted.
        if self._reserved_bytes + size > self.max_bytes:
            return None
        victims: Victims = []
        while self._used_bytes + self._reserved_bytes + size > self.max_bytes and \
                self._entries:
            key, entry = self._entries.popitem(last=False)
            self._used_bytes -= entry.size
            self._deleting.add(key)
            victims.append((key, entry))
        return victims

    def deleted(self, keys: Iterable[CacheEngineKey]) -> None:
        """The files of ``keys`` (victims, removed or dropped chunks) are gone."""
        with self._lock:
            self._deleting.difference_update(keys)

    # -- chunks placed by other means (start-up, the seed's insert_key) -------------------

    def load(self, found: Iterable[tuple[CacheEngineKey, int]]) -> Victims:
        """Add chunks found on disk (least recently used first), then evict to fit."""
        with self._lock:
            for key, size in found:
                self._entries[key] = Entry(size)
                self._used_bytes += size
            return self._make_room_locked(0) or []

    def insert(self, key: CacheEngineKey, size: int) -> Victims:
        """Record ``key`` as stored with ``size`` bytes (replacing an older entry).

        Raises ``ValueError`` when it does not fit in what the budget has room for while
        writes are in flight; the key is then not recorded.
        """
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used_bytes -= old.size
            victims = self._make_room_locked(size)
            if victims is None:
                raise ValueError(f"{key} ({size} bytes) does not fit in the budget of "
                                 f"{self.max_bytes} bytes")
            self._entries[key] = Entry(size)
            self._used_bytes += size
        return victims

    # -- writes ------------------------------------------------------------------------

    def begin_write(self, key: CacheEngineKey, memory_obj: MemoryObj) -> bool:
        """Register a write of ``key``; False when it is stored, being written or being
        deleted, or the index is closed (then nothing is registered)."""
        with self._lock:
            if self._closed or key in self._entries or key in self._writing \
                    or key in self._deleting:
                return False
            self._writing[key] = memory_obj
            return True

    def reserve(self, size: int) -> Victims | None:
        """Take ``size`` bytes of the budget for a write in flight, evicting to make room;
        ``None`` (nothing taken) when the chunk cannot fit."""
        with self._lock:
            victims = self._make_room_locked(size)
            if victims is not None:
                self._reserved_bytes += size
            return victims

    def commit(self, key: CacheEngineKey, size: int) -> None:
        """The write of ``key`` (which reserved ``size``) is complete: the chunk is stored."""
        with self._lock:
            self._reserved_bytes -= size
            self._entries[key] = Entry(size, verified=True)
            self._used_bytes += size
            del self._writing[key]

    def abort(self, key: CacheEngineKey, reserved: int) -> None:
        """The write of ``key`` ended without storing it; give back what it reserved."""
        with self._lock:
            self._reserved_bytes -= reserved
            self._writing.pop(key, None)

    # -- removal -----------------------------------------------------------------------

    def touch(self, key: CacheEngineKey, entry: Entry) -> None:
        """``key`` was read: it becomes the most recently used, if still ``entry``."""
        with self._lock:
            if self._entries.get(key) is entry:
                self._entries.move_to_end(key)

    def pop(self, key: CacheEngineKey) -> Entry | None:
        """Forget ``key`` and mark its file as being deleted; its entry, or None."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._used_bytes -= entry.size
                self._deleting.add(key)
            return entry

    def drop(self, key: CacheEngineKey, entry: Entry, *, deleting: bool) -> bool:
        """Forget ``key`` if the index still holds ``entry`` (a file that turned out bad
        or missing); ``deleting`` marks its file as being deleted. Returns whether it
        was forgotten."""
        with self._lock:
            if self._entries.get(key) is not entry:
                return False
            del self._entries[key]
            self._used_bytes -= entry.size
            if deleting:
                self._deleting.add(key)
            return True

    def close(self) -> None:
        """Refuse new writes from now on."""
        with self._lock:
            self._closed = True
