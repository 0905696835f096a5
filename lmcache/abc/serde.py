"""The serde contract: a memory object as bytes for a remote store, and back.

Who calls what
    A remote tier (`lmcache.kits.remote.RemoteBackend`) calls
    `Serde.serialize_parts` on its writer threads and `Serde.deserialize` on its I/O
    threads, for many chunks at once: a serde keeps no per-call state on ``self``.

lmcache's serdes (``naive``, ``zstd``) are in `lmcache.builtin.serdes`; the
self-describing object format they build on is `lmcache.kits.object_format`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmcache.utils import Buffer, CacheEngineKey

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["Serde"]


class Serde(ABC):
    """Encodes a memory object as bytes and decodes bytes back into one.

    ``deserialize`` reads bytes that came from outside the process: it must never
    execute anything it reads (no pickle), must check sizes before trusting them, and
    returns ``None`` for bytes it cannot decode rather than raising. Serdes are plugins
    (group ``lmcache.serdes``) selected by ``remote_serde``.

    A serde's output must be self-describing (format, dtype, shape, integrity) and name
    the key it was stored under, because a remote store may hand back a value written
    under another name, by another process, an older version or another program
    entirely.
    """

    @abstractmethod
    def serialize(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                  ) -> bytes | bytearray | memoryview:
        """``memory_obj`` as the value stored under ``key`` (shape, dtype, format and the
        key included)."""

    @abstractmethod
    def deserialize(self, data: bytes | bytearray | memoryview,
                    allocator: MemoryAllocatorInterface, key: CacheEngineKey | None = None,
                    spec: ChunkSpec | None = None) -> MemoryObj | None:
        """The chunk stored under ``key`` that ``data`` holds, in a memory object
        allocated from ``allocator``, or ``None``.

        ``data`` may be anything: a value stored under another key, or whose format,
        dtype or shape ``spec`` does not admit, is ``None`` before anything is allocated;
        every length is checked against what the bytes announce before allocating; the
        payload is verified. Returns ``None`` (freeing what it allocated) rather than
        raising.
        """

    def serialize_parts(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                        ) -> Sequence[Buffer]:
        """`serialize` as consecutive pieces whose concatenation is the value.

        Transports that can send several buffers as one value (a socket's ``sendall`` of
        each piece) use this to avoid joining them; a piece may be a view of
        ``memory_obj``'s own memory, valid while the caller holds a reference to it.
        The default is ``[self.serialize(memory_obj, key)]``.
        """
        return [self.serialize(memory_obj, key)]

    def max_value_size(self, payload_bytes: int) -> int:
        """The longest value this serde makes for a payload of ``payload_bytes``: a remote
        tier reads no more than that for one chunk. The default (twice the payload plus
        64 KiB) suits a serde that does not say."""
        return 2 * payload_bytes + (64 << 10)

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata) -> Serde:
        """Build the serde from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")
