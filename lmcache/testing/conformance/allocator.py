"""Conformance tests of `MemoryAllocatorInterface` and the `MemoryObj` life cycle."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache.abc.memory import (
    DoubleFreeError,
    InvalidMemoryObjError,
    MemoryAllocatorInterface,
    MemoryFormat,
)
from lmcache.testing.conformance._util import ROUND_TRIP_CASES, case_id, fill_random


class AllocatorConformance:
    """The allocator contract as tests: subclass it in your test suite.

    Provide **one fixture**, ``allocator``: a fresh allocator able to hand out at least
    ``min_capacity`` bytes (4 MiB by default) of tensor memory::

        class TestMyAllocator(AllocatorConformance):
            @pytest.fixture
            def allocator(self):
                return MyAllocator(16 << 20)

    Capabilities, as class attributes:

    ``has_budget = True`` (default)
        The allocator reserves its memory up front and reports `capacity`; allocating
        more than that returns ``None`` (never raises), and freeing makes room again.
    ``formats``
        The memory formats it must serve (default KV_BLOB, BINARY, UNDEFINED).
    ``device``
        Where its tensors live (``"cpu"``; ``"cuda"`` for device memory: mark the class
        ``@pytest.mark.gpu``).

    Tested: fresh objects have reference count 1 and the requested shape, dtype and
    format; payloads do not overlap; the last ``ref_count_down`` frees (accounting back to
    zero, the object invalid, its `tensor` None); over-release raises `DoubleFreeError`;
    a pin holds a reference; malformed requests raise ``ValueError``; allocation from
    several threads.
    """

    has_budget: bool = True
    min_capacity: int = 4 << 20
    formats: tuple[MemoryFormat, ...] = (MemoryFormat.KV_BLOB, MemoryFormat.BINARY,
                                         MemoryFormat.UNDEFINED)
    device: str = "cpu"

    @pytest.fixture
    def allocator(self) -> MemoryAllocatorInterface:
        raise NotImplementedError(f"{type(self).__name__} must override the allocator fixture")

    @pytest.fixture(autouse=True)
    def _no_leaks(self, allocator):
        yield
        assert allocator.num_active_allocations == 0, "objects still allocated after the test"
        assert allocator.allocated_bytes == 0, "bytes still reserved after the test"

    def test_fresh_object(self, allocator):
        for fmt in self.formats:
            obj = allocator.allocate((2, 3, 4, 8), torch.float16, fmt)
            assert obj is not None
            assert obj.get_ref_count() == 1 and obj.is_valid() and not obj.is_pinned
            assert tuple(obj.get_shape()) == (2, 3, 4, 8)
            assert obj.get_dtype() == torch.float16
            assert obj.get_memory_format() == fmt
            assert obj.tensor.shape == (2, 3, 4, 8) and obj.tensor.dtype == torch.float16
            assert obj.tensor.device.type == torch.device(self.device).type
            assert obj.get_size() >= 2 * 3 * 4 * 8 * 2
            assert allocator.num_active_allocations == 1
            obj.ref_count_down()

    @pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=case_id)
    def test_payloads_do_not_overlap(self, allocator, case):
        shape, dtype = case
        objs = [allocator.allocate(shape, dtype, MemoryFormat.KV_BLOB) for _ in range(4)]
        assert all(o is not None for o in objs)
        for i, o in enumerate(objs):
            fill_random(o.tensor, i)
        for i, o in enumerate(objs):
            want = torch.empty_like(o.tensor)
            fill_random(want, i)
            assert torch.equal(o.tensor.view(torch.uint8), want.view(torch.uint8)), \
                "one object's payload was overwritten by another's"
        for o in objs:
            o.ref_count_down()

    def test_last_release_frees(self, allocator):
        obj = allocator.allocate((64,), torch.float32, MemoryFormat.KV_BLOB)
        obj.ref_count_up()
        assert obj.get_ref_count() == 2
        obj.ref_count_down()
        assert obj.is_valid() and allocator.num_active_allocations == 1
        obj.ref_count_down()
        assert not obj.is_valid()
        assert allocator.num_active_allocations == 0 and allocator.allocated_bytes == 0
        assert obj.tensor is None  # the seed's answer: never a view of reused memory
        with pytest.raises(InvalidMemoryObjError):
            obj.ref_count_up()
        with pytest.raises(DoubleFreeError):
            obj.ref_count_down()

    def test_pin_holds_a_reference(self, allocator):
        obj = allocator.allocate((64,), torch.float32, MemoryFormat.KV_BLOB)
        obj.pin()
        assert obj.is_pinned
        obj.ref_count_down()  # the owner lets go; the pin keeps it alive
        assert obj.is_valid() and allocator.num_active_allocations == 1
        obj.unpin()
        assert not obj.is_valid() and allocator.num_active_allocations == 0
        with pytest.raises(DoubleFreeError):
            obj.unpin()

    def test_malformed_requests_raise_value_error(self, allocator):
        with pytest.raises(ValueError):
            allocator.allocate((-1, 4), torch.float16, MemoryFormat.KV_BLOB)
        with pytest.raises(ValueError):
            allocator.allocate((4, 4), None, MemoryFormat.KV_BLOB)

    def test_running_out_is_none_and_freeing_makes_room(self, allocator):
        if not self.has_budget:
            pytest.skip(f"{type(self).__name__} does not declare has_budget")
        capacity = allocator.capacity
        assert capacity >= self.min_capacity
        piece = max(capacity // 4, 1)
        held = []
        while True:
            obj = allocator.allocate((piece,), torch.uint8, MemoryFormat.KV_BLOB)
            if obj is None:
                break
            held.append(obj)
            assert len(held) <= 8, "the allocator hands out more than its capacity"
        assert 1 <= len(held) <= 4
        assert allocator.allocate((capacity + 1,), torch.uint8, MemoryFormat.KV_BLOB) is None
        held.pop().ref_count_down()
        again = allocator.allocate((piece,), torch.uint8, MemoryFormat.KV_BLOB)
        assert again is not None, "freed memory is not handed out again"
        held.append(again)
        for obj in held:
            obj.ref_count_down()

    def test_concurrent_allocation(self, allocator):
        errors: list[str] = []

        def worker(w: int) -> None:
            try:
                for _ in range(50):
                    obj = allocator.allocate((16, 64), torch.float16, MemoryFormat.KV_BLOB)
                    if obj is None:
                        continue
                    obj.tensor.fill_(w)
                    obj.ref_count_up()
                    obj.ref_count_down()
                    if not bool((obj.tensor == w).all()):
                        errors.append(f"worker {w}: payload changed under it")
                    obj.ref_count_down()
            except Exception as exc:
                errors.append(f"worker {w}: {exc!r}")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:3]
