"""``naive``: exactly the disk tier's object -- the 128-byte header, then the payload.

Nothing is copied on the way out: `NaiveSerde.serialize_parts` hands the transport the
header and a view of the memory object's own bytes. Reading checks every length against
the header before memory is allocated and verifies the payload checksum; anything else
is ``None`` (a miss), never an exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from lmcache.abc.serde import Serde
from lmcache.kits.object_format import (
    HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    byte_view,
    decode_header,
    encode_header,
    fill_object,
)
from lmcache.plugin.options import PluginOptions
from lmcache.utils import Buffer, CacheEngineKey

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = ["NaiveSerde"]


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
    def from_options(cls, options: NaiveSerde.Options, config: Any, metadata: Any) -> NaiveSerde:
        return cls(options.checksum)

    def serialize_parts(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                        ) -> list[Buffer]:
        return [encode_header(memory_obj, self.checksum, key), memory_obj.byte_array]

    def serialize(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None) -> bytes:
        return b"".join(self.serialize_parts(memory_obj, key))

    def max_value_size(self, payload_bytes: int) -> int:
        return HEADER_SIZE + payload_bytes

    def deserialize(self, data: Buffer, allocator: MemoryAllocatorInterface,
                    key: CacheEngineKey | None = None, spec: ChunkSpec | None = None
                    ) -> MemoryObj | None:
        mv = byte_view(data)
        if mv is None:
            return None
        header = decode_header(mv[:HEADER_SIZE], self.max_payload)
        if header is None or mv.nbytes != header.total_size \
                or header.problem(key, spec) is not None:
            return None

        def copy(payload: memoryview) -> bool:
            payload[:] = mv[HEADER_SIZE:]
            return True

        return fill_object(header, allocator, copy)

