"""Conformance tests of `Serde` (memory objects to bytes and back)."""

from __future__ import annotations

import pytest

from lmcache.abc.memory import MemoryAllocatorInterface
from lmcache.abc.serde import Serde
from lmcache.builtin.allocators.region import HostMemoryAllocator
from lmcache.testing.conformance._util import (
    ROUND_TRIP_CASES,
    assert_same,
    case_id,
    make_chunk,
    snapshot,
)


def _join(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


class SerdeConformance:
    """The serde contract as tests: subclass it in your test suite.

    Provide **one fixture**, ``serde``, an instance of your `Serde`::

        class TestMySerde(SerdeConformance):
            @pytest.fixture
            def serde(self):
                return MySerde(level=3)

    Tested: bit-exact round trips of several dtypes and shapes, ``serialize_parts``
    joined equals ``serialize``, and bytes that are truncated, corrupt, empty or foreign
    decode to ``None`` — never an exception, never wrong data — without leaking the
    allocator's memory.
    """

    @pytest.fixture
    def serde(self) -> Serde:
        raise NotImplementedError(f"{type(self).__name__} must override the serde fixture")

    @pytest.fixture
    def allocator(self):
        allocator = HostMemoryAllocator(16 << 20)
        yield allocator
        assert allocator.num_active_allocations == 0, "a serde leaked a memory object"

    def _encoded(self, serde: Serde, allocator: MemoryAllocatorInterface, seed: int = 1):
        obj = make_chunk(allocator, seed)
        want = snapshot(obj)
        data = bytes(serde.serialize(obj))
        obj.ref_count_down()
        return data, want

    @pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=case_id)
    def test_round_trip_is_bit_exact(self, serde, allocator, case):
        shape, dtype = case
        obj = make_chunk(allocator, 3, shape, dtype)
        want = snapshot(obj)
        data = bytes(serde.serialize(obj))
        assert _join(serde.serialize_parts(obj)) == data
        obj.ref_count_down()
        got = serde.deserialize(data, allocator)
        assert_same(got, want, f"serde round trip of {shape} {dtype}")
        got.ref_count_down()

    def test_deserialize_accepts_any_buffer(self, serde, allocator):
        data, want = self._encoded(serde, allocator)
        for buf in (bytearray(data), memoryview(data)):
            got = serde.deserialize(buf, allocator)
            assert_same(got, want, f"deserialize of a {type(buf).__name__}")
            got.ref_count_down()

    @pytest.mark.parametrize("damage", ["truncate", "corrupt_payload", "corrupt_header",
                                        "empty", "foreign", "appended"])
    def test_bad_bytes_decode_to_none(self, serde, allocator, damage):
        data, _ = self._encoded(serde, allocator)
        bad = bytearray(data)
        if damage == "truncate":
            bad = bad[: len(bad) // 2]
        elif damage == "corrupt_payload":
            bad[-1] ^= 0xFF
            bad[len(bad) * 3 // 4] ^= 0x10
        elif damage == "corrupt_header":
            bad[0] ^= 0xFF
        elif damage == "empty":
            bad = bytearray()
        elif damage == "foreign":
            bad = bytearray(b"\x80\x04not an lmcache value" * 50)
        else:
            bad += b"trailing garbage"
        got = serde.deserialize(bytes(bad), allocator)
        if got is not None:
            got.ref_count_down()
        assert got is None, f"{damage} bytes decoded to a memory object"
