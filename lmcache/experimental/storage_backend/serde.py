"""Serdes: turn memory objects into bytes for a remote store, and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryAllocatorInterface, MemoryObj


class Serde(ABC):
    """Encodes a memory object as bytes and decodes bytes back into one.

    ``deserialize`` reads bytes that came from outside the process: it must never
    execute anything it reads (no pickle), must check sizes before trusting them, and
    returns ``None`` for bytes it cannot decode rather than raising. Serdes are plugins
    (group ``lmcache.serdes``) selected by ``remote_serde``.
    """

    @abstractmethod
    def serialize(self, memory_obj: MemoryObj) -> bytes | bytearray | memoryview:
        """The payload of ``memory_obj`` as bytes (shape, dtype and format included)."""

    @abstractmethod
    def deserialize(self, data: bytes | bytearray | memoryview,
                    allocator: MemoryAllocatorInterface) -> MemoryObj | None:
        """A memory object allocated from ``allocator`` holding ``data``, or ``None``."""

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> Serde:
        """Build the serde from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")
