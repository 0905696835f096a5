"""The disk tier on real files (and fsspec's memory file system), with real threads."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pydantic
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

import lmcache.builtin.tiers.disk.files as ldb  # the tier's file I/O
from lmcache.abc.storage_backend import TierContext, TierEvents
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.local_disk_backend import (
    OBJECT_SUFFIX,
    TEMP_SUFFIX,
    LocalDiskBackend,
)
from lmcache.experimental.storage_backend.object_format import HEADER_SIZE
from lmcache.utils import CacheEngineKey
from tests.kvutil import wait_until

KV_SHAPE = (2, 4, 256, 64)
SMALL = (2, 4, 16, 64)  # 8192 elements
GIB = 1024**3
REPO = Path(__file__).resolve().parents[2]

#: The logger of every module of the disk tier.
DISK_LOGGER = "lmcache.builtin.tiers.disk"


def key(i: int, model: str = "test/model") -> CacheEngineKey:
    return CacheEngineKey("vllm", model, 1, 0, f"{i:064x}")


def fill(obj, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (obj.get_size(),), dtype=torch.uint8, generator=g)
    obj.byte_array[:] = raw.numpy().tobytes()


def make(allocator, seed: int, shape=SMALL, dtype=torch.bfloat16, fmt=MemoryFormat.KV_BLOB):
    obj = allocator.allocate(shape, dtype, fmt)
    assert obj is not None
    fill(obj, seed)
    return obj


def digest(obj) -> str:
    return hashlib.sha256(obj.byte_array).hexdigest()


def obj_bytes(shape=SMALL, dtype=torch.bfloat16) -> int:
    return HEADER_SIZE + torch.Size(shape).numel() * dtype.itemsize


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(16 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"
    assert allocator.allocated_bytes == 0


@pytest.fixture
def open_backend(allocator, tmp_path):
    backends: list[LocalDiskBackend] = []

    def open_(path=None, max_size_gb=1.0, **kwargs) -> LocalDiskBackend:
        backend = LocalDiskBackend(str(path or tmp_path / "cache"), allocator, max_size_gb,
                                   **kwargs)
        backends.append(backend)
        return backend

    yield open_
    for backend in backends:
        backend.close()


@pytest.fixture
def backend(open_backend):
    return open_backend()


def store(backend, allocator, k, seed, **kwargs) -> str:
    obj = make(allocator, seed, **kwargs)
    try:
        future = backend.submit_put_task(k, obj)
        assert future is not None
        assert future.result(timeout=30) is True
        return digest(obj)
    finally:
        obj.ref_count_down()


def load(backend, k) -> str | None:
    obj = backend.get_blocking(k)
    if obj is None:
        return None
    try:
        return digest(obj)
    finally:
        obj.ref_count_down()


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_put_get_is_bit_exact(backend, allocator, dtype):
    obj = make(allocator, 1, KV_SHAPE, dtype)
    future = backend.submit_put_task(key(1), obj)
    assert future.result(timeout=30) is True
    assert obj.get_ref_count() == 1  # the write's reference is back
    assert backend.contains(key(1)) and not backend.exists_in_put_tasks(key(1))
    loaded = backend.get_blocking(key(1))
    assert loaded is not None and loaded is not obj
    assert loaded.get_shape() == torch.Size(KV_SHAPE) and loaded.get_dtype() == dtype
    assert loaded.get_memory_format() == MemoryFormat.KV_BLOB
    assert torch.equal(loaded.tensor.view(torch.uint8), obj.tensor.view(torch.uint8))
    loaded.ref_count_down()
    obj.ref_count_down()


@pytest.mark.parametrize(
    ("shape", "dtype", "fmt"),
    [
        ((3, 5, 7), torch.float16, MemoryFormat.KV_BLOB),  # not a whole number of words
        ((1000,), torch.uint8, MemoryFormat.BINARY),
        ((0, 4), torch.float32, MemoryFormat.UNDEFINED),
    ],
)
def test_odd_shapes_and_formats(backend, allocator, shape, dtype, fmt):
    expected = store(backend, allocator, key(2), 2, shape=shape, dtype=dtype, fmt=fmt)
    obj = backend.get_blocking(key(2))
    assert (obj.get_shape(), obj.get_dtype(), obj.get_memory_format()) == (
        torch.Size(shape), dtype, fmt)
    assert digest(obj) == expected
    obj.ref_count_down()


def test_file_layout(backend, allocator, tmp_path):
    store(backend, allocator, key(3), 3)
    assert files(tmp_path / "cache") == [key(3).to_string() + OBJECT_SUFFIX]
    assert os.path.getsize(backend.key_to_path(key(3))) == obj_bytes()


def test_duplicate_puts_are_skipped(backend, allocator):
    store(backend, allocator, key(4), 4)
    obj = make(allocator, 5)
    assert backend.submit_put_task(key(4), obj) is None
    assert obj.get_ref_count() == 1
    obj.ref_count_down()


def test_crc32_objects_are_read_by_a_sum64_tier(open_backend, allocator, tmp_path):
    writer = open_backend(checksum="crc32")
    expected = store(writer, allocator, key(6), 6)
    writer.close()
    assert load(open_backend(checksum="sum64"), key(6)) == expected


def test_fsync_option(open_backend, allocator):
    backend = open_backend(fsync=True)
    expected = store(backend, allocator, key(7), 7)
    assert load(backend, key(7)) == expected


class DurabilityLog:
    """Renames, directory fsyncs (each ``start``/``end`` with an id) and finished puts, in
    the order they happened. ``dir_fsync`` runs inside every ``fsync`` of a directory
    (a slow one, a failing one)."""

    def __init__(self, monkeypatch, dir_fsync=None) -> None:
        self.events: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        real_replace, real_fsync = os.replace, os.fsync

        def replace(src, dst, **kwargs):
            real_replace(src, dst, **kwargs)
            self.log("rename", os.path.basename(dst))
            self.after_rename()

        def fsync(fd):
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                return real_fsync(fd)
            i = next(self._ids)
            self.log("dir-start", i)
            try:
                if dir_fsync is not None:
                    dir_fsync()
                return real_fsync(fd)
            finally:
                self.log("dir-end", i)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)

    def after_rename(self) -> None:
        pass

    def log(self, what: str, arg: object) -> None:
        with self._lock:
            self.events.append((what, arg))

    def watch(self, k: CacheEngineKey, future) -> None:
        future.add_done_callback(lambda _: self.log("done", k.to_string() + OBJECT_SUFFIX))

    def dir_fsyncs(self) -> int:
        return sum(what == "dir-start" for what, _ in self.events)

    def covered(self, k: CacheEngineKey) -> bool:
        """Whether a directory fsync that started after ``k``'s rename finished before
        ``k``'s put was done."""
        name = k.to_string() + OBJECT_SUFFIX
        renamed = self.events.index(("rename", name))
        done = self.events.index(("done", name))
        return any(
            self.events.index(("dir-end", i)) < done
            for j, (what, i) in enumerate(self.events) if what == "dir-start" and j > renamed
        )


def test_concurrent_fsync_puts_share_directory_fsyncs(open_backend, allocator, monkeypatch):
    n = 4
    backend = open_backend(fsync=True, num_writers=n)
    # every writer renames before any of them syncs the directory; each sync is slow
    record = DurabilityLog(monkeypatch, dir_fsync=lambda: time.sleep(0.05))
    record.after_rename = threading.Barrier(n, timeout=30).wait
    objs = [make(allocator, i) for i in range(n)]
    expected = [digest(o) for o in objs]
    try:
        for i, obj in enumerate(objs):
            record.watch(key(i), backend.submit_put_task(key(i), obj))
        assert wait_until(lambda: sum(e[0] == "done" for e in record.events) == n, 30)
    finally:
        for obj in objs:
            obj.ref_count_down()
    assert record.dir_fsyncs() < n, record.events
    assert all(record.covered(key(i)) for i in range(n)), record.events
    assert [load(backend, key(i)) for i in range(n)] == expected


def test_a_rename_during_a_directory_fsync_waits_for_the_next(open_backend, allocator,
                                                               monkeypatch):
    backend = open_backend(fsync=True, num_writers=2)
    release = threading.Event()
    record = DurabilityLog(monkeypatch, dir_fsync=lambda: release.wait(30))
    first, second = make(allocator, 1), make(allocator, 2)
    try:
        record.watch(key(1), backend.submit_put_task(key(1), first))
        assert wait_until(lambda: record.dir_fsyncs() == 1, 30)
        # key(1)'s directory fsync is running; key(2) is renamed while it runs
        future = backend.submit_put_task(key(2), second)
        record.watch(key(2), future)
        assert wait_until(lambda: ("rename", key(2).to_string() + OBJECT_SUFFIX)
                          in record.events, 30)
        release.set()
        assert future.result(timeout=30) is True
    finally:
        release.set()
        first.ref_count_down()
        second.ref_count_down()
    assert wait_until(lambda: sum(e[0] == "done" for e in record.events) == 2, 30)
    assert record.covered(key(1)) and record.covered(key(2)), record.events


@pytest.mark.parametrize("failing", ["fsync", "open"])
def test_a_failing_directory_fsync_is_ignored(open_backend, allocator, monkeypatch, tmp_path,
                                              failing):
    # as before the group commit: a directory that cannot be synced (or opened) is
    # skipped, and the puts waiting on it are done
    n = 4
    backend = open_backend(fsync=True, num_writers=n)
    attempts = []

    def fail():
        attempts.append(failing)
        time.sleep(0.05)  # slow, so that the other writers wait on it
        raise OSError(errno.EIO, "injected")

    record = DurabilityLog(monkeypatch, dir_fsync=fail if failing == "fsync" else None)
    record.after_rename = threading.Barrier(n, timeout=30).wait
    if failing == "open":
        real_open = os.open

        def open_(path, flags, *args, **kwargs):
            if os.fspath(path) == backend.root and not flags & os.O_WRONLY:
                fail()
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    objs = [make(allocator, i) for i in range(n)]
    expected = [digest(o) for o in objs]
    try:
        futures = [backend.submit_put_task(key(i), obj) for i, obj in enumerate(objs)]
        assert [f.result(timeout=30) for f in futures] == [True] * n
    finally:
        for obj in objs:
            obj.ref_count_down()
    assert 1 <= len(attempts) < n
    assert [load(backend, key(i)) for i in range(n)] == expected
    assert not [name for name in files(tmp_path / "cache") if name.endswith(TEMP_SUFFIX)]


def test_a_directory_sync_that_raises_covers_nobody(tmp_path, monkeypatch):
    release = threading.Event()
    calls = []

    def fsync_dir(path):
        calls.append(path)
        if len(calls) == 1:
            release.wait(30)
        elif len(calls) == 2:
            raise RuntimeError("injected")

    monkeypatch.setattr(ldb, "_fsync_dir", fsync_dir)
    sync = ldb.DirectorySync(str(tmp_path))
    waits = []
    real_wait = sync._cond.wait

    def wait(timeout=None):
        waits.append(timeout)
        return real_wait(timeout)

    sync._cond.wait = wait
    outcomes = []

    def writer():
        try:
            sync.sync()
            outcomes.append("done")
        except RuntimeError:
            outcomes.append("raised")

    first = threading.Thread(target=writer)
    first.start()
    assert wait_until(lambda: len(calls) == 1, 30)
    # two writers wait while the first sync runs; the next sync, run by one of them for
    # both, raises: the other is not covered by it and runs a third
    others = [threading.Thread(target=writer) for _ in range(2)]
    for thread in others:
        thread.start()
    assert wait_until(lambda: len(waits) == 2, 30)
    release.set()
    for thread in [first, *others]:
        thread.join(30)
    assert sorted(outcomes) == ["done", "done", "raised"]
    assert calls == [str(tmp_path)] * 3


def test_remove(backend, allocator):
    store(backend, allocator, key(8), 8)
    path = backend.key_to_path(key(8))
    assert backend.remove(key(8)) is True
    assert not os.path.exists(path) and not backend.contains(key(8))
    assert backend.remove(key(8)) is False
    assert backend.used_bytes == 0


def test_prefetch(backend, allocator):
    expected = store(backend, allocator, key(9), 9)
    future = backend.submit_prefetch_task(key(9))
    obj = future.result(timeout=30)
    assert digest(obj) == expected
    obj.ref_count_down()
    assert backend.submit_prefetch_task(key(10)) is None


def test_a_full_allocator_is_a_miss_that_keeps_the_chunk(open_backend, allocator):
    backend = open_backend()
    store(backend, allocator, key(11), 11, shape=(2, 4, 256, 1024))  # 4 MiB
    hogs = []
    while (hog := allocator.allocate((1 << 20,), torch.uint8)) is not None:
        hogs.append(hog)
    try:
        assert backend.get_blocking(key(11)) is None
        assert backend.contains(key(11))
    finally:
        for hog in hogs:
            hog.ref_count_down()
    assert load(backend, key(11)) is not None


def test_on_stored_callback(open_backend, allocator):
    calls = []
    backend = open_backend(on_stored=lambda *args: calls.append(args))
    store(backend, allocator, key(12), 12)
    [(keys, num_bytes, duration)] = calls
    assert keys == [key(12)] and num_bytes == obj_bytes() and duration >= 0


def test_a_failing_callback_does_not_break_the_write(open_backend, allocator, caplog):
    def boom(*args):
        raise RuntimeError("observer bug")

    backend = open_backend(on_stored=boom)
    with caplog.at_level(logging.ERROR, logger=DISK_LOGGER):
        store(backend, allocator, key(13), 13)
    assert backend.contains(key(13))
    assert "observer bug" in caplog.text


def test_async_methods(backend, allocator):
    obj = make(allocator, 14)

    async def main():
        assert await backend.async_save_bytes_to_disk(key(14), obj) is True
        assert await backend.async_save_bytes_to_disk(key(14), obj) is False  # already there
        return await backend.async_load_bytes_from_disk(backend.key_to_path(key(14)))

    loaded = asyncio.run(main())
    assert digest(loaded) == digest(obj)
    loaded.ref_count_down()
    obj.ref_count_down()


def test_load_disk_checks_what_the_caller_expects(backend, allocator):
    expected = store(backend, allocator, key(15), 15)
    path = backend.key_to_path(key(15))
    obj = backend.load_disk(path, "bytes", torch.bfloat16, SMALL, MemoryFormat.KV_BLOB)
    assert digest(obj) == expected
    obj.ref_count_down()
    assert backend.load_disk(path, dtype=torch.float16) is None
    assert backend.load_bytes_from_disk(path, shape=(1,)) is None
    assert backend.load_bytes_from_disk(path, fmt=MemoryFormat.BINARY) is None
    assert backend.load_bytes_from_disk(path + ".missing") is None
    with pytest.raises(ValueError, match="bytes"):
        backend.load_disk(path, backend="mmap")


def test_put_and_prefetch_after_close_are_refused(backend, allocator):
    backend.close()
    backend.close()  # idempotent
    obj = make(allocator, 16)
    assert backend.submit_put_task(key(16), obj) is None
    assert obj.get_ref_count() == 1
    obj.ref_count_down()
    assert backend.submit_prefetch_task(key(16)) is None


# -- visibility -------------------------------------------------------------------------------


def test_a_chunk_is_invisible_until_completely_written(backend, allocator, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    write = backend.files.write

    def gated_write(*args):
        entered.set()
        assert gate.wait(30)
        write(*args)

    backend.files.write = gated_write
    obj = make(allocator, 20)
    future = backend.submit_put_task(key(20), obj)
    assert entered.wait(30)
    assert not backend.contains(key(20))
    assert backend.exists_in_put_tasks(key(20))
    assert backend.get_blocking(key(20)) is None
    assert backend.submit_prefetch_task(key(20)) is None
    assert backend.submit_put_task(key(20), obj) is None  # being written
    assert obj.get_ref_count() == 2  # the writer holds one
    assert files(tmp_path / "cache") == []
    gate.set()
    assert future.result(timeout=30) is True
    assert backend.contains(key(20)) and not backend.exists_in_put_tasks(key(20))
    assert obj.get_ref_count() == 1
    assert load(backend, key(20)) == digest(obj)
    obj.ref_count_down()


class GatedMemoryFS(MemoryFileSystem):
    """A memory file system whose writes block until ``gate`` is set."""

    protocol = "lmcachetestgated"
    gate = threading.Event()
    writing = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("lmcachetestgated://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            cls = type(self)
            write = f.write

            def slow_write(data):
                cls.writing.set()
                assert cls.gate.wait(30)
                return write(data)

            f.write = slow_write
        return f


fsspec.register_implementation("lmcachetestgated", GatedMemoryFS, clobber=True)


def test_partially_written_objects_on_a_slow_file_system_are_invisible(open_backend, allocator):
    GatedMemoryFS.gate.clear()
    GatedMemoryFS.writing.clear()
    root = f"lmcachetestgated://{uuid.uuid4().hex}"
    backend = open_backend(root)
    obj = make(allocator, 21)
    future = backend.submit_put_task(key(21), obj)
    try:
        assert GatedMemoryFS.writing.wait(30)
        names = [p.rsplit("/", 1)[-1] for p in backend.fs.ls(backend.root, detail=False)]
        assert len(names) == 1 and names[0].endswith(TEMP_SUFFIX)  # a temp name only
        assert not backend.contains(key(21)) and backend.exists_in_put_tasks(key(21))
        assert backend.get_blocking(key(21)) is None
    finally:
        GatedMemoryFS.gate.set()
    assert future.result(timeout=30) is True
    assert load(backend, key(21)) == digest(obj)
    obj.ref_count_down()
    backend.fs.rm(backend.root, recursive=True)


# -- restarts -------------------------------------------------------------------------------


def test_restart_finds_and_loads_what_was_stored(open_backend, allocator, tmp_path):
    first = open_backend()
    expected = {i: store(first, allocator, key(i), i) for i in range(5)}
    first.close()
    second = open_backend()
    assert sorted(second.keys()) == sorted(key(i) for i in range(5))
    assert second.used_bytes == 5 * obj_bytes()
    for i, d in expected.items():
        assert load(second, key(i)) == d


def test_restart_orders_lru_by_modification_time(open_backend, allocator, tmp_path):
    first = open_backend()
    for i in range(4):
        store(first, allocator, key(i), i)
    first.close()
    for i, t in zip([2, 0, 3, 1], [1000, 2000, 3000, 4000]):
        os.utime(first.key_to_path(key(i)), (t, t))
    assert open_backend().keys() == [key(2), key(0), key(3), key(1)]


def test_restart_does_not_read_files(open_backend, allocator, tmp_path, monkeypatch):
    first = open_backend()
    store(first, allocator, key(1), 1)
    first.close()

    def no_reads(*args, **kwargs):
        raise AssertionError("a file was opened at start-up")

    monkeypatch.setattr(ldb, "open", no_reads, raising=False)
    assert open_backend().keys() == [key(1)]


def test_unrelated_files_are_ignored(open_backend, allocator, tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "README").write_text("hello")
    (directory / "not-a-key.kvobj").write_bytes(b"x" * 500)
    (directory / "vllm@m@01@0@XYZ.kvobj").write_bytes(b"x" * 500)  # not canonical
    (directory / "subdir.kvobj").mkdir()
    backend = open_backend()
    assert backend.keys() == []
    store(backend, allocator, key(1), 1)
    assert (directory / "README").exists()  # never deleted: not ours


def test_garbage_under_a_key_name_is_a_miss(open_backend, allocator, tmp_path):
    # Any chunk hash makes a key (the seed's token databases need not use hex), so a file
    # named like one is taken for an object of the tier; its content is checked on read.
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "vllm@m@1@0@XYZ.kvobj").write_bytes(b"x" * 500)
    backend = open_backend()
    odd = CacheEngineKey("vllm", "m", 1, 0, "XYZ")
    assert backend.get_blocking(odd) is None
    assert allocator.num_active_allocations == 0


def test_temp_files_from_a_crash_are_removed_at_start(open_backend, allocator, tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / f".{uuid.uuid4().hex}{TEMP_SUFFIX}").write_bytes(b"partial")
    (directory / f"{key(1).to_string()}{TEMP_SUFFIX}").write_bytes(b"partial")
    backend = open_backend()
    assert files(directory) == []
    assert backend.keys() == [] and not backend.contains(key(1))
    # A temp file appearing later is never visible either.
    (directory / f".{uuid.uuid4().hex}{TEMP_SUFFIX}").write_bytes(b"partial")
    assert backend.keys() == [] and backend.get_blocking(key(1)) is None


CHILD = textwrap.dedent(
    """
    import hashlib, sys, torch
    from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
    from lmcache.experimental.storage_backend.local_disk_backend import LocalDiskBackend
    from lmcache.utils import CacheEngineKey

    path, parent_hash = sys.argv[1], sys.argv[2]
    allocator = HostMemoryAllocator(16 << 20)
    backend = LocalDiskBackend(path, allocator, 1.0)
    key = lambda i: CacheEngineKey("vllm", "test/model", 1, 0, f"{i:064x}")
    obj = backend.get_blocking(key(1))
    assert obj is not None, "the parent's chunk was not found"
    assert obj.get_shape() == torch.Size([2, 4, 256, 64]), obj.get_shape()
    assert obj.get_dtype() == torch.bfloat16
    assert hashlib.sha256(obj.byte_array).hexdigest() == parent_hash, "different bytes"
    obj.ref_count_down()
    mine = allocator.allocate((2, 4, 256, 64), torch.float16, MemoryFormat.KV_BLOB)
    mine.tensor.copy_(torch.arange(mine.tensor.numel()).reshape(2, 4, 256, 64) % 1000)
    assert backend.submit_put_task(key(2), mine).result(timeout=60)
    print(hashlib.sha256(mine.byte_array).hexdigest())
    mine.ref_count_down()
    backend.close()
    assert allocator.num_active_allocations == 0
    """
)


def test_a_second_process_loads_bit_exact(open_backend, allocator, tmp_path):
    first = open_backend()
    mine = store(first, allocator, key(1), 1, shape=KV_SHAPE)
    first.close()
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, f"file://{tmp_path / 'cache'}", mine],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    theirs = result.stdout.strip().splitlines()[-1]
    again = open_backend()
    obj = again.get_blocking(key(2))
    assert obj.get_dtype() == torch.float16 and obj.get_shape() == torch.Size(KV_SHAPE)
    assert digest(obj) == theirs
    obj.ref_count_down()


# -- bad objects ----------------------------------------------------------------------------


def damage_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 1234] ^= 0x10
    path.write_bytes(bytes(data))


def damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "corrupt payload byte": damage_payload,
    "corrupt header byte": damage_header,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "truncated header": lambda p: p.write_bytes(p.read_bytes()[: HEADER_SIZE // 2]),
    "trailing bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
    "zero length": lambda p: p.write_bytes(b""),
    "another format": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_objects_are_misses(backend, allocator, damage, caplog):
    expected = {i: store(backend, allocator, key(i), i) for i in range(3)}
    path = Path(backend.key_to_path(key(1)))
    DAMAGES[damage](path)
    with caplog.at_level(logging.WARNING, logger=DISK_LOGGER):
        assert backend.get_blocking(key(1)) is None
    assert not backend.contains(key(1))
    assert not path.exists()  # the bad file is gone
    assert backend.used_bytes == 2 * obj_bytes()
    assert load(backend, key(0)) == expected[0]
    assert load(backend, key(2)) == expected[2]
    # The key can be stored again.
    assert store(backend, allocator, key(1), 1) == expected[1]
    assert load(backend, key(1)) == expected[1]


def test_bad_object_found_after_a_restart(open_backend, allocator, tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / f"{key(5).to_string()}{OBJECT_SUFFIX}").write_bytes(os.urandom(4096))
    (directory / f"{key(6).to_string()}{OBJECT_SUFFIX}").write_bytes(b"")
    backend = open_backend()
    assert backend.keys() == [key(5)]  # an empty file cannot be an object
    assert backend.get_blocking(key(5)) is None
    assert files(directory) == []


def test_only_the_first_bad_object_is_a_warning(backend, allocator, caplog):
    for i in range(3):
        store(backend, allocator, key(i), i)
        damage_payload(Path(backend.key_to_path(key(i))))
    with caplog.at_level(logging.DEBUG, logger=DISK_LOGGER):
        for i in range(3):
            assert backend.get_blocking(key(i)) is None
    levels = [r.levelno for r in caplog.records if "unusable" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_io_errors_while_reading_propagate(backend, allocator, monkeypatch):
    store(backend, allocator, key(1), 1)

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ldb, "open", eio, raising=False)
    with pytest.raises(OSError, match="Input/output"):
        backend.get_blocking(key(1))
    monkeypatch.undo()
    assert backend.contains(key(1)) and load(backend, key(1)) is not None


@pytest.mark.parametrize("checksum", ["sum64", "crc32"])
def test_large_objects_are_hashed_piece_by_piece(open_backend, allocator, monkeypatch, checksum):
    monkeypatch.setattr(ldb, "_PIECE", 64 << 10)  # KV_SHAPE in fp32 is 8 pieces
    backend = open_backend(checksum=checksum)
    expected = {i: store(backend, allocator, key(i), i, shape=KV_SHAPE, dtype=torch.float32)
                for i in range(4)}
    monkeypatch.setattr(ldb, "_PIECE", 1 << 40)  # what was written in pieces reads whole
    assert load(backend, key(0)) == expected[0]
    monkeypatch.setattr(ldb, "_PIECE", 96 << 10)  # and in other pieces
    assert load(backend, key(1)) == expected[1]
    for i, offset in [(2, HEADER_SIZE + 5), (3, -1)]:  # first and last piece damaged
        path = Path(backend.key_to_path(key(i)))
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        assert backend.get_blocking(key(i)) is None and not path.exists()


def test_a_known_checksum_is_not_computed_again(open_backend, allocator, monkeypatch):
    # a connector that checksummed the payload as it gathered it says so in the metadata:
    # the write uses that (one writev, no pass over the payload), whatever its size
    from lmcache.kits.checksum import payload_checksum

    monkeypatch.setattr(ldb, "_PIECE", 64 << 10)  # KV_SHAPE in fp32 is 8 pieces
    backend = open_backend()
    hashed = []
    real_hash_alongside = ldb.LocalFiles._hash_alongside

    def hash_alongside(self, payload, *args):
        hashed.append(payload.nbytes)
        return real_hash_alongside(self, payload, *args)

    monkeypatch.setattr(ldb.LocalFiles, "_hash_alongside", hash_alongside)
    right, stale = (make(allocator, i, shape=KV_SHAPE, dtype=torch.float32) for i in (1, 2))
    right.metadata.payload_checksum = ("sum64", payload_checksum(right.byte_array))
    stale.metadata.payload_checksum = ("sum64", payload_checksum(right.byte_array))
    other = make(allocator, 3, shape=KV_SHAPE, dtype=torch.float32)
    other.metadata.payload_checksum = ("crc32", 0)  # not the tier's algorithm: computed
    expected = {1: digest(right), 3: digest(other)}
    other_bytes = other.get_size()
    try:
        futures = [backend.submit_put_task(key(i), obj)
                   for i, obj in [(1, right), (2, stale), (3, other)]]
        assert [f.result(timeout=30) for f in futures] == [True] * 3
    finally:
        for obj in (right, stale, other):
            obj.ref_count_down()
    assert hashed == [other_bytes]  # written: only the one whose checksum was unknown
    assert load(backend, key(1)) == expected[1]
    assert load(backend, key(3)) == expected[3]
    assert load(backend, key(2)) is None  # a stale checksum: a miss, never wrong data


def test_a_chunk_read_changed_and_stored_again_is_the_changed_chunk(backend, allocator):
    # An object a tier returned carries no checksum of its own (a caller may change its
    # payload, as tests and tools do): stored again, it is checksummed anew and loads.
    expected = store(backend, allocator, key(1), 1, shape=KV_SHAPE, dtype=torch.float32)
    obj = backend.get_blocking(key(1))
    assert obj.metadata.payload_checksum is None
    obj.tensor.zero_()
    assert backend.remove(key(1))
    assert backend.submit_put_task(key(1), obj).result(timeout=30)
    obj.ref_count_down()
    zeros = load(backend, key(1))
    assert zeros is not None and zeros != expected


def test_a_file_truncated_while_being_read(backend, allocator, monkeypatch):
    monkeypatch.setattr(ldb, "_PIECE", 64 << 10)
    expected = store(backend, allocator, key(1), 1, shape=KV_SHAPE, dtype=torch.float32)
    real = ldb._readinto_all
    calls = [0]

    def shrinking(f, buf):
        calls[0] += 1
        if calls[0] == 4:  # the header, then two pieces, then the file shrinks
            os.truncate(backend.key_to_path(key(1)), HEADER_SIZE + 100_000)
        return real(f, buf)

    monkeypatch.setattr(ldb, "_readinto_all", shrinking)
    assert backend.get_blocking(key(1)) is None
    assert not backend.contains(key(1))
    monkeypatch.setattr(ldb, "_readinto_all", real)
    assert store(backend, allocator, key(1), 1, shape=KV_SHAPE, dtype=torch.float32) == expected


# -- budget -----------------------------------------------------------------------------------


def test_lru_eviction_keeps_the_most_recent(open_backend, allocator):
    evicted = []
    backend = open_backend(max_size_gb=(3 * obj_bytes() + 100) / GIB,
                           on_evicted=lambda keys, n: evicted.append((keys, n)))
    for i in range(3):
        store(backend, allocator, key(i), i)
    assert load(backend, key(0)) is not None  # key(0) is now the most recent
    store(backend, allocator, key(3), 3)
    assert evicted == [([key(1)], obj_bytes())]
    assert not os.path.exists(backend.key_to_path(key(1)))
    assert backend.keys() == [key(2), key(0), key(3)]
    store(backend, allocator, key(4), 4)
    assert backend.keys() == [key(0), key(3), key(4)]
    assert backend.used_bytes == 3 * obj_bytes() <= backend.max_bytes
    assert all(load(backend, key(i)) is not None for i in (0, 3, 4))


def test_an_object_larger_than_the_budget_is_not_stored(open_backend, allocator):
    backend = open_backend(max_size_gb=(obj_bytes() - 1) / GIB)
    obj = make(allocator, 1)
    assert backend.submit_put_task(key(1), obj).result(timeout=30) is False
    assert obj.get_ref_count() == 1 and not backend.exists_in_put_tasks(key(1))
    assert not backend.contains(key(1)) and backend.used_bytes == 0
    obj.ref_count_down()


def test_a_smaller_budget_evicts_at_start(open_backend, allocator):
    first = open_backend()
    for i in range(4):
        store(first, allocator, key(i), i)
        os.utime(first.key_to_path(key(i)), (1000 + i, 1000 + i))
    first.close()
    evicted = []
    second = open_backend(max_size_gb=(2 * obj_bytes()) / GIB,
                          on_evicted=lambda keys, n: evicted.append(keys))
    assert second.keys() == [key(2), key(3)]
    assert evicted == [[key(0), key(1)]]


def test_insert_key(backend, allocator):
    store(backend, allocator, key(1), 1)
    with pytest.raises(ValueError, match="does not fit"):
        backend.insert_key(key(2), backend.max_bytes + 1)
    assert not backend.contains(key(2))
    obj = make(allocator, 1)
    backend.insert_key(key(1), obj)  # re-recording is idempotent
    assert backend.used_bytes == obj_bytes()
    obj.ref_count_down()


# -- other file systems ---------------------------------------------------------------------


def test_memory_url(open_backend, allocator):
    root = f"memory://lmcache-test-{uuid.uuid4().hex}"
    backend = open_backend(root)
    expected = {i: store(backend, allocator, key(i), i) for i in range(3)}
    assert load(backend, key(1)) == expected[1]
    backend.close()
    again = open_backend(root)
    assert sorted(again.keys()) == [key(0), key(1), key(2)]
    assert load(again, key(2)) == expected[2]
    # Corruption is a miss here too.
    fs = again.fs
    path = again.key_to_path(key(0))
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    assert again.get_blocking(key(0)) is None and not fs.exists(path)
    assert again.remove(key(1)) and not fs.exists(again.key_to_path(key(1)))
    fs.rm(again.root, recursive=True)


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_puts_and_gets(open_backend, allocator):
    backend = open_backend(num_writers=2)
    n_keys, n_threads = 24, 4
    reference = {}
    for i in range(n_keys):
        obj = make(allocator, i)
        reference[i] = digest(obj)
        obj.ref_count_down()
    errors = []

    def worker(t: int) -> None:
        try:
            futures = []
            for i in range(n_keys):
                j = (i + t * 5) % n_keys  # threads overlap on every key
                obj = make(allocator, j)
                future = backend.submit_put_task(key(j), obj)
                obj.ref_count_down()  # the writer keeps its own reference
                if future is not None:
                    futures.append(future)
                got = load(backend, key((j + 3) % n_keys))
                assert got in (None, reference[(j + 3) % n_keys])
            for future in futures:
                assert future.result(timeout=60) is True
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda i: load(backend, key(i)), range(n_keys)))
    assert loaded == [reference[i] for i in range(n_keys)]
    assert backend.used_bytes == n_keys * obj_bytes()


def test_concurrent_gets_of_one_key_on_memory_fs(open_backend, allocator):
    backend = open_backend(f"memory://lmcache-test-{uuid.uuid4().hex}")
    expected = store(backend, allocator, key(1), 1)
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: load(backend, key(1)), range(40))) == {expected}
    backend.fs.rm(backend.root, recursive=True)


# -- write failures ---------------------------------------------------------------------------


def test_a_failed_local_write_leaves_nothing_and_the_tier_keeps_working(
    backend, allocator, tmp_path, monkeypatch, caplog
):
    real_write_all = ldb._write_all

    def disk_full(fd, buffers):
        os.write(fd, bytes(buffers[0])[:50])  # a torn write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ldb, "_write_all", disk_full)
    with caplog.at_level(logging.DEBUG, logger=DISK_LOGGER):
        for i in range(2):
            obj = make(allocator, i)
            future = backend.submit_put_task(key(i), obj)
            assert isinstance(future.exception(timeout=30), OSError)
            assert obj.get_ref_count() == 1
            obj.ref_count_down()
            assert not backend.contains(key(i)) and not backend.exists_in_put_tasks(key(i))
    assert files(tmp_path / "cache") == []
    assert backend.used_bytes == 0 and backend.index._reserved_bytes == 0
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG]
    monkeypatch.setattr(ldb, "_write_all", real_write_all)
    expected = store(backend, allocator, key(0), 0)
    assert load(backend, key(0)) == expected


class FailingMemoryFS(MemoryFileSystem):
    """A memory file system whose writes fail after the first few bytes."""

    protocol = "lmcachetestfailing"
    fail = True

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("lmcachetestfailing://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode and type(self).fail:
            write = f.write
            count = [0]

            def failing_write(data):
                count[0] += 1
                if count[0] > 1:
                    raise OSError(errno.EACCES, "Permission denied")
                return write(data)

            f.write = failing_write
        return f


fsspec.register_implementation("lmcachetestfailing", FailingMemoryFS, clobber=True)


def test_a_failed_write_on_fsspec_leaves_nothing(open_backend, allocator):
    backend = open_backend(f"lmcachetestfailing://{uuid.uuid4().hex}")
    obj = make(allocator, 1)
    FailingMemoryFS.fail = True
    try:
        future = backend.submit_put_task(key(1), obj)
        assert isinstance(future.exception(timeout=30), PermissionError)
        assert backend.fs.ls(backend.root, detail=False) == []
        assert not backend.contains(key(1)) and obj.get_ref_count() == 1
    finally:
        FailingMemoryFS.fail = False
    assert backend.submit_put_task(key(1), obj).result(timeout=30) is True
    assert load(backend, key(1)) == digest(obj)
    obj.ref_count_down()
    backend.fs.rm(backend.root, recursive=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permissions do not bind root")
def test_a_read_only_directory(open_backend, allocator, tmp_path):
    backend = open_backend()
    directory = tmp_path / "cache"
    directory.chmod(0o555)
    try:
        obj = make(allocator, 1)
        assert isinstance(backend.submit_put_task(key(1), obj).exception(30), PermissionError)
        obj.ref_count_down()
        assert files(directory) == []
    finally:
        directory.chmod(0o755)


# -- plugin protocol ----------------------------------------------------------------------------


def test_options_model():
    options = LocalDiskBackend.Options(path="/tmp/x", max_size_gb=2)
    assert (options.num_writers, options.checksum, options.fsync) == (2, "sum64", False)
    for bad in ({"max_size_gb": 0}, {"checksum": "md5"}, {"num_writers": 0},
                {"unknown": 1}, {"path": None}):
        with pytest.raises(pydantic.ValidationError):
            LocalDiskBackend.Options(**{"path": "/tmp/x", "max_size_gb": 1, **bad})
    with pytest.raises(pydantic.ValidationError):
        LocalDiskBackend.Options(max_size_gb=1)  # path is required
    for name, field in LocalDiskBackend.Options.model_fields.items():
        assert field.description, name


def test_from_options(allocator, tmp_path):
    evicted = []
    options = LocalDiskBackend.Options(path=f"file://{tmp_path}/c", max_size_gb=1,
                                       num_writers=2, checksum="crc32")
    events = TierEvents()
    events.evicted = lambda keys, n: evicted.append(keys)
    backend = LocalDiskBackend.from_options(
        options, None, None, TierContext(tier_name="disk", memory_allocator=allocator,
                                         events=events))
    try:
        assert backend.tier_name == "disk" and backend.checksum == "crc32"
        assert backend.on_evicted is not None and backend.memory_allocator is allocator
        expected = store(backend, allocator, key(1), 1)
        assert load(backend, key(1)) == expected
    finally:
        backend.close()
    with pytest.raises(ValueError, match="memory_allocator"):
        LocalDiskBackend.from_options(options, None, None, TierContext())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_size_gb": 0}, "max_size_gb"), ({"num_writers": 0}, "num_writers"),
     ({"checksum": "md5"}, "checksum")],
)
def test_constructor_rejects_bad_arguments(allocator, tmp_path, kwargs, match):
    args = {"max_size_gb": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        LocalDiskBackend(str(tmp_path), allocator, **args)
