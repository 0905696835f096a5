"""The disk tier's I/O: one chunk object per file, written so that it appears complete or
not at all, read straight into a memory object and verified.

Two implementations with the same methods; the tier picks one at start and never
branches on it again:

`LocalFiles`
    The local file system, with system calls: a write is one ``writev`` of header and
    payload into a temporary file, then a rename (plus ``fsync`` of the file and the
    directory with ``fsync=True``: concurrent writers share one directory ``fsync``, see
    `DirectorySync`); a read is ``readinto`` the new memory object. Payloads
    over one piece (4 MiB) move piece by piece, each piece hashed on a helper thread
    while the next one is read or written, so that checksumming costs little time; a
    payload whose checksum is known already (``metadata.payload_checksum``, computed by
    the connector's gather) is written in one ``writev`` and not read again.
`FsspecFiles`
    Any other fsspec file system or object store, through `lmcache.kits.fsspec_objects`.

Reads raise `Miss` for an object that cannot be used (missing, not an lmcache object,
truncated, corrupt, stored under another key, not this engine's kind of chunk, no room
in the allocator); the tier turns that into a miss. The key and the chunk spec are
checked on the header, before anything is allocated.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
from lmcache.kits.checksum import CHECKSUM_BLOCK, PayloadHasher
from lmcache.kits.fsspec_objects import TEMP_SUFFIX, FsspecObjects
from lmcache.kits.object_format import (
    HEADER_SIZE,
    ObjectHeader,
    allocate_for,
    build_header,
    decode_header,
    encode_header,
    known_checksum,
    verify_payload,
)

if TYPE_CHECKING:
    from lmcache.abc.storage_backend import ChunkSpec
    from lmcache.utils import CacheEngineKey

__all__ = ["MISSING", "DirectorySync", "FsspecFiles", "LocalFiles", "Miss", "check_header"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Linux moves at most this much per read/write system call.
_MAX_IO = 0x7FFFF000
# Payloads over one piece are read or written piece by piece, each piece hashed while the
# next one moves.
_PIECE = 4 << 20
assert _PIECE % CHECKSUM_BLOCK == 0


class Miss(Exception):
    """The object cannot be used now.

    ``drop``: the key leaves the index (its file is gone or bad); ``bad``: the file
    itself is bad and is deleted.
    """

    def __init__(self, reason: str, *, bad: bool = True, drop: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad = bad
        self.drop = drop or bad


#: `Miss.reason` of an object that is not there (not bad: nothing to delete).
MISSING = "missing"


def check_header(head: memoryview, file_size: int, key: CacheEngineKey | None,
                 spec: ChunkSpec | None) -> ObjectHeader:
    """The header of the object of ``key`` whose first bytes are ``head``; `Miss` when
    the object cannot be that chunk."""
    if file_size == 0:
        raise Miss("empty file")
    header = decode_header(head)
    if header is None:
        raise Miss("not an lmcache object of this version (bad, old or foreign header)")
    if file_size != header.total_size:
        raise Miss(f"size {file_size} bytes, header announces {header.total_size}")
    problem = header.problem(key, spec)
    if problem is not None:
        raise Miss(problem)
    return header


def _allocate(header: ObjectHeader, allocator: MemoryAllocatorInterface) -> MemoryObj:
    obj = allocate_for(header, allocator)
    if obj is None:
        raise Miss("no room in the memory allocator", bad=False, drop=False)
    return obj


def _temp_name() -> str:
    return f".{uuid.uuid4().hex}{TEMP_SUFFIX}"


class LocalFiles:
    """Chunk objects in a directory of the local file system (see the module)."""

    def __init__(self, root: str, *, fsync: bool = False, name: str = "local_disk") -> None:
        self.root = root
        self.fsync = fsync
        self._dir_sync = DirectorySync(root)
        os.makedirs(root, exist_ok=True)
        self._hashers = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-h")

    # -- writing --------------------------------------------------------------------------

    def write(self, path: str, memory_obj: MemoryObj, checksum: str,
              key: CacheEngineKey | None) -> None:
        """Write header + payload (stored under ``key``) so that ``path`` appears complete
        or not at all."""
        payload = memory_obj.byte_array
        tmp = f"{self.root}/{_temp_name()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        try:
            try:
                if payload.nbytes <= _PIECE or known_checksum(memory_obj, checksum) is not None:
                    # the checksum is cheap here, or known already (computed as the payload
                    # was written): header and payload in one writev
                    header = encode_header(memory_obj, checksum, key)
                    _write_all(fd, [memoryview(header), payload])
                else:
                    # The payload first, hashed piece by piece alongside; then the header.
                    def write_piece(piece: memoryview, offset: int) -> None:
                        _pwrite_all(fd, piece, HEADER_SIZE + offset)

                    digest = self._hash_alongside(payload, checksum, write_piece)
                    header = build_header(
                        memory_obj.get_memory_format(), memory_obj.get_dtype(),
                        memory_obj.get_shape(), payload, checksum, checksum=digest, key=key,
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
            self._dir_sync.sync()

    # -- reading --------------------------------------------------------------------------

    def read_header(self, path: str) -> tuple[bytes, int]:
        """The first `HEADER_SIZE` bytes of the file at ``path`` and its size; `Miss`
        when there is none."""
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise Miss(MISSING, bad=False) from None
        with f:
            return f.read(HEADER_SIZE), os.fstat(f.fileno()).st_size

    def read(self, path: str, allocator: MemoryAllocatorInterface,
             key: CacheEngineKey | None, spec: ChunkSpec | None) -> MemoryObj:
        """The chunk of ``key`` at ``path`` in a new memory object from ``allocator``;
        `Miss` when it cannot be used."""
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise Miss(MISSING, bad=False) from None
        with f:
            file_size = os.fstat(f.fileno()).st_size
            head = bytearray(HEADER_SIZE)
            got = _readinto_all(f, memoryview(head))
            header = check_header(memoryview(head)[:got], file_size, key, spec)
            obj = _allocate(header, allocator)
            try:

                def read_piece(piece: memoryview, offset: int) -> None:
                    if _readinto_all(f, piece) != piece.nbytes:
                        raise Miss("truncated while reading")

                digest = self._hash_alongside(
                    obj.byte_array, header.checksum_algorithm, read_piece
                )
                if digest != header.checksum:
                    raise Miss("checksum mismatch")
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

    # -- housekeeping ---------------------------------------------------------------------

    def delete_quietly(self, path: str) -> None:
        """Best effort: a file we cannot delete is at worst a leftover, never visible."""
        _unlink_quietly(path)

    def touch(self, path: str) -> None:
        """Mark ``path`` as just used: keeps the LRU order across restarts."""
        try:
            os.utime(path)
        except OSError:
            pass

    def close(self) -> None:
        self._hashers.shutdown(wait=True)


class DirectorySync:
    """Group commit of a directory's ``fsync``: makes the renames done so far in ``path``
    durable, sharing one ``fsync`` between concurrent writers.

    A rename is durable once an ``fsync`` of its directory that *started after it*
    finished. `sync`, called after a rename, returns once such an ``fsync`` finished: if
    none is running, the caller runs one; if one is running, it may have started before
    the rename, so the caller waits for it to end and then for the next one, which one of
    the writers waiting by then runs for all of them. With ``k`` writers renaming at once
    that is at most two ``fsync`` calls instead of ``k``.

    Errors are those of `_fsync_dir`: none (a directory that cannot be opened or synced
    is skipped, as file systems that refuse ``fsync`` on directories do). A sync that
    raises anyway covers nobody: its caller gets the exception and the writers waiting
    on it run another.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._started = 0  # generation of the newest sync started
        self._finished = 0  # generation of the newest sync finished successfully
        self._running = False

    def sync(self) -> None:
        """Return once a directory ``fsync`` that started after this call began finished."""
        with self._cond:
            # any sync started from now on covers the caller's rename
            covered_by = self._started + 1
            while self._running and self._finished < covered_by:
                self._cond.wait()
            if self._finished >= covered_by:
                return
            self._started += 1
            generation = self._started
            self._running = True
        ok = False
        try:
            _fsync_dir(self.path)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._finished = generation
                self._cond.notify_all()


class FsspecFiles:
    """Chunk objects under a directory of any fsspec file system (see the module)."""

    def __init__(self, objects: FsspecObjects) -> None:
        self.objects = objects
        self.root = objects.root
        objects.makedirs()

    def write(self, path: str, memory_obj: MemoryObj, checksum: str,
              key: CacheEngineKey | None) -> None:
        self.objects.put(path, [encode_header(memory_obj, checksum, key),
                                memory_obj.byte_array])

    def read_header(self, path: str) -> tuple[bytes, int]:
        try:
            size = int(self.objects.fs.size(path))
            head = self.objects.fs.cat_file(path, start=0, end=HEADER_SIZE)
        except FileNotFoundError:
            raise Miss(MISSING, bad=False) from None
        return head, size

    def read(self, path: str, allocator: MemoryAllocatorInterface,
             key: CacheEngineKey | None, spec: ChunkSpec | None) -> MemoryObj:
        max_bytes = None if spec is None else HEADER_SIZE + spec.max_payload_bytes
        data = self.objects.get(path, max_bytes)
        if data is None:
            raise Miss(MISSING, bad=False)
        view = memoryview(data)
        if max_bytes is not None and view.nbytes > max_bytes:
            raise Miss(f"over {max_bytes} bytes, longer than any chunk of this engine")
        header = check_header(view, view.nbytes, key, spec)
        obj = _allocate(header, allocator)
        try:
            payload = obj.byte_array
            payload[:] = view[HEADER_SIZE:]
            if not verify_payload(header, payload):
                raise Miss("checksum mismatch")
        except BaseException:
            obj.ref_count_down()
            raise
        return obj

    def delete_quietly(self, path: str) -> None:
        self.objects.delete_quietly(path)

    def touch(self, path: str) -> None:
        pass  # the modification time of an object cannot be set: LRU order is per process

    def close(self) -> None:
        pass


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



def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
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
