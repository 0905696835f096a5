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

from lmcache.utils import Buffer

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["Serde"]


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
        """A memory object allocated from ``allocator`` holding ``data``, or ``None``.

        ``data`` may be anything: checks every length against what the bytes announce
        before it allocates, verifies the payload, and returns ``None`` (freeing what it
        allocated) rather than raising.
        """

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
                     metadata: LMCacheEngineMetadata) -> Serde:
        """Build the serde from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")
