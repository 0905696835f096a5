"""The self-describing stored object: one chunk as a fixed header followed by its payload.

Every tier below the CPU (the disk tier, remote stores) keeps a chunk as one
contiguous byte string::

    offset  size  field (little-endian)
         0     8  magic  b"LMCKVOBJ"
         8     2  format version (u16), currently 2 (1 had no key digest)
        10     1  checksum algorithm id (u8): 1 = "sum64", 2 = "crc32"
        11     1  MemoryFormat value (u8)
        12     1  dtype code (u8), from a fixed table (0 = no dtype: a byte buffer)
        13     1  ndim (u8), at most 8
        14    64  shape: 8 x u64, unused dimensions zero
        78     8  payload length in bytes (u64) == prod(shape) * itemsize
        86     8  payload checksum (u64)
        94    16  key digest: the first 16 bytes of sha256(key string) of the chunk the
                  object was stored under (all zero: stored under no key)
       110    14  reserved, zero
       124     4  header checksum (u32): zlib.crc32 of bytes [0, 124)
       128     -  payload

`HEADER_SIZE` is 128, so the payload starts 64-byte aligned. Nothing here executes
what it reads (no pickle, no eval): the dtype is a code in a fixed table.

Reading untrusted bytes never raises: `decode_header` returns ``None`` for
anything that is not a well-formed header of a version and table this module knows (a
*foreign* object), and checks every size before trusting it. `verify_payload`
returns ``False`` for a payload of the wrong length or checksum.

An object read for a key is that key's chunk only if its key digest is the key's
(`ObjectHeader.problem`): a valid object copied or renamed onto another chunk's name is
a miss, not that chunk's KV. And it is *this engine's* chunk only if its format, dtype
and shape are ones the engine stores (a `lmcache.abc.storage_backend.ChunkSpec`); the
check is made on the header, before any memory is allocated for the payload.

Payload checksums (``sum64``, ``crc32``) are those of `lmcache.kits.checksum`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmcache.abc.memory import MemoryFormat
from lmcache.kits.checksum import (
    ALGORITHM_IDS,
    ALGORITHM_NAMES,
    CHECKSUM_ALGORITHMS,
    CHECKSUM_BLOCK,
    MASK64,
    PayloadHasher,
    as_bytes_view,
    payload_checksum,
    unknown_algorithm,
)

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec
    from lmcache.utils import CacheEngineKey

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "CHECKSUM_BLOCK",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_DIGEST_SIZE",
    "NO_KEY",
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "ObjectHeader",
    "PayloadHasher",
    "allocate_for",
    "byte_view",
    "build_header",
    "decode_header",
    "encode_header",
    "key_digest",
    "known_checksum",
    "payload_checksum",
    "read_object",
    "verify_payload",
]

MAGIC = b"LMCKVOBJ"
FORMAT_VERSION = 2
HEADER_SIZE = 128
KEY_DIGEST_SIZE = 16
#: The key digest of an object stored under no key.
NO_KEY = bytes(KEY_DIGEST_SIZE)
MAX_NDIM = 8
#: The largest payload a header may announce (1 TiB); anything bigger is foreign.
MAX_PAYLOAD_BYTES = 1 << 40

_FIELDS = struct.Struct("<8sHBBBB8QQQ")  # up to and including the payload checksum
_KEY_OFFSET = _FIELDS.size
_CRC_OFFSET = HEADER_SIZE - 4

# Dtype codes as stored in the header. Never renumber; append new ones.
_DTYPE_NAMES = {
    1: "float16",
    2: "bfloat16",
    3: "float32",
    4: "float64",
    5: "float8_e4m3fn",
    6: "float8_e5m2",
    7: "int8",
    8: "uint8",
    9: "int16",
    10: "int32",
    11: "int64",
}
_NO_DTYPE = 0
_CODE_TO_DTYPE: dict[int, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
_DTYPE_TO_CODE = {dtype: code for code, dtype in _CODE_TO_DTYPE.items()}
_FORMAT_VALUES = {f.value: f for f in MemoryFormat}

assert _KEY_OFFSET + KEY_DIGEST_SIZE <= _CRC_OFFSET


def key_digest(key: CacheEngineKey | None) -> bytes:
    """What the header of an object stored under ``key`` holds (`NO_KEY` for None)."""
    if key is None:
        return NO_KEY
    return hashlib.sha256(key.to_string().encode("utf-8")).digest()[:KEY_DIGEST_SIZE]


@dataclass(frozen=True)
class ObjectHeader:
    """What the header of a stored object says about its payload."""

    fmt: MemoryFormat
    #: ``None`` for a byte buffer (format ``BINARY_BUFFER``).
    dtype: torch.dtype | None
    shape: torch.Size
    payload_length: int
    checksum_algorithm: str
    checksum: int
    version: int = FORMAT_VERSION
    #: `key_digest` of the key the object was stored under.
    key_digest: bytes = NO_KEY

    @property
    def total_size(self) -> int:
        """Bytes of the whole object: header plus payload."""
        return HEADER_SIZE + self.payload_length

    def problem(self, key: CacheEngineKey | None, spec: ChunkSpec | None = None) -> str | None:
        """Why this object is not the chunk of ``key`` that ``spec`` describes, or None
        when it is: stored under another key, or not of a format, dtype and shape this
        engine stores."""
        if self.key_digest != key_digest(key):
            return "stored under another key"
        if spec is not None and not spec.admits(self.fmt, self.dtype, self.shape):
            dtype = str(self.dtype).removeprefix("torch.")
            return (f"a {self.fmt.name} {dtype} object of shape {tuple(self.shape)}; "
                    f"this engine's chunks are {spec}")
        return None


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def build_header(
    fmt: MemoryFormat,
    dtype: torch.dtype | None,
    shape: tuple[int, ...] | torch.Size,
    payload: Any,
    algorithm: str = "sum64",
    *,
    checksum: int | None = None,
    key: CacheEngineKey | None = None,
) -> bytes:
    """The `HEADER_SIZE`-byte header of an object with this payload, stored under
    ``key`` (None: under no key, which no tier reads back as a chunk).

    ``checksum`` is the payload's checksum when the caller computed it already (with a
    `PayloadHasher` of the same ``algorithm``, e.g. while writing the payload).

    Raises ``ValueError`` for what cannot be stored: an unknown algorithm or format, a
    dtype outside the table, more than 8 dimensions, a negative dimension, or a payload
    whose length is not ``prod(shape) * itemsize``.
    """
    if algorithm not in ALGORITHM_IDS:
        raise unknown_algorithm(algorithm)
    if not isinstance(fmt, MemoryFormat):
        raise ValueError(f"fmt must be a MemoryFormat, got {fmt!r}")
    if dtype is None:
        code, itemsize = _NO_DTYPE, 1
    elif dtype in _DTYPE_TO_CODE:
        code, itemsize = _DTYPE_TO_CODE[dtype], dtype.itemsize
    else:
        names = ", ".join(_DTYPE_NAMES[c] for c in sorted(_CODE_TO_DTYPE))
        raise ValueError(f"cannot store dtype {dtype}; expected None or one of: {names}")
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_NDIM:
        raise ValueError(f"cannot store a shape of {len(dims)} dimensions; at most {MAX_NDIM}")
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {dims}")
    mv = as_bytes_view(payload)
    length = prod(dims) * itemsize
    if mv.nbytes != length:
        raise ValueError(
            f"payload is {mv.nbytes} bytes but shape {dims} of {dtype} needs {length}"
        )
    if checksum is None:
        checksum = payload_checksum(mv, algorithm)
    elif not 0 <= checksum <= MASK64:
        raise ValueError(f"checksum must fit in 64 bits, got {checksum}")
    buf = bytearray(HEADER_SIZE)
    _FIELDS.pack_into(
        buf, 0, MAGIC, FORMAT_VERSION, ALGORITHM_IDS[algorithm], fmt.value, code, len(dims),
        *dims, *([0] * (MAX_NDIM - len(dims))), length, checksum,
    )
    buf[_KEY_OFFSET:_KEY_OFFSET + KEY_DIGEST_SIZE] = key_digest(key)
    struct.pack_into("<I", buf, _CRC_OFFSET, zlib.crc32(memoryview(buf)[:_CRC_OFFSET]))
    return bytes(buf)


def encode_header(memory_obj: MemoryObj, algorithm: str = "sum64",
                  key: CacheEngineKey | None = None) -> bytes:
    """The header of ``memory_obj`` stored under ``key`` (format, dtype, shape, a
    checksum of its ``byte_array``, the key's digest); write it, then the
    ``byte_array``. See `build_header`. The checksum is the object's own
    ``metadata.payload_checksum`` when that is of ``algorithm`` (computed as the payload
    was written), else computed here."""
    return build_header(
        memory_obj.get_memory_format(),
        memory_obj.get_dtype(),
        memory_obj.get_shape(),
        memory_obj.byte_array,
        algorithm,
        checksum=known_checksum(memory_obj, algorithm),
        key=key,
    )


def known_checksum(memory_obj: MemoryObj, algorithm: str) -> int | None:
    """``memory_obj``'s payload checksum with ``algorithm`` if its writer computed one
    (`MemoryObjMetadata.payload_checksum`), else None."""
    known = getattr(memory_obj.metadata, "payload_checksum", None)
    if known is not None and known[0] == algorithm:
        return known[1]
    return None


# ---------------------------------------------------------------------------------------
# Decoding (untrusted input: never raises, returns None)
# ---------------------------------------------------------------------------------------


def decode_header(data: Any, max_payload: int = MAX_PAYLOAD_BYTES) -> ObjectHeader | None:
    """Parse the first `HEADER_SIZE` bytes of ``data``, or ``None`` if they are not a
    valid header: too short, wrong magic or version, header checksum mismatch, unknown
    algorithm, format or dtype, more than 8 dimensions, non-zero unused dimensions, or a
    payload length that is not ``prod(shape) * itemsize`` or exceeds ``max_payload``.
    """
    try:
        mv = as_bytes_view(data)
    except (TypeError, ValueError):
        return None
    if mv.nbytes < HEADER_SIZE:
        return None
    if mv[:8] != MAGIC:
        return None
    (stored_crc,) = struct.unpack_from("<I", mv, _CRC_OFFSET)
    if zlib.crc32(mv[:_CRC_OFFSET]) != stored_crc:
        return None
    fields = _FIELDS.unpack_from(mv, 0)
    _, version, algo_id, fmt_value, code, ndim = fields[:6]
    dims = fields[6 : 6 + MAX_NDIM]
    length, checksum = fields[6 + MAX_NDIM :]
    if version != FORMAT_VERSION or ndim > MAX_NDIM:
        return None
    algorithm = ALGORITHM_NAMES.get(algo_id)
    fmt = _FORMAT_VALUES.get(fmt_value)
    if algorithm is None or fmt is None:
        return None
    if code == _NO_DTYPE:
        dtype, itemsize = None, 1
    elif code in _CODE_TO_DTYPE:
        dtype = _CODE_TO_DTYPE[code]
        itemsize = dtype.itemsize
    else:
        return None
    if any(dims[ndim:]):
        return None
    shape = dims[:ndim]
    # Check dimension by dimension so that a hostile shape cannot build a huge integer.
    expected = itemsize
    for d in shape:
        expected *= d
        if expected > max_payload:
            return None
    if length != expected:
        return None
    if any(mv[_KEY_OFFSET + KEY_DIGEST_SIZE:_CRC_OFFSET]):  # reserved bytes
        return None
    digest = bytes(mv[_KEY_OFFSET:_KEY_OFFSET + KEY_DIGEST_SIZE])
    return ObjectHeader(fmt, dtype, torch.Size(shape), length, algorithm, checksum, version,
                        digest)


def verify_payload(header: ObjectHeader, payload: Any) -> bool:
    """Whether ``payload`` has the length and checksum that ``header`` announces."""
    try:
        mv = as_bytes_view(payload)
    except (TypeError, ValueError):
        return False
    if mv.nbytes != header.payload_length:
        return False
    return payload_checksum(mv, header.checksum_algorithm) == header.checksum


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


def _read_exactly_into(f: Any, buf: memoryview) -> int:
    # Fill ``buf`` from ``f``; returns the bytes read (fewer only at end of file).
    readinto = getattr(f, "readinto", None)
    got = 0
    n = buf.nbytes
    while got < n:
        if readinto is not None:
            k = readinto(buf[got:])
        else:
            chunk = f.read(n - got)
            k = len(chunk)
            buf[got : got + k] = chunk
        if not k:
            break
        got += k
    return got


def read_object(
    f: _Readable, allocator: MemoryAllocatorInterface, max_payload: int = MAX_PAYLOAD_BYTES,
    *, key: CacheEngineKey | None = None, spec: ChunkSpec | None = None,
) -> MemoryObj | None:
    """Read the object stored under ``key`` from the file-like ``f`` into memory from
    ``allocator``.

    The payload is read straight into the new object's ``byte_array`` (``readinto`` when
    ``f`` has it). Returns ``None`` for a foreign, truncated, over-long or corrupt object,
    one stored under another key or not admitted by ``spec`` (`ObjectHeader.problem`,
    checked before anything is allocated), and when the allocator has no room (the
    object is freed again). I/O errors of ``f`` propagate.
    """
    head = bytearray(HEADER_SIZE)
    if _read_exactly_into(f, memoryview(head)) != HEADER_SIZE:
        return None
    header = decode_header(head, max_payload)
    if header is None or header.problem(key, spec) is not None:
        return None
    return fill_object(header, allocator, lambda payload: (
        _read_exactly_into(f, payload) == header.payload_length and not f.read(1)))


def fill_object(header: ObjectHeader, allocator: MemoryAllocatorInterface,
                fill: Callable[[memoryview], bool]) -> MemoryObj | None:
    """A new object for ``header`` whose payload ``fill`` writes, checked against the
    header's checksum; ``None`` (the object freed again) when there is no room, ``fill``
    returns False or the checksum does not match. Exceptions of ``fill`` propagate, after
    the object is freed."""
    obj = allocate_for(header, allocator)
    if obj is None:
        return None
    try:
        payload = obj.byte_array
        ok = fill(payload) and verify_payload(header, payload)
    except BaseException:
        obj.ref_count_down()
        raise
    if not ok:
        obj.ref_count_down()
        return None
    return obj


def allocate_for(header: ObjectHeader, allocator: MemoryAllocatorInterface) -> MemoryObj | None:
    """An object from ``allocator`` with the header's shape, dtype and format, or ``None``
    when the allocator has no room or cannot hold that kind of object."""
    dtype = header.dtype
    if dtype is None and header.fmt != MemoryFormat.BINARY_BUFFER:
        dtype = torch.uint8
    try:
        obj = allocator.allocate(header.shape, dtype, header.fmt)
    except ValueError:
        return None
    if obj is None:
        return None
    if obj.get_size() != header.payload_length:  # an allocator that rounds the shape
        obj.ref_count_down()
        return None
    return obj


def byte_view(data: Any) -> memoryview | None:
    """``data`` as a flat memoryview of bytes (no copy), or ``None`` for what is not a
    buffer: for decoding values that came from outside the process."""
    try:
        return as_bytes_view(data)
    except (TypeError, ValueError):
        return None
