"""Serdes: turn memory objects into bytes for a remote store, and back.

A serde decides the byte form of a chunk in a remote tier. Both built-in serdes keep the
self-describing object of `object_format` at the front of every value, so that
whatever reads a value knows its format, dtype, shape and the checksum of its payload
before it trusts a single payload byte:

``naive``
    Exactly the disk tier's object: the 128-byte header, then the payload. Nothing is
    copied on the way out: `Serde.serialize_parts` hands the transport the header and a
    view of the memory object's own bytes.

``zstd``
    The header (describing the *decoded* payload), a 16-byte frame header, then one
    zstandard frame of the payload::

        offset  size  field (little-endian)
             0   128  object header (object_format), payload_length = decoded bytes
           128     6  magic b"LMCZST"
           134     1  frame version (u8), currently 1
           135     1  flags (u8): bit 0 = byte-shuffled (see below)
           136     8  length of the zstandard frame in bytes (u64)
           144     -  the zstandard frame, with its content size recorded

    With ``shuffle`` (the default) the payload is compressed as byte planes: all first
    bytes of each element, then all second bytes, ... For bf16/fp16 KV the plane of
    sign-and-exponent bytes is highly redundant, which raises zstandard's ratio.

Reading is for untrusted bytes: no pickle, no eval, nothing that executes what it reads.
Every length is checked against the header before memory is allocated (a frame must
announce exactly the header's payload length), and the payload checksum is verified
after decoding; anything else is ``None`` (a miss), never an exception.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from lmcache.experimental.storage_backend.object_format import (
    HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    ObjectHeader,
    build_header,
    decode_header,
    fill_object,
    payload_checksum,
)
from lmcache.plugin.options import PluginOptions

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryAllocatorInterface, MemoryObj

__all__ = ["NaiveSerde", "Serde", "ZstdSerde"]

Buffer = bytes | bytearray | memoryview


class Serde(ABC):
    """Encodes a memory object as bytes and decodes bytes back into one.

    ``deserialize`` reads bytes that came from outside the process: it must never
    execute anything it reads (no pickle), must check sizes before trusting them, and
    returns ``None`` for bytes it cannot decode rather than raising. Serdes are plugins
    (group ``lmcache.serdes``) selected by ``remote_serde``.

    A serde's output must be self-describing (format, dtype, shape, integrity), because
    a remote store may hand back a value written by another process, an older version
    or another program entirely.
    """

    @abstractmethod
    def serialize(self, memory_obj: MemoryObj) -> bytes | bytearray | memoryview:
        """The payload of ``memory_obj`` as bytes (shape, dtype and format included)."""

    @abstractmethod
    def deserialize(self, data: bytes | bytearray | memoryview,
                    allocator: MemoryAllocatorInterface) -> MemoryObj | None:
        """A memory object allocated from ``allocator`` holding ``data``, or ``None``."""

    def serialize_parts(self, memory_obj: MemoryObj) -> Sequence[Buffer]:
        """`serialize` as consecutive pieces whose concatenation is the value.

        Transports that can send several buffers as one value (a socket's ``sendall`` of
        each piece) use this to avoid joining them; a piece may be a view of
        ``memory_obj``'s own memory, valid while the caller holds a reference to it.
        The default is ``[self.serialize(memory_obj)]``.
        """
        return [self.serialize(memory_obj)]

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> Serde:
        """Build the serde from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")


def _byte_view(data: Any) -> memoryview | None:
    try:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError):
        return None
    return mv


def _header_for(memory_obj: MemoryObj, algorithm: str) -> bytes:
    return build_header(memory_obj.get_memory_format(), memory_obj.get_dtype(),
                        memory_obj.get_shape(), memory_obj.byte_array, algorithm)


class NaiveSerde(Serde):
    """The object as stored by the disk tier: header, then the raw payload (no copy)."""

    class Options(PluginOptions):
        checksum: Literal["sum64", "crc32"] = Field(
            default="sum64", description="Checksum of the payload in new values; reads "
            "verify whichever algorithm a value was written with.")

    def __init__(self, checksum: str = "sum64", max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        self.checksum = checksum
        self.max_payload = max_payload

    @classmethod
    def from_options(cls, options: NaiveSerde.Options, config: Any, metadata: Any,
                     **context: Any) -> NaiveSerde:
        return cls(options.checksum)

    def serialize_parts(self, memory_obj: MemoryObj) -> list[Buffer]:
        return [_header_for(memory_obj, self.checksum), memory_obj.byte_array]

    def serialize(self, memory_obj: MemoryObj) -> bytes:
        return b"".join(self.serialize_parts(memory_obj))

    def deserialize(self, data: Buffer, allocator: MemoryAllocatorInterface
                    ) -> MemoryObj | None:
        mv = _byte_view(data)
        if mv is None:
            return None
        header = decode_header(mv[:HEADER_SIZE], self.max_payload)
        if header is None or mv.nbytes != header.total_size:
            return None
        def copy(payload: memoryview) -> bool:
            payload[:] = mv[HEADER_SIZE:]
            return True

        return fill_object(header, allocator, copy)


_ZST_MAGIC = b"LMCZST"
_ZST_VERSION = 1
_ZST_FRAME = struct.Struct("<6sBBQ")
_ZST_PREFIX = HEADER_SIZE + _ZST_FRAME.size
_FLAG_SHUFFLE = 1


def _import_zstandard() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError(
            "the 'zstd' serde needs the zstandard module: pip install 'lmcache[zstd]' "
            "(or pip install zstandard)") from exc
    return zstandard


class ZstdSerde(Serde):
    """Header, then the payload compressed with zstandard (optionally as byte planes).

    Compression costs CPU time (a few hundred MB/s per thread at level 1): it pays off
    when the link to the store is slower than that, or when the store's capacity is the
    limit. See ``benchmarks/bench_remote.py`` for ratio and speed on KV.
    """

    class Options(PluginOptions):
        level: int = Field(default=1, ge=-7, le=22, description="zstandard compression "
                           "level: negative is faster, higher compresses more.")
        shuffle: bool = Field(default=True, description="Compress the payload as byte "
                              "planes (all first bytes of each element, then all second "
                              "bytes, ...); raises the ratio on fp16/bf16 KV.")
        threads: int = Field(default=0, ge=0, description="Compression worker threads of "
                             "zstandard (0: compress on the calling thread).")
        checksum: Literal["sum64", "crc32"] = Field(
            default="sum64", description="Checksum of the decoded payload in new values.")

    def __init__(self, level: int = 1, shuffle: bool = True, threads: int = 0,
                 checksum: str = "sum64", max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        self._zstd = _import_zstandard()
        self.level = level
        self.shuffle = shuffle
        self.threads = threads
        self.checksum = checksum
        self.max_payload = max_payload

    @classmethod
    def from_options(cls, options: ZstdSerde.Options, config: Any, metadata: Any,
                     **context: Any) -> ZstdSerde:
        return cls(options.level, options.shuffle, options.threads, options.checksum)

    def serialize_parts(self, memory_obj: MemoryObj) -> list[Buffer]:
        payload = memory_obj.byte_array
        checksum = payload_checksum(payload, self.checksum)
        header = build_header(memory_obj.get_memory_format(), memory_obj.get_dtype(),
                              memory_obj.get_shape(), payload, self.checksum,
                              checksum=checksum)
        dtype = memory_obj.get_dtype()
        itemsize = 1 if dtype is None else dtype.itemsize
        flags = 0
        source: Any = payload
        if self.shuffle and itemsize > 1 and payload.nbytes % itemsize == 0:
            source = _shuffle(payload, itemsize)
            flags |= _FLAG_SHUFFLE
        # A compressor holds native state that is not thread-safe: one per call.
        compressor = self._zstd.ZstdCompressor(level=self.level, threads=self.threads,
                                               write_content_size=True)
        frame = compressor.compress(source)
        return [header, _ZST_FRAME.pack(_ZST_MAGIC, _ZST_VERSION, flags, len(frame)), frame]

    def serialize(self, memory_obj: MemoryObj) -> bytes:
        return b"".join(self.serialize_parts(memory_obj))

    def deserialize(self, data: Buffer, allocator: MemoryAllocatorInterface
                    ) -> MemoryObj | None:
        mv = _byte_view(data)
        if mv is None or mv.nbytes < _ZST_PREFIX:
            return None
        header = decode_header(mv[:HEADER_SIZE], self.max_payload)
        if header is None:
            return None
        magic, version, flags, frame_length = _ZST_FRAME.unpack_from(mv, HEADER_SIZE)
        if magic != _ZST_MAGIC or version != _ZST_VERSION or flags & ~_FLAG_SHUFFLE \
                or frame_length != mv.nbytes - _ZST_PREFIX:
            return None
        frame = mv[_ZST_PREFIX:]
        try:
            content_size = self._zstd.frame_content_size(frame)
        except self._zstd.ZstdError:
            return None
        if content_size != header.payload_length:  # also refuses "unknown size" (-1)
            return None
        itemsize = _itemsize(header)
        shuffled = bool(flags & _FLAG_SHUFFLE)
        if shuffled and (itemsize < 2 or header.payload_length % itemsize):
            return None
        return fill_object(header, allocator, lambda payload: self._decode_into(
            frame, payload, itemsize if shuffled else 1))

    def _decode_into(self, frame: memoryview, out: memoryview, itemsize: int) -> bool:
        n = out.nbytes
        try:
            decoded = self._zstd.ZstdDecompressor().decompress(frame, max_output_size=n)
        except self._zstd.ZstdError:
            return False
        if len(decoded) != n:
            return False
        if itemsize == 1:
            out[:] = decoded
        else:
            _unshuffle(decoded, out, itemsize)
        return True


def _itemsize(header: ObjectHeader | None) -> int:
    if header is None or header.dtype is None:
        return 1
    return header.dtype.itemsize


def _shuffle(payload: memoryview, itemsize: int) -> np.ndarray:
    # Element-major bytes -> plane-major bytes ([n, itemsize] -> [itemsize, n]), one
    # plane at a time: strided reads of one column are faster than a 2-D transpose.
    elements = np.frombuffer(payload, dtype=np.uint8).reshape(-1, itemsize)
    count = elements.shape[0]
    planes = np.empty(count * itemsize, dtype=np.uint8)
    for j in range(itemsize):
        planes[j * count:(j + 1) * count] = elements[:, j]
    return planes


def _unshuffle(planes: bytes, out: memoryview, itemsize: int) -> None:
    src = np.frombuffer(planes, dtype=np.uint8)
    count = src.nbytes // itemsize
    if itemsize == 2:  # fp16/bf16: one little-endian u16 = low plane | high plane << 8
        words = np.frombuffer(out, dtype="<u2")
        np.left_shift(src[count:], 8, out=words, dtype="<u2")
        np.bitwise_or(words, src[:count], out=words)
        return
    dst = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
    for j in range(itemsize):
        dst[:, j] = src[j * count:(j + 1) * count]
