"""Byte buffers on the Python heap, and the ``mixed`` allocator that pairs them with a
page-locked region.

* `BufferAllocator` -- `BytesBufferMemoryObj` objects over fresh ``bytearray`` buffers
  (not a plugin: the byte half of ``mixed``);
* ``mixed`` -- `MixedMemoryAllocator`, page-locked memory for tensors and byte buffers
  for format ``BINARY_BUFFER``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from lmcache.abc.memory import MemoryAllocatorInterface, MemoryFormat, MemoryObj
from lmcache.builtin.allocators.region import (
    PinMemoryAllocator,
    Prefault,
    PrefaultOptions,
    config_size_bytes,
)
from lmcache.kits.memory import (
    BytesBufferMemoryObj,
    normalize_shape,
    release,
    warn_second_free,
)

__all__ = ["BufferAllocator", "MixedMemoryAllocator"]

_TENSOR_FORMATS = frozenset({MemoryFormat.UNDEFINED, MemoryFormat.KV_BLOB, MemoryFormat.BINARY})


class BufferAllocator(MemoryAllocatorInterface):
    """Allocates `BytesBufferMemoryObj` objects over fresh ``bytearray`` buffers.

    There is no region: buffers come from the Python heap. ``capacity`` bounds the bytes
    of live buffers (an allocation beyond it answers ``None``); by default it is
    unbounded (``sys.maxsize``). Live objects are counted (and referenced) until freed,
    so leaks show in `num_active_allocations`.
    """

    def __init__(self, device: str = "cpu", capacity: int | None = None) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"BufferAllocator holds CPU byte buffers; got device {device!r}")
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be a non-negative number of bytes, got {capacity}")
        self.device = device
        self._capacity = sys.maxsize if capacity is None else capacity
        self._lock = threading.Lock()
        self._live: dict[int, BytesBufferMemoryObj] = {}
        self._allocated_bytes = 0

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.BINARY_BUFFER,
        *,
        budget: int | None = None,
    ) -> BytesBufferMemoryObj | None:
        """A new buffer of ``shape[0]`` bytes, or ``None`` when the live buffers would
        then exceed ``capacity`` (or ``budget``, a smaller bound for this call): the
        bytes are reserved before the buffer exists, so a length read from outside never
        allocates beyond the bound."""
        if fmt != MemoryFormat.BINARY_BUFFER:
            raise ValueError(f"BufferAllocator allocates format BINARY_BUFFER, got {fmt.name}")
        size_shape = normalize_shape(shape)
        if len(size_shape) < 1:
            raise ValueError("shape must give the buffer's length in bytes as shape[0]")
        nbytes = size_shape[0]
        limit = self._capacity if budget is None else min(budget, self._capacity)
        with self._lock:
            if self._allocated_bytes + nbytes > limit:
                return None
            self._allocated_bytes += nbytes
        try:
            obj = BytesBufferMemoryObj(bytearray(nbytes))
        except MemoryError:
            with self._lock:
                self._allocated_bytes -= nbytes
            return None
        obj.parent_allocator = self
        with self._lock:
            self._live[id(obj)] = obj
        return obj

    def free(self, memory_obj: MemoryObj) -> None:
        with self._lock:
            if self._live.get(id(memory_obj)) is not memory_obj:
                if getattr(memory_obj, "parent_allocator", None) is not self:
                    raise ValueError(
                        f"{memory_obj!r} was not allocated by this {type(self).__name__}")
                warn_second_free(memory_obj)
                return
            del self._live[id(memory_obj)]
            self._allocated_bytes -= memory_obj.metadata.phy_size
        release(memory_obj)

    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        return memory_obj.get_ref_count()

    @property
    def num_active_allocations(self) -> int:
        return len(self._live)

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_bytes

    @property
    def capacity(self) -> int:
        return self._capacity

    #: The seed's name of `allocated_bytes`.
    total_allocated_size = allocated_bytes

    def memcheck(self) -> bool:
        """Whether the live buffers add up to the bytes counted (the seed's check)."""
        with self._lock:
            return sum(o.metadata.phy_size for o in self._live.values()) \
                == self._allocated_bytes


class MixedMemoryAllocator(MemoryAllocatorInterface):
    """Tensor formats (KV_BLOB, BINARY, UNDEFINED) from a `PinMemoryAllocator` of
    ``size`` bytes; BINARY_BUFFER from a `BufferAllocator`.

    Both share one budget, the pinned region's `capacity`: a byte buffer is refused
    (``None``) when it would bring the live tensors and buffers together over it, and so
    is a tensor while buffers are live. A length announced by stored bytes can therefore
    never allocate beyond ``max_local_cpu_size``. The accounting properties add both up.
    Without CUDA the region is ordinary host memory, without a warning (this is the
    default allocator; choose ``pinned`` to be warned).
    """

    Options = PrefaultOptions

    def __init__(self, size: int, *, prefault: bool | str = False) -> None:
        # the default allocator: page-locked where CUDA is, ordinary memory elsewhere
        # (where nothing would use page-locked memory), without a warning either way
        self.pin_allocator = PinMemoryAllocator(size, prefault=prefault, warn_unpinned=False)
        self.buffer_allocator = BufferAllocator("cpu", capacity=self.pin_allocator.capacity)

    @property
    def prefault(self) -> Prefault | None:
        """The background prefault of the tensor region, if one was started."""
        return self.pin_allocator.prefault

    def close(self) -> None:
        """Stop background work on the region (`PinMemoryAllocator.close`)."""
        self.pin_allocator.close()

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.KV_BLOB,
    ) -> MemoryObj | None:
        buffers, pinned = self.buffer_allocator, self.pin_allocator
        if fmt == MemoryFormat.BINARY_BUFFER:
            return buffers.allocate(shape, dtype, fmt,
                                    budget=pinned.capacity - pinned.allocated_bytes)
        if fmt in _TENSOR_FORMATS:
            if buffers.allocated_bytes:  # rare: byte buffers are live; share the budget
                itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 1
                nbytes = normalize_shape(shape).numel() * itemsize
                if pinned.allocated_bytes + buffers.allocated_bytes + nbytes > pinned.capacity:
                    return None
            return pinned.allocate(shape, dtype, fmt)
        raise ValueError(f"unsupported memory format {fmt!r}")

    def free(self, memory_obj: MemoryObj) -> None:
        if isinstance(memory_obj, BytesBufferMemoryObj):
            self.buffer_allocator.free(memory_obj)
        else:
            self.pin_allocator.free(memory_obj)

    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        return memory_obj.get_ref_count()

    @property
    def num_active_allocations(self) -> int:
        return (
            self.pin_allocator.num_active_allocations + self.buffer_allocator.num_active_allocations
        )

    @property
    def allocated_bytes(self) -> int:
        return self.pin_allocator.allocated_bytes + self.buffer_allocator.allocated_bytes

    @property
    def capacity(self) -> int:
        return self.pin_allocator.capacity

    #: The seed's name of `allocated_bytes`.
    total_allocated_size = allocated_bytes

    def memcheck(self) -> bool:
        """Both halves' checks (see `TensorMemoryAllocator.memcheck`)."""
        return self.pin_allocator.memcheck() and self.buffer_allocator.memcheck()

    @classmethod
    def from_options(
        cls, options: PrefaultOptions, config: Any, metadata: Any
    ) -> MixedMemoryAllocator:
        return cls(config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)
