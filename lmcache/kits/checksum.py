"""Payload checksums of stored objects: ``sum64`` (memory speed) and ``crc32``.

``sum64`` (the default) runs near memory bandwidth: the payload is read as 64-bit
little-endian words (the tail zero-padded), grouped in rows of 1024 words (8 KiB);
with ``r_j`` the wrapping sum of row ``j``, ``A = sum r_j`` and
``B = sum (j + 1) * r_j`` (both mod 2**64), the checksum is ``A + 2 * B`` mod 2**64.
A change of one word by ``d`` changes it by ``(2j + 3) * d``, an odd multiple of a
non-zero number, so any single-word change (any bit flip) is always detected;
zeroed or garbled pages change ``A`` and swapped rows change ``B``; truncation is
caught by the length. It is a check against accidents (torn writes, bad sectors,
another program's files), not against an adversary.
``crc32`` (zlib) is the classic alternative, several times slower.

`PayloadHasher` computes either piece by piece (pieces of `CHECKSUM_BLOCK`
multiples), so that a tier can hash one piece while the next one is read or written.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from lmcache.ops import cpu_ops

__all__ = [
    "ALGORITHM_IDS",
    "CHECKSUM_ALGORITHMS",
    "CHECKSUM_BLOCK",
    "PayloadHasher",
    "as_bytes_view",
    "payload_checksum",
    "unknown_algorithm",
]

MASK64 = (1 << 64) - 1
_ROW_WORDS = 1024
#: Bytes per checksum row: `PayloadHasher` pieces (but the last) are multiples of it.
CHECKSUM_BLOCK = _ROW_WORDS * 8

#: Checksum algorithm ids as stored in object headers. Never renumber: old files keep theirs.
ALGORITHM_IDS = {"sum64": 1, "crc32": 2}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHM_IDS.items()}
CHECKSUM_ALGORITHMS = tuple(ALGORITHM_IDS)


def as_bytes_view(payload: Any) -> memoryview:
    """``payload`` as a flat memoryview of bytes (no copy); raises for non-buffers."""
    mv = payload if isinstance(payload, memoryview) else memoryview(payload)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _row_sums(words: memoryview, nrows: int) -> np.ndarray:
    # Zero-copy int64 view of ``nrows`` full rows, summed per row. Integer sums and
    # products wrap modulo 2**64 (two's complement). numpy rather than torch: it runs on
    # the calling thread only (no OpenMP pool competing with I/O and with the serving
    # engine's threads) and releases the GIL, so hashing overlaps with I/O elsewhere.
    a = np.frombuffer(words, dtype="<i8", count=nrows * _ROW_WORDS)
    return np.add.reduce(a.reshape(nrows, _ROW_WORDS), axis=1, dtype=np.int64)


class PayloadHasher:
    """The payload checksum computed piece by piece, so that I/O of one piece can overlap
    with hashing the previous one.

    Feed consecutive pieces of the payload to `update`; every piece except the last
    must be a multiple of `CHECKSUM_BLOCK` bytes long (``ValueError`` otherwise). `digest`
    gives the same value as `payload_checksum` of the whole payload.
    """

    def __init__(self, algorithm: str = "sum64") -> None:
        if algorithm not in ALGORITHM_IDS:
            raise unknown_algorithm(algorithm)
        self.algorithm = algorithm
        self._crc = 0
        self._a = self._b = 0
        self._rows = 0  # full rows hashed so far
        self._ended = False  # a piece with a partial row was fed: it must be the last

    def update(self, piece: Any) -> PayloadHasher:
        mv = as_bytes_view(piece)
        if self._ended and mv.nbytes:
            raise ValueError(
                f"only the last piece may be shorter than a multiple of {CHECKSUM_BLOCK} bytes"
            )
        if self.algorithm == "crc32":
            self._crc = zlib.crc32(mv, self._crc)
            if mv.nbytes % CHECKSUM_BLOCK:
                self._ended = True
            return self
        nrows = mv.nbytes // CHECKSUM_BLOCK
        if nrows:
            words = np.frombuffer(mv, dtype=np.uint8, count=nrows * CHECKSUM_BLOCK)
            ops = cpu_ops()
            if ops is not None:  # the same sums, at memory speed
                a, b = ops.sum64_rows(words.ctypes.data, words.nbytes, self._rows)
            else:
                r = _row_sums(mv, nrows)
                weights = np.arange(self._rows + 1, self._rows + nrows + 1, dtype=np.int64)
                a, b = int(r.sum(dtype=np.int64)), int((r * weights).sum(dtype=np.int64))
            self._a += a
            self._b += b
            self._rows += nrows
        # A partial row: the words after the last full row, then the zero-padded last bytes.
        tail = mv[nrows * CHECKSUM_BLOCK :]
        if tail.nbytes:
            full = tail.nbytes // 8 * 8
            tail_sum = sum(struct.unpack_from(f"<{full // 8}Q", tail)) if full else 0
            tail_sum += int.from_bytes(tail[full:], "little")
            self._a += tail_sum
            self._b += (self._rows + 1) * tail_sum
            self._ended = True
        return self

    def digest(self) -> int:
        if self.algorithm == "crc32":
            return self._crc
        return (self._a + 2 * self._b) & MASK64


def payload_checksum(payload: Any, algorithm: str = "sum64") -> int:
    """The checksum of ``payload`` (any contiguous buffer) with ``algorithm``.

    ``algorithm`` is one of `CHECKSUM_ALGORITHMS`; anything else is a ``ValueError``.
    """
    return PayloadHasher(algorithm).update(payload).digest()


def unknown_algorithm(algorithm: object) -> ValueError:
    return ValueError(
        f"unknown checksum algorithm {algorithm!r}; "
        f"expected one of {', '.join(CHECKSUM_ALGORITHMS)}"
    )

