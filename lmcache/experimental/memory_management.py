"""The seed's ``lmcache.experimental.memory_management``: the contract in
`lmcache.abc.memory`, the memory kit in `lmcache.kits.memory`, the allocators in
`lmcache.builtin.allocators`."""

from lmcache.abc.memory import (
    DoubleFreeError,
    InvalidMemoryObjError,
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
    MemoryObjError,
    MemoryObjMetadata,
)
from lmcache.builtin.allocators.mixed import BufferAllocator, MixedMemoryAllocator
from lmcache.builtin.allocators.region import (
    GPUMemoryAllocator,
    HostMemoryAllocator,
    PinMemoryAllocator,
    PinnedMemoryUnavailableWarning,
)
from lmcache.kits.memory import (
    BytesBufferMemoryObj,
    FreeBlock,
    TensorMemoryAllocator,
    TensorMemoryObj,
)

__all__ = [
    "BufferAllocator",
    "BytesBufferMemoryObj",
    "DoubleFreeError",
    "FreeBlock",
    "GPUMemoryAllocator",
    "HostMemoryAllocator",
    "InvalidMemoryObjError",
    "MemoryAllocatorInterface",
    "MemoryFormat",
    "MemoryObj",
    "MemoryObjError",
    "MemoryObjMetadata",
    "MixedMemoryAllocator",
    "PinMemoryAllocator",
    "PinnedMemoryUnavailableWarning",
    "TensorMemoryAllocator",
    "TensorMemoryObj",
]
