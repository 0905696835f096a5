"""The self-describing stored object: header round trips, foreign bytes, payload checks."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.object_format import (
    CHECKSUM_ALGORITHMS,
    CHECKSUM_BLOCK,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    ObjectHeader,
    PayloadHasher,
    build_header,
    decode_header,
    encode_header,
    payload_checksum,
    read_object,
    verify_payload,
)

DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
]
TENSOR_FORMATS = [MemoryFormat.UNDEFINED, MemoryFormat.KV_BLOB, MemoryFormat.BINARY]
MASK64 = (1 << 64) - 1


def random_bytes(n: int, seed: int = 0) -> bytearray:
    return bytearray(random.Random(seed).randbytes(n))


def reference_sum64(data: bytes) -> int:
    # The documented definition, in plain Python integers.
    data = bytes(data) + b"\0" * (-len(data) % 8)
    words = [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]
    rows = [sum(words[i : i + 1024]) % (1 << 64) for i in range(0, len(words), 1024)]
    a = sum(rows) & MASK64
    b = sum((j + 1) * r for j, r in enumerate(rows)) & MASK64
    return (a + 2 * b) & MASK64


def raw_header(**overrides: object) -> bytearray:
    # A header built field by field (with a valid header checksum), to forge bad ones.
    f = {"magic": MAGIC, "version": FORMAT_VERSION, "algo": 1, "fmt": 1, "dtype": 1, "ndim": 2,
         "shape": [4, 8], "length": 64, "checksum": 0}
    f.update(overrides)
    shape = list(f["shape"]) + [0] * (8 - len(f["shape"]))
    buf = bytearray(HEADER_SIZE)
    struct.pack_into("<8sHBBBB8QQQ", buf, 0, f["magic"], f["version"], f["algo"], f["fmt"],
                     f["dtype"], f["ndim"], *shape, f["length"], f["checksum"])
    struct.pack_into("<I", buf, HEADER_SIZE - 4, zlib.crc32(buf[: HEADER_SIZE - 4]))
    return buf


# -- header round trips ------------------------------------------------------------------


def test_header_size_keeps_the_payload_aligned():
    assert HEADER_SIZE % 64 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", TENSOR_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_header_round_trip(dtype, fmt, algorithm):
    shape = (2, 3, 5, 7)
    payload = random_bytes(2 * 3 * 5 * 7 * dtype.itemsize)
    head = build_header(fmt, dtype, shape, payload, algorithm)
    assert len(head) == HEADER_SIZE
    header = decode_header(head)
    assert header == ObjectHeader(fmt, dtype, torch.Size(shape), len(payload), algorithm,
                                  payload_checksum(payload, algorithm))
    assert header.total_size == HEADER_SIZE + len(payload)
    assert verify_payload(header, payload)


def test_byte_buffer_without_dtype_round_trips():
    payload = random_bytes(1000)
    header = decode_header(build_header(MemoryFormat.BINARY_BUFFER, None, (1000,), payload))
    assert header is not None
    assert (header.fmt, header.dtype, header.shape) == (MemoryFormat.BINARY_BUFFER, None, (1000,))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 5), (1,) * 8])
def test_edge_shapes_round_trip(shape):
    n = 1
    for d in shape:
        n *= d
    header = decode_header(build_header(MemoryFormat.KV_BLOB, torch.int16, shape,
                                        random_bytes(2 * n)))
    assert header is not None and header.shape == torch.Size(shape)
    assert header.payload_length == 2 * n


def test_encode_header_of_a_memory_obj():
    allocator = HostMemoryAllocator(1 << 20)
    obj = allocator.allocate((2, 4, 16, 8), torch.bfloat16, MemoryFormat.KV_BLOB)
    obj.tensor.copy_(torch.randn(2, 4, 16, 8))
    header = decode_header(encode_header(obj))
    assert (header.fmt, header.dtype, header.shape) == (
        MemoryFormat.KV_BLOB, torch.bfloat16, torch.Size([2, 4, 16, 8]))
    assert verify_payload(header, obj.byte_array)
    obj.ref_count_down()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((MemoryFormat.KV_BLOB, torch.complex64, (2,), bytes(16)), "cannot store dtype"),
        ((MemoryFormat.KV_BLOB, torch.uint8, (1,) * 9, bytes(1)), "at most 8"),
        ((MemoryFormat.KV_BLOB, torch.float32, (4,), bytes(15)), "needs 16"),
        ((MemoryFormat.KV_BLOB, torch.uint8, (-1,), bytes(0)), "non-negative"),
        (("KV_BLOB", torch.uint8, (1,), bytes(1)), "MemoryFormat"),
    ],
)
def test_build_header_rejects_what_cannot_be_stored(args, match):
    with pytest.raises(ValueError, match=match):
        build_header(*args)


def test_unknown_algorithm_is_a_value_error():
    with pytest.raises(ValueError, match="sum64"):
        build_header(MemoryFormat.KV_BLOB, torch.uint8, (1,), b"x", "md5")
    with pytest.raises(ValueError, match="crc32"):
        payload_checksum(b"x", "md5")


# -- foreign or damaged headers -----------------------------------------------------------


def test_forged_header_helper_is_valid():
    assert decode_header(raw_header()) is not None


@given(st.binary(max_size=2 * HEADER_SIZE))
def test_garbage_is_never_a_header(data):
    assert decode_header(data) is None
    assert decode_header(MAGIC + data) is None


@pytest.mark.parametrize("data", [None, 42, "LMCKVOBJ", object()])
def test_non_buffers_are_not_headers(data):
    assert decode_header(data) is None


def test_truncated_header_is_rejected():
    head = build_header(MemoryFormat.KV_BLOB, torch.uint8, (4,), b"abcd")
    for n in range(HEADER_SIZE):
        assert decode_header(head[:n]) is None


def test_every_flipped_header_bit_is_rejected():
    head = build_header(MemoryFormat.KV_BLOB, torch.float16, (2, 8), bytes(32))
    for i in range(HEADER_SIZE * 8):
        damaged = bytearray(head)
        damaged[i // 8] ^= 1 << (i % 8)
        assert decode_header(damaged) is None, f"bit {i}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"magic": b"LMCKVOBX"},
        {"version": 1},  # before key digests: an old object is foreign
        {"version": 3},
        {"version": 0},
        {"algo": 0},
        {"algo": 99},
        {"fmt": 200},
        {"dtype": 12},
        {"dtype": 255},
        {"ndim": 9, "shape": [1] * 8},
        {"ndim": 1, "shape": [4, 8]},  # a non-zero dimension beyond ndim
        {"length": 63},  # not prod(shape) * itemsize
        {"length": 1 << 62, "shape": [1 << 30, 1 << 31]},  # oversize
        {"ndim": 8, "shape": [(1 << 64) - 1] * 8, "length": 0},  # would overflow
    ],
    ids=repr,
)
def test_inconsistent_headers_are_foreign(overrides):
    assert decode_header(raw_header(**overrides)) is None


def test_payload_limit_is_enforced():
    head = build_header(MemoryFormat.KV_BLOB, torch.uint8, (4096,), bytes(4096))
    assert decode_header(head, max_payload=4096) is not None
    assert decode_header(head, max_payload=4095) is None


# -- payload checksums --------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 8191, 8192, 8193, 3 * 8192 + 13])
def test_sum64_matches_its_definition(n):
    # Random words overflow the 64-bit sums, so this also checks wrapping arithmetic.
    data = random_bytes(n, seed=n)
    assert payload_checksum(data, "sum64") == reference_sum64(data)
    assert payload_checksum(bytes(data), "sum64") == reference_sum64(data)  # read-only path


def test_sum64_of_extreme_words_wraps():
    data = struct.pack("<2048q", *([-(1 << 63), (1 << 63) - 1] * 1024))
    assert payload_checksum(data, "sum64") == reference_sum64(data)


def test_crc32_is_zlib():
    data = random_bytes(10_000)
    assert payload_checksum(data, "crc32") == zlib.crc32(data)


def test_checksum_accepts_typed_buffers():
    t = torch.arange(5000, dtype=torch.float32)
    raw = bytes(t.numpy().tobytes())
    assert payload_checksum(memoryview(t.numpy()), "sum64") == payload_checksum(raw, "sum64")


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_hashing_in_pieces_gives_the_same_checksum(algorithm, blocks):
    data = random_bytes(11 * CHECKSUM_BLOCK + 123, seed=blocks)
    hasher = PayloadHasher(algorithm)
    step = blocks * CHECKSUM_BLOCK
    for start in range(0, len(data), step):
        hasher.update(memoryview(data)[start : start + step])
    assert hasher.digest() == payload_checksum(data, algorithm)


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_only_the_last_piece_may_be_partial(algorithm):
    hasher = PayloadHasher(algorithm).update(bytes(CHECKSUM_BLOCK + 8))
    hasher.update(b"")  # nothing more is fine
    with pytest.raises(ValueError, match="last piece"):
        hasher.update(bytes(CHECKSUM_BLOCK))


def test_build_header_with_a_precomputed_checksum():
    data = random_bytes(3 * CHECKSUM_BLOCK)
    checksum = PayloadHasher().update(data).digest()
    head = build_header(MemoryFormat.KV_BLOB, torch.uint8, (len(data),), data, checksum=checksum)
    assert head == build_header(MemoryFormat.KV_BLOB, torch.uint8, (len(data),), data)
    with pytest.raises(ValueError, match="64 bits"):
        build_header(MemoryFormat.KV_BLOB, torch.uint8, (1,), b"x", checksum=1 << 64)


PAYLOAD_SIZE = 64 * 1024 + 13  # full rows, a partial row and a partial word


@pytest.fixture(scope="module")
def payload():
    return random_bytes(PAYLOAD_SIZE, seed=1)


def header_for(data: bytes | bytearray, algorithm: str) -> ObjectHeader:
    header = decode_header(build_header(MemoryFormat.KV_BLOB, torch.uint8, (len(data),), data,
                                        algorithm))
    assert header is not None
    return header


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, PAYLOAD_SIZE * 8 - 1), algorithm=st.sampled_from(["sum64", "crc32"]))
def test_any_flipped_payload_bit_is_detected(position, algorithm):
    data = random_bytes(PAYLOAD_SIZE, seed=1)
    header = header_for(data, algorithm)
    data[position // 8] ^= 1 << (position % 8)
    assert not verify_payload(header, data)


@settings(max_examples=200, deadline=None)
@given(word=st.integers(0, PAYLOAD_SIZE // 8 - 1), value=st.integers(0, (1 << 64) - 1))
def test_any_single_word_change_is_detected_by_sum64(word, value):
    data = random_bytes(PAYLOAD_SIZE, seed=1)
    header = header_for(data, "sum64")
    old = data[word * 8 : word * 8 + 8]
    new = value.to_bytes(8, "little")
    data[word * 8 : word * 8 + 8] = new
    assert verify_payload(header, data) == (old == new)


def test_top_bit_of_first_word_is_detected_by_sum64():
    # A change by 2**63 cancels in a plain A + B combination; A + 2B keeps it.
    data = bytearray(8192)
    header = header_for(data, "sum64")
    data[7] ^= 0x80
    assert not verify_payload(header, data)


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_zeroed_page_is_detected(payload, algorithm):
    header = header_for(payload, algorithm)
    for page in range(PAYLOAD_SIZE // 4096):
        data = bytearray(payload)
        data[page * 4096 : (page + 1) * 4096] = bytes(4096)
        assert not verify_payload(header, data), page


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_swapped_rows_are_detected(payload, algorithm):
    header = header_for(payload, algorithm)
    row = 8192
    for i, j in [(0, 1), (0, 7), (2, 5), (6, 7)]:
        data = bytearray(payload)
        data[i * row : (i + 1) * row], data[j * row : (j + 1) * row] = (
            payload[j * row : (j + 1) * row], payload[i * row : (i + 1) * row])
        assert not verify_payload(header, data), (i, j)


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_truncation_and_extension_are_detected(payload, algorithm):
    header = header_for(payload, algorithm)
    assert verify_payload(header, payload)
    for data in (payload[:-1], payload[:-8], payload[:4096], b"", payload + b"\0"):
        assert not verify_payload(header, data)


def test_verify_payload_never_raises_on_odd_input(payload):
    header = header_for(payload, "sum64")
    assert verify_payload(header, None) is False


# -- read_object ----------------------------------------------------------------------------


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(1 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0
    assert allocator.allocated_bytes == 0


def stored(dtype=torch.float16, shape=(2, 4, 16, 8), algorithm="sum64") -> tuple[bytes, bytes]:
    payload = bytes(random_bytes(torch.Size(shape).numel() * dtype.itemsize, seed=2))
    return build_header(MemoryFormat.KV_BLOB, dtype, shape, payload, algorithm), payload


@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_read_object_round_trip(allocator, algorithm):
    head, payload = stored(algorithm=algorithm)
    obj = read_object(io.BytesIO(head + payload), allocator)
    assert obj is not None
    assert bytes(obj.byte_array) == payload
    assert obj.get_shape() == torch.Size([2, 4, 16, 8]) and obj.get_dtype() == torch.float16
    assert obj.get_memory_format() == MemoryFormat.KV_BLOB
    obj.ref_count_down()


class ReadOnly:
    # A file-like object without readinto.
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 1000))


def test_read_object_from_a_reader_without_readinto(allocator):
    head, payload = stored()
    obj = read_object(ReadOnly(head + payload), allocator)
    assert obj is not None and bytes(obj.byte_array) == payload
    obj.ref_count_down()


@pytest.mark.parametrize("damage", ["truncated", "trailing", "corrupt", "foreign", "empty"])
def test_read_object_rejects_bad_objects(allocator, damage):
    head, payload = stored()
    data = bytearray(head + payload)
    if damage == "truncated":
        data = data[:-1]
    elif damage == "trailing":
        data += b"\0"
    elif damage == "corrupt":
        data[HEADER_SIZE + 100] ^= 1
    elif damage == "foreign":
        data = random_bytes(len(data))
    else:
        data = bytearray()
    assert read_object(io.BytesIO(bytes(data)), allocator) is None


def test_read_object_when_the_allocator_is_full():
    allocator = HostMemoryAllocator(4096)
    head, payload = stored(shape=(2, 4, 64, 8))  # 8 KiB > 4 KiB
    assert read_object(io.BytesIO(head + payload), allocator) is None
    assert allocator.num_active_allocations == 0


def test_read_object_frees_on_io_error(allocator):
    head, payload = stored()

    class Failing(io.BytesIO):
        def readinto(self, b):  # the header reads fine, the payload fails
            if self.tell() >= HEADER_SIZE:
                raise OSError("EIO")
            return super().readinto(b)

    with pytest.raises(OSError, match="EIO"):
        read_object(Failing(head + payload), allocator)
