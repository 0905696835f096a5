"""Conformance tests of `StorageBackendInterface` (one tier of the cache)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from lmcache.abc.memory import MemoryAllocatorInterface
from lmcache.abc.storage_backend import StorageBackendInterface
from lmcache.builtin.allocators.region import HostMemoryAllocator
from lmcache.testing.conformance._util import (
    ROUND_TRIP_CASES,
    assert_same,
    case_id,
    make_chunk,
    new_key,
    snapshot,
)

BackendFactory = Callable[..., StorageBackendInterface]

#: The chunk the budget, concurrency and close tests store: 8 KiB of float16.
CHUNK_SHAPE = (2, 2, 16, 64)
CHUNK_BYTES = 2 * 2 * 16 * 64 * 2


def _wait(future: Future | None, timeout: float = 30.0) -> None:
    if future is not None:
        future.result(timeout=timeout)


class StorageBackendConformance:
    """The storage backend contract as tests: subclass it in your test suite.

    Provide **one fixture**, ``backend_factory``: a callable ``make(budget_bytes=None)``
    that opens a backend on this test's storage, allocating what `get_blocking` returns
    from the ``allocator`` fixture::

        class TestMyBackend(StorageBackendConformance):
            @pytest.fixture
            def backend_factory(self, allocator, tmp_path):
                def make(budget_bytes=None):
                    return MyBackend(tmp_path, allocator, max_bytes=budget_bytes or 1 << 30)
                return make

    Every call within one test must open the *same* storage (a persistent backend opened
    twice sees what the first one wrote). The kit closes every backend it made, and fails
    the test if the allocator still has live objects afterwards (a leaked reference).

    Declare optional capabilities as class attributes or by overriding methods:

    ``has_budget = True``
        ``make(budget_bytes=n)`` keeps at most about ``n`` bytes of payload (headers may
        come on top) and evicts to stay under it. Tested: eviction happens, survivors
        are intact, objects that a caller holds are never damaged.
    ``supports_pinning = True``
        The backend has ``pin(key)`` and ``unpin(key)``; a pinned chunk is never
        evicted.
    ``persistent = True``
        What one backend wrote is found by the next one opened on the same storage,
        including writes still pending when the first was closed.
    ``corrupt(backend, key)`` / ``truncate(backend, key)`` / ``lose(backend, key)``
        Damage the stored object of ``key`` behind the backend's back: flip payload
        bytes, cut it short, delete it. A damaged object must be a miss. Tests that need
        a helper you did not override are skipped.

    The ``allocator`` fixture (a 64 MiB `HostMemoryAllocator`) may be overridden too;
    it must report ``num_active_allocations`` for the leak check.
    """

    has_budget: bool = False
    supports_pinning: bool = False
    persistent: bool = False

    # -- what the author provides ----------------------------------------------------------

    @pytest.fixture
    def allocator(self) -> MemoryAllocatorInterface:
        return HostMemoryAllocator(64 << 20)

    @pytest.fixture
    def backend_factory(self, allocator: MemoryAllocatorInterface) -> BackendFactory:
        raise NotImplementedError(
            f"{type(self).__name__} must override the backend_factory fixture")

    def corrupt(self, backend: StorageBackendInterface, key: Any) -> None:
        raise NotImplementedError

    def truncate(self, backend: StorageBackendInterface, key: Any) -> None:
        raise NotImplementedError

    def lose(self, backend: StorageBackendInterface, key: Any) -> None:
        raise NotImplementedError

    # -- the kit's own fixtures ------------------------------------------------------------

    @pytest.fixture
    def open_backend(self, backend_factory: BackendFactory,
                     allocator: MemoryAllocatorInterface) -> Iterator[BackendFactory]:
        made: list[StorageBackendInterface] = []

        def open_(**kwargs: Any) -> StorageBackendInterface:
            backend = backend_factory(**kwargs)
            assert isinstance(backend, StorageBackendInterface), \
                f"backend_factory returned {type(backend).__name__}, not a StorageBackend"
            made.append(backend)
            return backend

        yield open_
        for backend in made:
            backend.close()
        live = getattr(allocator, "num_active_allocations", 0)
        assert live == 0, f"{live} memory objects still allocated after close: a leaked " \
            "reference (a backend must release what it keeps, callers what they get)"

    @pytest.fixture
    def backend(self, open_backend: BackendFactory) -> StorageBackendInterface:
        return open_backend()

    def _damage(self, helper: Callable[..., None], backend: Any, key: Any) -> None:
        try:
            helper(backend, key)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not override {helper.__name__}()")

    def _store(self, backend: StorageBackendInterface, allocator: MemoryAllocatorInterface,
               seed: int, shape: tuple[int, ...] = CHUNK_SHAPE,
               dtype: torch.dtype = torch.float16) -> tuple[Any, tuple[Any, ...]]:
        """Store a fresh random chunk; wait for the write; return (key, snapshot)."""
        key = new_key()
        obj = make_chunk(allocator, seed, shape, dtype)
        want = snapshot(obj)
        future = backend.submit_put_task(key, obj)
        assert future is not None, "submit_put_task skipped the put of a new key"
        obj.ref_count_down()
        _wait(future)
        return key, want

    def _get(self, backend: StorageBackendInterface, key: Any) -> Any:
        obj = backend.get_blocking(key)
        if obj is None:
            return None
        try:
            return snapshot(obj)
        finally:
            obj.ref_count_down()

    # -- round trips -----------------------------------------------------------------------

    @pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=case_id)
    def test_round_trip_is_bit_exact(self, backend, allocator, case):
        shape, dtype = case
        key, want = self._store(backend, allocator, 1, shape, dtype)
        assert backend.contains(key)
        got = backend.get_blocking(key)
        try:
            assert_same(got, want, f"round trip of {shape} {dtype}")
        finally:
            if got is not None:
                got.ref_count_down()

    def test_prefetch_returns_the_chunk(self, backend, allocator):
        key, want = self._store(backend, allocator, 2)
        future = backend.submit_prefetch_task(key)
        assert future is not None, "submit_prefetch_task of a stored key returned None"
        got = future.result(timeout=30)
        try:
            assert_same(got, want, "prefetch")
        finally:
            if got is not None:
                got.ref_count_down()

    def test_unknown_key_is_a_miss(self, backend):
        key = new_key()
        assert not backend.contains(key)
        assert not backend.exists_in_put_tasks(key)
        assert backend.get_blocking(key) is None
        future = backend.submit_prefetch_task(key)
        assert future is None or future.result(timeout=30) is None
        assert backend.remove(key) is False

    def test_remove(self, backend, allocator):
        key, _ = self._store(backend, allocator, 3)
        other, want_other = self._store(backend, allocator, 4)
        assert backend.remove(key) is True
        assert not backend.contains(key) and backend.get_blocking(key) is None
        assert backend.remove(key) is False
        assert_same_and_release(backend, other, want_other)

    def test_put_of_a_stored_key_keeps_the_data(self, backend, allocator):
        key, want = self._store(backend, allocator, 5)
        again = make_chunk(allocator, 5)  # the same bytes, as a real duplicate put is
        _wait(backend.submit_put_task(key, again))
        again.ref_count_down()
        assert_same_and_release(backend, key, want)

    # -- ownership ---------------------------------------------------------------------------

    def test_caller_may_release_right_after_submit(self, backend, allocator):
        """The backend takes its own reference: memory the caller released and the
        allocator handed out again must not leak into the stored chunk."""
        key = new_key()
        obj = make_chunk(allocator, 6)
        want = snapshot(obj)
        future = backend.submit_put_task(key, obj)
        assert future is not None
        obj.ref_count_down()
        scribbles = [make_chunk(allocator, 100 + i) for i in range(8)]
        _wait(future)
        for s in scribbles:
            s.ref_count_down()
        assert_same_and_release(backend, key, want)

    def test_submitted_object_is_released_after_the_write(self, backend, allocator):
        key = new_key()
        obj = make_chunk(allocator, 7)
        _wait(backend.submit_put_task(key, obj))
        # a tier that keeps the object itself (the CPU tier) holds one reference; any
        # other must have given its reference back once the write finished
        assert obj.get_ref_count() in (1, 2), f"ref count {obj.get_ref_count()} after put"
        if obj.get_ref_count() == 2:
            assert backend.remove(key)
            assert obj.get_ref_count() == 1, "remove() did not release the tier's reference"
        obj.ref_count_down()

    def test_get_returns_an_object_the_caller_owns(self, backend, allocator):
        key, want = self._store(backend, allocator, 8)
        got = backend.get_blocking(key)
        assert got is not None and got.get_ref_count() >= 1
        backend.remove(key)
        # the caller's reference keeps the data valid after the chunk left the tier
        assert_same(got, want, "object held across remove")
        got.ref_count_down()

    # -- visibility -------------------------------------------------------------------------

    def test_visible_only_once_written(self, backend, allocator):
        key = new_key()
        obj = make_chunk(allocator, 9)
        want = snapshot(obj)
        future = backend.submit_put_task(key, obj)
        assert future is not None
        obj.ref_count_down()
        # between submit and completion the chunk is pending or complete, never neither
        # (asked in this order: a write that ends between the two calls is then complete)
        assert backend.exists_in_put_tasks(key) or backend.contains(key), \
            "a submitted chunk is neither pending nor stored"
        _wait(future)
        assert backend.contains(key), "contains() is False after the write finished"
        assert not backend.exists_in_put_tasks(key), \
            "exists_in_put_tasks() is still True after the write finished"
        assert_same_and_release(backend, key, want)

    def test_contains_implies_complete_while_writing(self, backend, allocator):
        """A reader that polls during writes never sees a partial chunk."""
        items = []
        for i in range(12):
            obj = make_chunk(allocator, 200 + i)
            items.append((new_key(), obj, snapshot(obj)))
        errors: list[str] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                for key, _, want in items:
                    if backend.contains(key):
                        got = backend.get_blocking(key)
                        if got is None:
                            errors.append(f"{key}: contains() but get_blocking() missed")
                            continue
                        if snapshot(got) != want:
                            errors.append(f"{key}: visible before completely written")
                        got.ref_count_down()

        thread = threading.Thread(target=reader)
        thread.start()
        futures = [backend.submit_put_task(key, obj) for key, obj, _ in items]
        for (_, obj, _), future in zip(items, futures):
            obj.ref_count_down()
            _wait(future)
        stop.set()
        thread.join(timeout=30)
        assert not errors, errors[:3]

    # -- damaged objects are misses ------------------------------------------------------------

    @pytest.mark.parametrize("damage", ["corrupt", "truncate", "lose"])
    def test_damaged_object_is_a_miss(self, backend, allocator, damage):
        key, _ = self._store(backend, allocator, 10)
        other, want_other = self._store(backend, allocator, 11)
        self._damage(getattr(self, damage), backend, key)
        assert backend.get_blocking(key) is None, f"a {damage}ed object was returned"
        future = backend.submit_prefetch_task(key)
        if future is not None:
            got = future.result(timeout=30)
            assert got is None, f"prefetch of a {damage}ed object returned data"
        assert_same_and_release(backend, other, want_other)

    def test_damaged_object_can_be_stored_again(self, backend, allocator):
        key, _ = self._store(backend, allocator, 12)
        self._damage(self.corrupt, backend, key)
        assert backend.get_blocking(key) is None
        obj = make_chunk(allocator, 13)
        want = snapshot(obj)
        future = backend.submit_put_task(key, obj)
        obj.ref_count_down()
        _wait(future)
        got = backend.get_blocking(key)
        if got is not None:  # a backend may refuse the key for a while: a miss, not wrong
            assert_same(got, want, "re-stored after corruption")
            got.ref_count_down()

    # -- budget, eviction, pinning -----------------------------------------------------------

    def _budget_backend(self, open_backend: BackendFactory) -> StorageBackendInterface:
        if not self.has_budget:
            pytest.skip(f"{type(self).__name__} does not declare has_budget")
        return open_backend(budget_bytes=4 * CHUNK_BYTES)

    def test_eviction_keeps_within_budget(self, open_backend, allocator):
        backend = self._budget_backend(open_backend)
        stored = [self._store(backend, allocator, 300 + i) for i in range(16)]
        present = [(k, w) for k, w in stored if backend.contains(k)]
        assert len(present) < len(stored), "16 chunks fit a budget of 4: nothing evicted"
        assert present, "everything was evicted"
        assert stored[-1][0] in dict(present), "the newest chunk was evicted"
        for key, want in present:
            got = backend.get_blocking(key)
            if got is not None:  # evicted between contains and get: a miss is fine
                assert_same(got, want, "survivor of eviction")
                got.ref_count_down()

    def test_held_objects_survive_eviction(self, open_backend, allocator):
        backend = self._budget_backend(open_backend)
        key, want = self._store(backend, allocator, 400)
        held = backend.get_blocking(key)
        assert held is not None
        for i in range(16):
            self._store(backend, allocator, 401 + i)
        assert held.is_valid(), "an object the caller holds was freed by eviction"
        assert_same(held, want, "held object after eviction")
        held.ref_count_down()

    def test_pinned_chunk_is_never_evicted(self, open_backend, allocator):
        backend = self._budget_backend(open_backend)
        if not self.supports_pinning:
            pytest.skip(f"{type(self).__name__} does not declare supports_pinning")
        key, want = self._store(backend, allocator, 500)
        assert backend.pin(key)
        for i in range(16):
            self._store(backend, allocator, 501 + i)
        assert backend.contains(key), "a pinned chunk was evicted"
        assert_same_and_release(backend, key, want)
        assert backend.unpin(key)
        for i in range(16):
            self._store(backend, allocator, 601 + i)
        assert not backend.contains(key), "an unpinned old chunk was never evicted"

    # -- concurrency ---------------------------------------------------------------------------

    def test_concurrent_puts_and_gets(self, backend, allocator):
        errors: list[str] = []
        done: dict[Any, tuple[Any, ...]] = {}
        lock = threading.Lock()

        def worker(w: int) -> None:
            try:
                for i in range(8):
                    key, want = self._store(backend, allocator, 1000 * w + i)
                    with lock:
                        done[key] = want
                        sample = list(done.items())[-4:]
                    for k, v in sample:
                        got = self._get(backend, k)
                        if got != v:
                            errors.append(f"worker {w}: {k} read back wrong or missing")
            except Exception as exc:  # reported below, with the worker that raised
                errors.append(f"worker {w}: {exc!r}")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:3]
        for key, want in done.items():
            assert self._get(backend, key) == want

    # -- close ---------------------------------------------------------------------------------

    def test_close_finishes_pending_writes_and_is_idempotent(self, open_backend, allocator):
        backend = open_backend()
        items = []
        for i in range(8):
            key, obj = new_key(), make_chunk(allocator, 700 + i)
            items.append((key, snapshot(obj), backend.submit_put_task(key, obj)))
            obj.ref_count_down()
        backend.close()
        backend.close()
        for _, _, future in items:
            assert future is None or future.done(), "close() returned before a write ended"
        if not self.persistent:
            return
        reopened = open_backend()
        for key, want, future in items:
            if future is not None:
                assert_same_and_release(reopened, key, want)

    def test_reopen_finds_what_was_stored(self, open_backend, allocator):
        if not self.persistent:
            pytest.skip(f"{type(self).__name__} does not declare persistent")
        first = open_backend()
        stored = [self._store(first, allocator, 800 + i) for i in range(3)]
        first.close()
        second = open_backend()
        for key, want in stored:
            assert second.contains(key), "a chunk written before close() is gone"
            assert_same_and_release(second, key, want)


def assert_same_and_release(backend: StorageBackendInterface, key: Any,
                            want: tuple[Any, ...]) -> None:
    got = backend.get_blocking(key)
    try:
        assert_same(got, want, str(key))
    finally:
        if got is not None:
            got.ref_count_down()
