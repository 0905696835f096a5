"""``local_disk``: chunks as self-describing files in one directory of any fsspec file system.

Each chunk is one file ``<key.to_string()>.kvobj`` directly in the tier's directory,
holding a header and the payload (see `object_format`). The directory may be a
plain path or any fsspec URL (``file:///var/cache/lmcache``, ``memory://cache``,
``s3://bucket/prefix``).

Writing
    `LocalDiskBackend.submit_put_task` returns at once; a writer thread computes the
    checksum, makes room in the budget (evicting least recently used chunks), writes the
    object under a temporary name ``.<random>.kvtmp`` in the same directory and renames
    it into place, so that a chunk is visible only once it is complete. Object stores
    that have no atomic rename (``s3://``, ``gs://``, ...) get the final object in one
    put instead, which is atomic there. Nothing is flushed to stable storage unless
    ``fsync=True``: a crash may lose the newest chunks, which the checksum turns into
    misses, never into wrong KV.

Reading
    `LocalDiskBackend.get_blocking` reads the header, checks it and the file size,
    allocates the memory object from the tier's allocator and reads the payload straight
    into it, then verifies the checksum. A missing, truncated, corrupt or foreign file is
    a miss: the key leaves the index and the bad file is deleted.

Restarts
    The index is rebuilt from a directory listing at construction (names and sizes,
    least recently used first by modification time); no file is opened. Temporary files
    left by a crash are deleted then. Two live backends should not share a directory:
    each would delete the other's in-flight temporary files at start (a lost write,
    logged, never a wrong chunk) and neither sees the other's later chunks.

The tier is three parts: the index and its budget (`index`), the file I/O (`files`:
system calls on a local file system, `lmcache.kits.fsspec_objects` elsewhere) and this
module, which ties them to the storage backend contract.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

from lmcache.abc.memory import MemoryFormat, MemoryObj
from lmcache.abc.storage_backend import ChunkSpec, StorageBackendInterface, TierContext
from lmcache.builtin.tiers.disk.files import FsspecFiles, LocalFiles, Miss, check_header
from lmcache.builtin.tiers.disk.index import DiskIndex, Entry, Victims
from lmcache.kits.checksum import CHECKSUM_ALGORITHMS
from lmcache.kits.fsspec_objects import OBJECT_SUFFIX, TEMP_SUFFIX, FsspecObjects
from lmcache.kits.object_format import HEADER_SIZE
from lmcache.plugin.options import PluginOptions
from lmcache.utils import CacheEngineKey, LogOnce, call_observer

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface

__all__ = ["OBJECT_SUFFIX", "TEMP_SUFFIX", "LocalDiskBackend"]

logger = logging.getLogger(__name__)

#: on_stored(keys, num_bytes, duration_s): chunks became visible in this tier.
OnStored = Callable[[list[CacheEngineKey], int, float], None]
#: on_evicted(keys, num_bytes): chunks were evicted from this tier to make room.
OnEvicted = Callable[[list[CacheEngineKey], int], None]


class LocalDiskBackend(StorageBackendInterface):
    """A storage tier of self-describing chunk files in one directory (any fsspec URL).

    Parameters
        path: a directory or an fsspec URL; created if missing.
        memory_allocator: where `get_blocking` allocates the objects it returns (any
            object with ``allocate(shape, dtype, fmt)``).
        max_size_gb: the budget in GB of 2**30 bytes (headers included); least recently
            used chunks are deleted to keep under it.
        num_writers / num_readers: threads for writes and for prefetches.
        checksum: ``"sum64"`` (memory speed) or ``"crc32"`` for new objects; reading
            verifies whatever algorithm an object was written with.
        fsync: flush each object of a local file system to stable storage before it
            becomes visible, and its name (the directory) before its put is done;
            concurrent writers share the directory's ``fsync``. Off by default: a crash
            then costs the newest chunks as misses, never wrong data.
        tier_name: the name in log messages.
        on_stored, on_evicted: observers, called from the writer threads (see
            `OnStored`, `OnEvicted`); their exceptions are logged and ignored.
        storage_options: keyword arguments for the fsspec file system (credentials,
            endpoint).
        chunk_spec: the chunks this tier may admit (`ChunkSpec`); a file of another
            kind is a miss, found on its header before anything is allocated.

    Errors
        Bad arguments raise ``ValueError``. Bad data never raises: it is a miss. A write
        that fails (disk full, permission) leaves nothing visible, is logged (the first
        one per backend as a warning) and its future carries the exception. I/O faults
        other than a missing file (``EACCES``, ``EIO``) while reading propagate as
        ``OSError``; the storage manager applies its ``error_handling`` policy.
    """

    class Options(PluginOptions):
        path: str = Field(
            description="Directory or fsspec URL of the tier (`/var/cache/lmcache`, "
            "`file:///var/cache/lmcache`, `memory://lmcache`, `s3://bucket/prefix`).",
        )
        max_size_gb: float = Field(
            gt=0,
            description="Budget of the tier in GB (2**30 bytes); least recently used chunks "
            "are deleted to stay under it.",
        )
        num_writers: int = Field(
            default=2, ge=1, description="Threads that write chunks in the background."
        )
        checksum: Literal["sum64", "crc32"] = Field(
            default="sum64",
            description="Checksum of new objects: `sum64` runs at memory speed, `crc32` "
            "is the classic zlib CRC (several times slower). Reads verify either.",
        )
        fsync: bool = Field(
            default=False,
            description="Flush every chunk to stable storage before it becomes visible "
            "(local file systems; slower). Without it a crash can lose the newest chunks, "
            "as misses.",
        )
        storage_options: dict[str, Any] = Field(
            default_factory=dict,
            description="Extra keyword arguments for the fsspec file system "
            "(credentials, endpoint_url, ...).",
        )


    def __init__(
        self,
        path: str | os.PathLike[str],
        memory_allocator: MemoryAllocatorInterface,
        max_size_gb: float,
        *,
        num_writers: int = 2,
        num_readers: int = 2,
        checksum: str = "sum64",
        fsync: bool = False,
        tier_name: str = "local_disk",
        on_stored: OnStored | None = None,
        on_evicted: OnEvicted | None = None,
        storage_options: dict[str, Any] | None = None,
        chunk_spec: ChunkSpec | None = None,
    ) -> None:
        if not max_size_gb > 0:
            raise ValueError(f"max_size_gb must be > 0 (GiB), got {max_size_gb!r}")
        if num_writers < 1 or num_readers < 1:
            raise ValueError(
                f"num_writers and num_readers must be >= 1, got {num_writers}, {num_readers}"
            )
        if checksum not in CHECKSUM_ALGORITHMS:
            raise ValueError(
                f"checksum must be one of {', '.join(CHECKSUM_ALGORITHMS)}, got {checksum!r}"
            )
        self.memory_allocator = memory_allocator
        self.max_bytes = int(max_size_gb * 1024**3)
        self.checksum = checksum
        self.fsync = fsync
        self.tier_name = tier_name
        self.on_stored = on_stored
        self.on_evicted = on_evicted
        self.chunk_spec = chunk_spec

        self.fs, root = fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))
        self.objects = FsspecObjects(self.fs, root)
        self.root = self.objects.root
        self.files: LocalFiles | FsspecFiles = (
            LocalFiles(self.root, fsync=fsync, name=tier_name)
            if type(self.fs) is LocalFileSystem else FsspecFiles(self.objects))
        # the index is in memory; a header is read locally at most once per file
        self.answers_from_memory = isinstance(self.files, LocalFiles)
        self.index = DiskIndex(self.max_bytes)
        self._log = LogOnce(logger, f"{tier_name}: ")

        self._rebuild_index()
        self._writers = ThreadPoolExecutor(num_writers, thread_name_prefix=f"{tier_name}-w")
        self._readers = ThreadPoolExecutor(num_readers, thread_name_prefix=f"{tier_name}-r")

    @classmethod
    def from_options(
        cls,
        options: LocalDiskBackend.Options,
        config: Any,
        metadata: Any,
        context: TierContext,
    ) -> LocalDiskBackend:
        return cls(
            options.path,
            context.allocator_for(cls),
            options.max_size_gb,
            num_writers=options.num_writers,
            checksum=options.checksum,
            fsync=options.fsync,
            tier_name=context.tier_name or "local_disk",
            on_evicted=context.events.evicted,
            storage_options=dict(options.storage_options),
            chunk_spec=context.chunk_spec,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.tier_name!r}, {self.fs.unstrip_protocol(self.root)!r}, "
            f"{len(self.index)} chunks, {self.used_bytes}/{self.max_bytes} bytes)"
        )

    # -- names ----------------------------------------------------------------------------

    def key_to_path(self, key: CacheEngineKey) -> str:
        """The path (in the tier's file system) of ``key``'s object."""
        return self.objects.path(f"{key.to_string()}{OBJECT_SUFFIX}")

    # -- index ----------------------------------------------------------------------------

    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored. A chunk found on disk at start is counted once its
        header was checked (size, key, kind of chunk): a lookup never counts a file that
        cannot be this chunk. Damage inside a payload is found when it is read."""
        entry = self.index.entry(key)
        if entry is None:
            return False
        if entry.verified:
            return True
        path = self.key_to_path(key)
        try:
            head, size = self.files.read_header(path)
            check_header(memoryview(head), size, key, self.chunk_spec)
        except Miss as miss:
            self._miss(key, entry, path, miss)
            return False
        entry.verified = True
        return True

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return self.index.is_writing(key)

    @property
    def used_bytes(self) -> int:
        """Bytes of the chunks in the index (headers included)."""
        return self.index.used_bytes

    def keys(self) -> list[CacheEngineKey]:
        """The stored keys, least recently used first."""
        return self.index.keys()

    def insert_key(self, key: CacheEngineKey, memory_obj_or_size: MemoryObj | int) -> None:
        """Record that ``key``'s object is in the directory, of the given size in bytes
        (header included) or holding the given memory object's payload; evicts least
        recently used chunks to stay within the budget. A completed put does the same;
        call this only for an object placed in the directory by other means.

        Raises ``ValueError`` if the object is larger than what the budget has room for
        while writes are in flight; the key is then not recorded.
        """
        if isinstance(memory_obj_or_size, MemoryObj):
            size = HEADER_SIZE + memory_obj_or_size.get_size()
        else:
            size = int(memory_obj_or_size)
        try:
            victims = self.index.insert(key, size)
        except ValueError as exc:
            raise ValueError(f"{exc} of tier {self.tier_name!r}") from None
        self._delete_victims(victims)

    def _rebuild_index(self) -> None:
        found: list[tuple[float, CacheEngineKey, int]] = []
        for info in self.objects.listing():
            if info.get("type") != "file":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(TEMP_SUFFIX):
                self.files.delete_quietly(self.objects.path(name))
                continue
            if not name.endswith(OBJECT_SUFFIX):
                continue
            try:
                key = CacheEngineKey.from_string(name[: -len(OBJECT_SUFFIX)])
            except ValueError:
                continue
            size = int(info.get("size") or 0)
            if size < HEADER_SIZE:  # cannot hold even a header: a torn or foreign file
                self.files.delete_quietly(self.objects.path(name))
                continue
            found.append((_modified(info), key, size))
        found.sort(key=lambda t: t[0])
        self._delete_victims(self.index.load((key, size) for _, key, size in found))
        if found:
            logger.info("%s: found %d chunks (%d bytes) in %s", self.tier_name,
                        len(self.index), self.used_bytes, self.root)

    def _delete_victims(self, victims: Victims | None) -> None:
        if not victims:
            return
        try:
            for key, _ in victims:
                self.files.delete_quietly(self.key_to_path(key))
        finally:
            self.index.deleted(k for k, _ in victims)
        call_observer(logger, self.on_evicted, [k for k, _ in victims],
                      sum(e.size for _, e in victims))

    def _delete(self, key: CacheEngineKey) -> None:
        # The index marked ``key`` as being deleted (pop, drop): delete, then unmark.
        try:
            self.files.delete_quietly(self.key_to_path(key))
        finally:
            self.index.deleted([key])

    def _drop(self, key: CacheEngineKey, entry: Entry, delete_file: bool) -> None:
        # Forget a key whose file turned out bad or missing, unless it was replaced.
        if self.index.drop(key, entry, deleting=delete_file) and delete_file:
            self._delete(key)

    def remove(self, key: CacheEngineKey) -> bool:
        """Delete ``key``'s object; returns whether it was stored."""
        if self.index.pop(key) is None:
            return False
        self._delete(key)
        return True

    # -- writing --------------------------------------------------------------------------

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        """Store ``memory_obj`` under ``key`` in the background.

        Returns ``None`` if the key is stored or being stored (or the tier is closed);
        otherwise a future of the write: ``True`` once the chunk is visible, ``False``
        if it was skipped because it does not fit in the budget, or the write's
        exception. The backend holds a reference to ``memory_obj`` until then.
        """
        if not self.index.begin_write(key, memory_obj):
            return None
        memory_obj.ref_count_up()
        try:
            return self._writers.submit(self._put, key, memory_obj)
        except RuntimeError:  # closed meanwhile
            self.index.abort(key, 0)
            memory_obj.ref_count_down()
            return None

    def _put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> bool:
        start = time.perf_counter()
        reserved = 0
        stored = False
        try:
            size = HEADER_SIZE + memory_obj.get_size()
            victims = self.index.reserve(size)
            if victims is None:
                logger.debug(
                    "%s: %s (%d bytes) does not fit in the budget of %d bytes; not stored",
                    self.tier_name, key, size, self.max_bytes,
                )
                return False
            reserved = size
            self._delete_victims(victims)
            self.files.write(self.key_to_path(key), memory_obj, self.checksum, key)
            self.index.commit(key, size)
            stored = True
        except Exception as exc:
            self._log("write", "writing %s to %s failed: %s: %s", key, self.root,
                      type(exc).__name__, exc)
            raise
        finally:
            if not stored:
                self.index.abort(key, reserved)
            memory_obj.ref_count_down()
        call_observer(logger, self.on_stored, [key], size, time.perf_counter() - start)
        return True

    async def async_save_bytes_to_disk(self, key: CacheEngineKey, memory_obj: MemoryObj) -> bool:
        """`submit_put_task` for asyncio callers: waits for the write; returns whether
        the chunk is stored by this call."""
        future = self.submit_put_task(key, memory_obj)
        if future is None:
            return False
        return bool(await asyncio.wrap_future(future))

    # -- reading --------------------------------------------------------------------------

    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        """Load ``key``'s chunk into a new memory object (owned by the caller), or
        ``None``: not stored, no room in the allocator, or a bad object (dropped)."""
        entry = self.index.entry(key)
        if entry is None:
            return None
        path = self.key_to_path(key)
        try:
            obj = self.files.read(path, self.memory_allocator, key, self.chunk_spec)
        except Miss as miss:
            self._miss(key, entry, path, miss)
            return None
        entry.verified = True
        self.index.touch(key, entry)
        self.files.touch(path)
        return obj

    def _miss(self, key: CacheEngineKey, entry: Entry, path: str, miss: Miss) -> None:
        if miss.bad:
            self._log("bad", "%s is unusable (%s); treated as a miss and deleted", path,
                      miss.reason)
        if miss.drop:
            self._drop(key, entry, delete_file=miss.bad)

    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        """Load ``key`` on a reader thread; a future of the memory object (or of
        ``None`` for a miss), or ``None`` when the key is not stored."""
        if self.index.closed or key not in self.index:
            return None
        try:
            return self._readers.submit(self.get_blocking, key)
        except RuntimeError:  # closed meanwhile
            return None

    # -- the seed's readers by path ---------------------------------------------------------

    def load_disk(
        self,
        path: str,
        backend: str = "bytes",
        dtype: torch.dtype | None = None,
        shape: Sequence[int] | None = None,
        fmt: MemoryFormat | None = None,
    ) -> MemoryObj | None:
        """Load the object file at ``path`` (in this tier's file system), or ``None`` if
        it is missing, bad, or does not have the ``dtype``, ``shape`` and ``fmt`` given.
        ``backend`` names the reading method; only ``"bytes"`` exists."""
        if backend != "bytes":
            raise ValueError(f"unknown load backend {backend!r}; expected 'bytes'")
        return self.load_bytes_from_disk(path, dtype, shape, fmt)

    def load_bytes_from_disk(
        self,
        path: str,
        dtype: torch.dtype | None = None,
        shape: Sequence[int] | None = None,
        fmt: MemoryFormat | None = None,
    ) -> MemoryObj | None:
        """See `load_disk`. Does not consult or change the index. The object must have
        been stored under the key its file is named after."""
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        try:
            key = CacheEngineKey.from_string(name.removesuffix(OBJECT_SUFFIX))
        except ValueError:
            return None  # not a chunk's name: no key it could have been stored under
        try:
            obj = self.files.read(path, self.memory_allocator, key, self.chunk_spec)
        except Miss:
            return None
        if (
            (dtype is not None and obj.get_dtype() != dtype)
            or (shape is not None and tuple(obj.get_shape()) != tuple(shape))
            or (fmt is not None and obj.get_memory_format() != fmt)
        ):
            obj.ref_count_down()
            return None
        return obj

    async def async_load_bytes_from_disk(
        self,
        path: str,
        dtype: torch.dtype | None = None,
        shape: Sequence[int] | None = None,
        fmt: MemoryFormat | None = None,
    ) -> MemoryObj | None:
        """`load_bytes_from_disk` on a reader thread, for asyncio callers."""
        future = self._readers.submit(self.load_bytes_from_disk, path, dtype, shape, fmt)
        return await asyncio.wrap_future(future)


    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending writes and prefetches, then stop the threads. Idempotent;
        afterwards puts and prefetches are refused (``None``)."""
        self.index.close()
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.files.close()


def _modified(info: dict[str, Any]) -> float:
    # Modification time from a listing entry, whatever the file system calls it.
    for field in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0

