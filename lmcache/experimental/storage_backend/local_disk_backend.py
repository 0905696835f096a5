"""The disk tier: chunks as self-describing files in one directory of any fsspec file system.

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
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

from lmcache.experimental.memory_management import MemoryFormat, MemoryObj
from lmcache.experimental.storage_backend.abstract_backend import StorageBackendInterface
from lmcache.experimental.storage_backend.object_format import (
    CHECKSUM_ALGORITHMS,
    CHECKSUM_BLOCK,
    HEADER_SIZE,
    ObjectHeader,
    PayloadHasher,
    allocate_for,
    build_header,
    decode_header,
    encode_header,
    verify_payload,
)
from lmcache.plugin.options import PluginOptions
from lmcache.utils import CacheEngineKey

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryAllocatorInterface

__all__ = ["LocalDiskBackend", "OBJECT_SUFFIX", "TEMP_SUFFIX"]

logger = logging.getLogger(__name__)

OBJECT_SUFFIX = ".kvobj"
TEMP_SUFFIX = ".kvtmp"

#: on_stored(keys, num_bytes, duration_s): chunks became visible in this tier.
OnStored = Callable[[list[CacheEngineKey], int, float], None]
#: on_evicted(keys, num_bytes): chunks were evicted from this tier to make room.
OnEvicted = Callable[[list[CacheEngineKey], int], None]

# Object stores: a put is atomic, a rename is a copy. Written in one put, no temp name.
_OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2", "cos", "tos"}
)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Linux moves at most this much per read/write system call.
_MAX_IO = 0x7FFFF000
# Payloads over one piece are read or written piece by piece, each piece hashed while the
# next one moves.
_PIECE = 4 << 20
assert _PIECE % CHECKSUM_BLOCK == 0


class _Entry:
    # One stored chunk in the index. Identity matters: a reader that found a bad file
    # drops the key only if the index still holds the entry it read.
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Miss(Exception):
    """Internal: the object cannot be used now.

    ``drop``: the key leaves the index (its file is gone or bad); ``bad``: the file
    itself is bad and is deleted.
    """

    def __init__(self, reason: str, *, bad: bool = True, drop: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad = bad
        self.drop = drop or bad


_MISSING = "missing"


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
        fsync: flush each object (and the directory) of a local file system to stable
            storage before it becomes visible. Off by default: a crash then costs the
            newest chunks as misses, never wrong data.
        tier_name: the name in log messages.
        on_stored, on_evicted: observers, called from the writer threads (see
            `OnStored`, `OnEvicted`); their exceptions are logged and ignored.
        storage_options: keyword arguments for the fsspec file system (credentials,
            endpoint).

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

        url = os.fspath(path)
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self._local = type(self.fs) is LocalFileSystem
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_put = bool(_OBJECT_STORE_PROTOCOLS.intersection(protocols))
        if self._local:
            os.makedirs(self.root, exist_ok=True)
        elif not self._atomic_put:
            self.fs.makedirs(self.root, exist_ok=True)

        self._lock = threading.Lock()
        self._index: OrderedDict[CacheEngineKey, _Entry] = OrderedDict()  # LRU first
        self._used_bytes = 0  # sizes of the indexed chunks
        self._reserved_bytes = 0  # room taken by writes in flight
        self._put_tasks: dict[CacheEngineKey, MemoryObj] = {}
        self._deleting: set[CacheEngineKey] = set()  # files being deleted right now
        self._write_failures = 0
        self._bad_objects = 0
        self._closed = False

        self._rebuild_index()
        self._writers = ThreadPoolExecutor(num_writers, thread_name_prefix=f"{tier_name}-w")
        self._readers = ThreadPoolExecutor(num_readers, thread_name_prefix=f"{tier_name}-r")
        self._hashers = ThreadPoolExecutor(2, thread_name_prefix=f"{tier_name}-h")

    @classmethod
    def from_options(
        cls,
        options: LocalDiskBackend.Options,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata,
        **context: Any,
    ) -> LocalDiskBackend:
        allocator = context.get("memory_allocator")
        if allocator is None:
            raise ValueError(
                "LocalDiskBackend needs the engine's memory allocator "
                "(context keyword 'memory_allocator')"
            )
        return cls(
            options.path,
            allocator,
            options.max_size_gb,
            num_writers=options.num_writers,
            checksum=options.checksum,
            fsync=options.fsync,
            tier_name=context.get("tier_name") or "local_disk",
            on_stored=context.get("on_stored"),
            on_evicted=context.get("on_evicted"),
            storage_options=dict(options.storage_options),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.tier_name!r}, {self.fs.unstrip_protocol(self.root)!r}, "
            f"{len(self._index)} chunks, {self._used_bytes}/{self.max_bytes} bytes)"
        )

    # -- names ----------------------------------------------------------------------------

    def key_to_path(self, key: CacheEngineKey) -> str:
        """The path (in the tier's file system) of ``key``'s object."""
        return f"{self.root}/{key.to_string()}{OBJECT_SUFFIX}"

    def _temp_path(self) -> str:
        return f"{self.root}/.{uuid.uuid4().hex}{TEMP_SUFFIX}"

    # -- index ----------------------------------------------------------------------------

    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._index

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._put_tasks

    @property
    def used_bytes(self) -> int:
        """Bytes of the chunks in the index (headers included)."""
        return self._used_bytes

    def keys(self) -> list[CacheEngineKey]:
        """The stored keys, least recently used first."""
        with self._lock:
            return list(self._index)

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
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used_bytes -= old.size
            victims = self._make_room_locked(size)
            if victims is None:
                raise ValueError(
                    f"{key} ({size} bytes) does not fit in the budget of {self.max_bytes} "
                    f"bytes of tier {self.tier_name!r}"
                )
            self._index[key] = _Entry(size)
            self._used_bytes += size
        self._delete_victims(victims)

    def _rebuild_index(self) -> None:
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            listing = []
        found: list[tuple[float, CacheEngineKey, int]] = []
        for info in listing:
            if info.get("type") != "file":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(TEMP_SUFFIX):
                self._delete_file(f"{self.root}/{name}")
                continue
            if not name.endswith(OBJECT_SUFFIX):
                continue
            try:
                key = CacheEngineKey.from_string(name[: -len(OBJECT_SUFFIX)])
            except ValueError:
                continue
            size = int(info.get("size") or 0)
            if size < HEADER_SIZE:  # cannot hold even a header: a torn or foreign file
                self._delete_file(f"{self.root}/{name}")
                continue
            found.append((_modified(info), key, size))
        found.sort(key=lambda t: t[0])
        with self._lock:
            for _, key, size in found:
                self._index[key] = _Entry(size)
                self._used_bytes += size
            victims = self._make_room_locked(0)
        self._delete_victims(victims)
        if found:
            logger.info(
                "%s: found %d chunks (%d bytes) in %s",
                self.tier_name, len(self._index), self._used_bytes, self.root,
            )

    def _make_room_locked(self, size: int) -> list[tuple[CacheEngineKey, _Entry]] | None:
        # Evict least recently used chunks until ``size`` more bytes fit. Returns the
        # victims (to delete outside the lock), or None when even evicting everything
        # would not make room; then nothing is evicted.
        if self._reserved_bytes + size > self.max_bytes:
            return None
        victims = []
        while self._used_bytes + self._reserved_bytes + size > self.max_bytes and self._index:
            key, entry = self._index.popitem(last=False)
            self._used_bytes -= entry.size
            self._deleting.add(key)
            victims.append((key, entry))
        return victims

    def _delete_victims(self, victims: list[tuple[CacheEngineKey, _Entry]] | None) -> None:
        if not victims:
            return
        try:
            for key, _ in victims:
                self._delete_file(self.key_to_path(key))
        finally:
            with self._lock:
                self._deleting.difference_update(k for k, _ in victims)
        self._notify(self.on_evicted, [k for k, _ in victims], sum(e.size for _, e in victims))

    def _drop(self, key: CacheEngineKey, entry: _Entry, delete_file: bool) -> None:
        # Forget a key whose file turned out bad or missing, unless it was replaced.
        with self._lock:
            if self._index.get(key) is not entry:
                return
            del self._index[key]
            self._used_bytes -= entry.size
            if not delete_file:
                return
            self._deleting.add(key)
        try:
            self._delete_file(self.key_to_path(key))
        finally:
            with self._lock:
                self._deleting.discard(key)

    def remove(self, key: CacheEngineKey) -> bool:
        """Delete ``key``'s object; returns whether it was stored."""
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is None:
                return False
            self._used_bytes -= entry.size
            self._deleting.add(key)
        try:
            self._delete_file(self.key_to_path(key))
        finally:
            with self._lock:
                self._deleting.discard(key)
        return True

    # -- writing --------------------------------------------------------------------------

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        """Store ``memory_obj`` under ``key`` in the background.

        Returns ``None`` if the key is stored or being stored (or the tier is closed);
        otherwise a future of the write: ``True`` once the chunk is visible, ``False``
        if it was skipped because it does not fit in the budget, or the write's
        exception. The backend holds a reference to ``memory_obj`` until then.
        """
        with self._lock:
            if (
                self._closed
                or key in self._index
                or key in self._put_tasks
                or key in self._deleting
            ):
                return None
            memory_obj.ref_count_up()
            self._put_tasks[key] = memory_obj
            try:
                return self._writers.submit(self._put, key, memory_obj)
            except BaseException:
                del self._put_tasks[key]
                memory_obj.ref_count_down()
                raise

    def _put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> bool:
        start = time.perf_counter()
        reserved = 0
        stored = False
        try:
            size = HEADER_SIZE + memory_obj.get_size()
            with self._lock:
                victims = self._make_room_locked(size)
                if victims is not None:
                    self._reserved_bytes += size
                    reserved = size
            if victims is None:
                logger.debug(
                    "%s: %s (%d bytes) does not fit in the budget of %d bytes; not stored",
                    self.tier_name, key, size, self.max_bytes,
                )
                return False
            self._delete_victims(victims)
            self._write_object(self.key_to_path(key), memory_obj)
            with self._lock:
                self._reserved_bytes -= reserved
                reserved = 0
                self._index[key] = _Entry(size)
                self._used_bytes += size
                del self._put_tasks[key]
            stored = True
        except Exception as exc:
            self._log_write_failure(key, exc)
            raise
        finally:
            if not stored:
                with self._lock:
                    self._reserved_bytes -= reserved
                    self._put_tasks.pop(key, None)
            memory_obj.ref_count_down()
        self._notify(self.on_stored, [key], size, time.perf_counter() - start)
        return True

    def _write_object(self, path: str, memory_obj: MemoryObj) -> None:
        # Write header + payload so that ``path`` appears complete or not at all.
        if self._local:
            self._write_local(path, memory_obj)
            return
        payload = memory_obj.byte_array
        header = encode_header(memory_obj, self.checksum)
        if self._atomic_put:
            self.fs.pipe_file(path, b"".join((header, payload)))
        else:
            tmp = self._temp_path()
            try:
                with self.fs.open(tmp, "wb") as f:
                    f.write(header)
                    f.write(payload)
                self.fs.mv(tmp, path)
            except BaseException:
                self._delete_file(tmp)
                raise

    def _write_local(self, path: str, memory_obj: MemoryObj) -> None:
        payload = memory_obj.byte_array
        tmp = self._temp_path()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        try:
            try:
                if payload.nbytes <= _PIECE:
                    header = encode_header(memory_obj, self.checksum)
                    _write_all(fd, [memoryview(header), payload])
                else:
                    # The payload first, hashed piece by piece alongside; then the header.
                    def write_piece(piece: memoryview, offset: int) -> None:
                        _pwrite_all(fd, piece, HEADER_SIZE + offset)

                    checksum = self._hash_alongside(payload, self.checksum, write_piece)
                    header = build_header(
                        memory_obj.get_memory_format(), memory_obj.get_dtype(),
                        memory_obj.get_shape(), payload, self.checksum, checksum=checksum,
                    )
                    _pwrite_all(fd, memoryview(header), 0)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if self.fsync:
            _fsync_dir(self.root)

    def _log_write_failure(self, key: CacheEngineKey, exc: BaseException) -> None:
        self._log_counted("_write_failures", "write failures",
                          f"writing {key} to {self.root} failed: {type(exc).__name__}: {exc}")

    def _log_counted(self, counter: str, what: str, message: str) -> None:
        """Count an event; the first is a warning, the rest go to DEBUG."""
        with self._lock:
            count = getattr(self, counter) + 1
            setattr(self, counter, count)
        first = count == 1
        logger.log(logging.WARNING if first else logging.DEBUG, "%s: %s%s", self.tier_name,
                   message, f" (further {what} of this tier are logged at DEBUG level)"
                   if first else "")

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
        with self._lock:
            entry = self._index.get(key)
        if entry is None:
            return None
        path = self.key_to_path(key)
        try:
            obj = self._load(path)
        except _Miss as miss:
            if miss.bad:
                self._note_bad_object(path, miss.reason)
            if miss.drop:
                self._drop(key, entry, delete_file=miss.bad)
            return None
        with self._lock:
            if self._index.get(key) is entry:
                self._index.move_to_end(key)
        if self._local:
            _touch_quietly(path)  # keeps the LRU order across restarts
        return obj

    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        """Load ``key`` on a reader thread; a future of the memory object (or of
        ``None`` for a miss), or ``None`` when the key is not stored."""
        with self._lock:
            if self._closed or key not in self._index:
                return None
            return self._readers.submit(self.get_blocking, key)

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
        """See `load_disk`. Does not consult or change the index."""
        try:
            obj = self._load(path)
        except _Miss:
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

    def _load(self, path: str) -> MemoryObj:
        if self._local:
            return self._load_local(path)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise _Miss(_MISSING, bad=False) from None
        view = memoryview(data)
        header = _check_header(view, len(data))
        obj = self._allocate(header)
        try:
            payload = obj.byte_array
            payload[:] = view[HEADER_SIZE:]
            if not verify_payload(header, payload):
                raise _Miss("checksum mismatch")
        except BaseException:
            obj.ref_count_down()
            raise
        return obj

    def _load_local(self, path: str) -> MemoryObj:
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise _Miss(_MISSING, bad=False) from None
        with f:
            file_size = os.fstat(f.fileno()).st_size
            head = bytearray(HEADER_SIZE)
            got = _readinto_all(f, memoryview(head))
            header = _check_header(memoryview(head)[:got], file_size)
            obj = self._allocate(header)
            try:

                def read_piece(piece: memoryview, offset: int) -> None:
                    if _readinto_all(f, piece) != piece.nbytes:
                        raise _Miss("truncated while reading")

                digest = self._hash_alongside(
                    obj.byte_array, header.checksum_algorithm, read_piece
                )
                if digest != header.checksum:
                    raise _Miss("checksum mismatch")
            except BaseException:
                obj.ref_count_down()
                raise
        return obj

    def _hash_alongside(
        self, payload: memoryview, algorithm: str, io_piece: Callable[[memoryview, int], None]
    ) -> int:
        # Run ``io_piece(piece, offset)`` over consecutive pieces of ``payload`` and return
        # the payload's checksum. Large payloads are hashed on the hasher threads, piece k
        # while piece k + 1 is read or written, so that checksumming costs little time.
        hasher = PayloadHasher(algorithm)
        n = payload.nbytes
        if n <= _PIECE:
            io_piece(payload, 0)
            return hasher.update(payload).digest()
        pending: Future | None = None
        try:
            for offset in range(0, n, _PIECE):
                piece = payload[offset : offset + _PIECE]
                io_piece(piece, offset)
                if pending is not None:
                    pending.result()
                pending = self._submit_hash(hasher, piece)
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:  # never leave a thread reading memory about to be freed
                wait([pending])
            raise
        return hasher.digest()

    def _submit_hash(self, hasher: PayloadHasher, piece: memoryview) -> Future:
        try:
            return self._hashers.submit(hasher.update, piece)
        except RuntimeError:  # closed: hash here
            done: Future = Future()
            done.set_result(hasher.update(piece))
            return done

    def _allocate(self, header: ObjectHeader) -> MemoryObj:
        obj = allocate_for(header, self.memory_allocator)
        if obj is None:
            raise _Miss("no room in the memory allocator", bad=False, drop=False)
        return obj

    def _note_bad_object(self, path: str, reason: str) -> None:
        self._log_counted("_bad_objects", "bad objects",
                          f"{path} is unusable ({reason}); treated as a miss and deleted")

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending writes and prefetches, then stop the threads. Idempotent;
        afterwards puts and prefetches are refused (``None``)."""
        with self._lock:
            self._closed = True
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._hashers.shutdown(wait=True)

    # -- helpers --------------------------------------------------------------------------

    def _delete_file(self, path: str) -> None:
        # Best effort: a file we cannot delete is at worst a leftover, never visible.
        try:
            if self._local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            logger.debug("%s: could not delete %s: %s", self.tier_name, path, exc)

    def _notify(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            logger.exception("%s: callback %r failed", self.tier_name, callback)


def _check_header(head: memoryview, file_size: int) -> ObjectHeader:
    if file_size == 0:
        raise _Miss("empty file")
    header = decode_header(head)
    if header is None:
        raise _Miss("not an lmcache object (bad or foreign header)")
    if file_size != header.total_size:
        raise _Miss(f"size {file_size} bytes, header announces {header.total_size}")
    return header


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    # One writev for header + payload; loops only on a partial write.
    bufs = [b.cast("B") if b.format != "B" else b for b in buffers if b.nbytes]
    while bufs:
        batch, total = [], 0
        for b in bufs:
            if total + b.nbytes > _MAX_IO:
                batch.append(b[: _MAX_IO - total])
                break
            batch.append(b)
            total += b.nbytes
        written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
        while bufs and written >= bufs[0].nbytes:
            written -= bufs[0].nbytes
            bufs.pop(0)
        if written:
            bufs[0] = bufs[0][written:]


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done, n = 0, buf.nbytes
    while done < n:
        done += os.pwrite(fd, buf[done : min(n, done + _MAX_IO)], offset + done)


def _readinto_all(f: Any, buf: memoryview) -> int:
    got, n = 0, buf.nbytes
    while got < n:
        k = f.readinto(buf[got : min(n, got + _MAX_IO)])
        if not k:
            break
        got += k
    return got


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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _touch_quietly(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
