"""``zstd``: the object header, then the payload compressed with zstandard.

The header describes the *decoded* payload; a 16-byte frame header and one zstandard
frame of the payload follow::

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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from lmcache.abc.serde import Serde
from lmcache.kits.object_format import (
    HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    ObjectHeader,
    build_header,
    byte_view,
    decode_header,
    fill_object,
    payload_checksum,
)
from lmcache.plugin.options import PluginOptions
from lmcache.utils import Buffer, CacheEngineKey

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = ["ZstdSerde"]


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
            "the 'zstd' serde needs the zstandard module: pip install -e '.[zstd]' in the "
            "lmcache checkout (or pip install zstandard)") from exc
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
    def from_options(cls, options: ZstdSerde.Options, config: Any, metadata: Any) -> ZstdSerde:
        return cls(options.level, options.shuffle, options.threads, options.checksum)

    def serialize_parts(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                        ) -> list[Buffer]:
        payload = memory_obj.byte_array
        checksum = payload_checksum(payload, self.checksum)
        header = build_header(memory_obj.get_memory_format(), memory_obj.get_dtype(),
                              memory_obj.get_shape(), payload, self.checksum,
                              checksum=checksum, key=key)
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

    def serialize(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None) -> bytes:
        return b"".join(self.serialize_parts(memory_obj, key))

    def max_value_size(self, payload_bytes: int) -> int:
        # zstandard's bound on a frame (ZSTD_compressBound), plus both headers
        bound = payload_bytes + (payload_bytes >> 8) + (128 << 10 >> 11) + 512
        return _ZST_PREFIX + bound

    def deserialize(self, data: Buffer, allocator: MemoryAllocatorInterface,
                    key: CacheEngineKey | None = None, spec: ChunkSpec | None = None
                    ) -> MemoryObj | None:
        mv = byte_view(data)
        if mv is None or mv.nbytes < _ZST_PREFIX:
            return None
        header = decode_header(mv[:HEADER_SIZE], self.max_payload)
        if header is None or header.problem(key, spec) is not None:
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
