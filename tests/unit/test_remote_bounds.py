"""The remote kernel's bounds over a transport that never answers (no servers needed).

Every call of `RemoteBackend` ends within `RemoteBackend.bound_s` even when each
transport call hangs until the test lets it go: lookups, gets, removes, a prefetch's
future, puts and their futures, ``close``. Results that come after the caller gave up are
released, hung writes free their backlog slots, stuck threads are replaced (a bounded
number of them) and are daemons, so a process exits with calls still hung. The real
servers (SeaweedFS, redis-server) are in tests/integration/test_remote_bounds.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.serde import NaiveSerde
from lmcache.kits.remote import BOUND_SLACK_S, RemoteBackend
from lmcache.utils import CacheEngineKey

REPO = str(Path(__file__).resolve().parents[2])
TIMEOUT_S = 0.3
SHAPE = (2, 2, 16, 2, 16)


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "org/model", 1, 0, f"{i:064x}")


class GatedTransport(RemoteTransport):
    """Values in a dict; while ``gate`` is closed every call waits for it (forever, if
    the test never opens it) -- a frozen server without any timeout of its own."""

    description = "gated"

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0
        self.returned = 0
        self._lock = threading.Lock()

    def _wait(self) -> None:
        with self._lock:
            self.calls += 1
        self.gate.wait()
        with self._lock:
            self.returned += 1

    def object_name(self, key_string: str) -> str:
        return key_string

    def put(self, name: str, parts: Sequence) -> None:
        self._wait()
        self.values[name] = b"".join(bytes(p) for p in parts)

    def get(self, name: str, max_bytes: int | None = None):
        self._wait()
        return self.values.get(name)

    def exists(self, name: str) -> bool:
        self._wait()
        return name in self.values

    def delete(self, name: str) -> bool:
        self._wait()
        return self.values.pop(name, None) is not None


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(16 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"


@pytest.fixture
def gated():
    transport = GatedTransport()
    yield transport
    transport.gate.set()  # let every hung call end


def chunk(allocator, seed: int):
    obj = allocator.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_BLOB)
    obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
                     .to(torch.bfloat16))
    return obj


def open_backend(transport, allocator, **options) -> RemoteBackend:
    options = {"timeout_s": TIMEOUT_S, "retry_interval_s": 0.0, "max_retry_interval_s": 0.0,
               "num_workers": 2, **options}
    return RemoteBackend(transport, NaiveSerde(), allocator, **options)


def took(fn) -> tuple[float, object]:
    started = time.monotonic()
    result = fn()
    return time.monotonic() - started, result


def settle(allocator, transport, within: float = 5.0) -> None:
    """Open the gate and wait until every hung call has returned (and its thread has
    released what it held)."""
    transport.gate.set()
    deadline = time.monotonic() + within
    while transport.returned < transport.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the done callbacks after the last return


def test_the_bound(gated, allocator):
    backend = open_backend(gated, allocator)
    assert backend.bound_s == TIMEOUT_S + BOUND_SLACK_S == TIMEOUT_S + 0.5
    backend.close()


def test_every_call_ends_within_the_bound_while_the_transport_hangs(gated, allocator):
    backend = open_backend(gated, allocator)
    obj = chunk(allocator, 1)
    assert backend.submit_put_task(key(1), obj).result(timeout=5) is True
    backend._known.clear()
    bound = backend.bound_s
    gated.gate.clear()
    for _ in range(2):  # retry_interval_s=0: every call goes to the hung transport
        seconds, found = took(lambda: backend.contains(key(1)))
        assert seconds <= bound and found is False
        seconds, got = took(lambda: backend.get_blocking(key(1)))
        assert seconds <= bound and got is None
        seconds, removed = took(lambda: backend.remove(key(2)))
        assert seconds <= bound and removed is False
        started = time.monotonic()
        future = backend.submit_prefetch_task(key(1))
        assert future is not None and future.result(timeout=5) is None
        assert time.monotonic() - started <= bound
    stats = backend.stats
    assert stats.timeouts == 8 and stats.hits == 0  # late answers are not counted
    settle(allocator, gated)  # the late gets answer: their objects are released
    assert allocator.num_active_allocations == 1  # ours
    obj.ref_count_down()
    backend.close()


def test_a_hung_write_fails_its_future_and_frees_its_slot(gated, allocator):
    backend = open_backend(gated, allocator, max_pending_puts=2)
    objs = [chunk(allocator, i) for i in range(6)]
    gated.gate.clear()
    started = time.monotonic()
    first = [backend.submit_put_task(key(i), objs[i]) for i in range(2)]
    assert time.monotonic() - started < 0.05  # returns at once
    assert backend.submit_put_task(key(2), objs[2]) is None  # the backlog is full
    for future in first:
        with pytest.raises(TimeoutError):
            future.result(timeout=5)
    assert time.monotonic() - started <= backend.bound_s
    assert not backend.exists_in_put_tasks(key(0))  # the slots are free again
    stats = backend.stats
    assert stats.dropped_puts == 3 and stats.puts == 0
    # the chunks stay referenced while the transport may still read them ...
    assert all(o.get_ref_count() == 2 for o in objs[:2])
    # ... and later puts are taken (by other threads) while those writes hang
    later = backend.submit_put_task(key(3), objs[3])
    assert later is not None
    with pytest.raises(TimeoutError):
        later.result(timeout=5)
    settle(allocator, gated)
    deadline = time.monotonic() + 5
    while any(o.get_ref_count() != 1 for o in objs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(o.get_ref_count() == 1 for o in objs)  # released when the calls returned
    assert key(0).to_string() in gated.values  # a late write is not undone
    stats = backend.stats
    assert stats.puts == 0 and stats.dropped_puts == 4  # counted once each
    backend.close()
    for o in objs:
        o.ref_count_down()


def test_queued_writes_are_dropped_when_the_store_fails(gated, allocator):
    backend = open_backend(gated, allocator, num_workers=1)
    objs = [chunk(allocator, i) for i in range(4)]
    gated.gate.clear()
    futures = [backend.submit_put_task(key(i), o) for i, o in enumerate(objs)]
    # the first write hangs; when it times out the store is down and the other three,
    # which never started, are dropped with it
    for future in futures:
        with pytest.raises((TimeoutError, ConnectionError)):
            future.result(timeout=backend.bound_s)
    assert all(o.get_ref_count() == 1 for o in objs[1:])  # released at once
    assert gated.calls == 1
    settle(allocator, gated)
    backend.close()
    for o in objs:
        o.ref_count_down()


def test_close_gives_up_on_hung_writes_within_the_bound(gated, allocator):
    backend = open_backend(gated, allocator)
    objs = [chunk(allocator, i) for i in range(6)]
    gated.gate.clear()
    futures = [backend.submit_put_task(key(i), o) for i, o in enumerate(objs)]
    prefetch = backend.submit_prefetch_task(key(9))
    seconds, _ = took(backend.close)
    assert seconds <= backend.bound_s
    for future in futures:
        assert future.done() and future.exception() is not None
    assert prefetch.done() and prefetch.result() is None
    stats = backend.stats
    assert stats.puts == 0 and stats.dropped_puts == 6
    assert backend.submit_put_task(key(7), objs[0]) is None  # closed
    settle(allocator, gated)
    deadline = time.monotonic() + 5
    while any(o.get_ref_count() != 1 for o in objs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(o.get_ref_count() == 1 for o in objs)
    for o in objs:
        o.ref_count_down()


def test_stuck_threads_are_daemons_and_bounded(gated, allocator):
    backend = open_backend(gated, allocator, num_workers=2)
    gated.gate.clear()
    for i in range(5):
        backend.contains(key(i))
        backend.submit_prefetch_task(key(i))
    time.sleep(TIMEOUT_S + 0.2)
    threads = [t for t in threading.enumerate() if t.name.startswith("remote-")]
    assert threads and all(t.daemon for t in threads)
    assert backend._io.threads <= 2 * 2  # num_workers serving, as many stuck
    seconds, _ = took(backend.close)
    assert seconds <= backend.bound_s
    settle(allocator, gated)


def test_a_process_exits_with_calls_hung_forever():
    program = textwrap.dedent("""
        import threading, time, torch
        from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
        from lmcache.experimental.storage_backend.serde import NaiveSerde
        from lmcache.kits.remote import RemoteBackend
        from lmcache.utils import CacheEngineKey
        from tests.unit.test_remote_bounds import GatedTransport
        transport = GatedTransport()
        transport.gate.clear()  # never opened
        allocator = HostMemoryAllocator(1 << 20)
        backend = RemoteBackend(transport, NaiveSerde(), allocator, timeout_s=0.2)
        obj = allocator.allocate((2, 2, 16, 2, 16), torch.bfloat16, MemoryFormat.KV_BLOB)
        keys = [CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}") for i in range(8)]
        for k in keys:
            backend.submit_put_task(k, obj)
        backend.contains(keys[0])
        backend.close()
        print("closed", time.monotonic(), flush=True)
    """)
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    exited = time.monotonic()
    assert child.returncode == 0, child.stderr[-3000:]
    closed_at = float(child.stdout.split()[-1])
    assert exited - closed_at < 2.0, child.stderr[-3000:]
