"""The memory kit: reference-counted memory objects and a free-list allocator over one
preallocated tensor, for allocators to build on.

`TensorMemoryAllocator` hands out `TensorMemoryObj` slices of a region it is given;
lmcache's own allocators (`lmcache.builtin.allocators`) are thin owners of such a region
(pageable, page-locked or on a GPU). A third-party allocator that reserves its region
another way (huge pages, a shared-memory segment) wraps it the same way.
"""

from __future__ import annotations

import bisect
import logging
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcache.abc.memory import (
    DoubleFreeError,
    InvalidMemoryObjError,
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
    MemoryObjMetadata,
)
from lmcache.utils import LogOnce

logger = logging.getLogger(__name__)
#: Misuse that the seed tolerated (a freed object's tensor, a second free): warned once
#: per kind, then logged at DEBUG level.
_log_misuse = LogOnce(logger)

__all__ = [
    "BytesBufferMemoryObj",
    "FreeBlock",
    "RefCountedMemoryObj",
    "TensorMemoryAllocator",
    "TensorMemoryObj",
    "normalize_shape",
    "release",
    "warn_second_free",
]


class RefCountedMemoryObj(MemoryObj):
    """The bookkeeping every concrete object shares: reference and pin counts live in the
    metadata (the seed's fields) behind a per-object lock; when the count reaches zero
    the object goes back to ``parent_allocator.free``. Subclasses provide the payload
    (`tensor`, `byte_array`, `get_size`)."""

    def __init__(self, metadata: MemoryObjMetadata, parent_allocator: Any = None) -> None:
        self._metadata = metadata
        self.parent_allocator = parent_allocator
        self._lock = threading.Lock()
        self._valid = True

    @property
    def metadata(self) -> MemoryObjMetadata:
        return self._metadata

    def get_memory_format(self) -> MemoryFormat:
        return self._metadata.fmt

    def _describe(self) -> str:
        return f"{type(self).__name__} at address {self._metadata.address}"

    def _check_valid(self) -> None:
        if not self._valid:
            raise InvalidMemoryObjError(
                f"{self._describe()} was freed or invalidated; its memory may already hold "
                "another chunk"
            )

    def ref_count_up(self) -> None:
        with self._lock:
            self._check_valid()
            self._metadata.ref_count += 1

    def ref_count_down(self) -> None:
        with self._lock:
            if self._metadata.ref_count <= 0:
                raise DoubleFreeError(
                    f"ref_count_down() on {type(self).__name__} at address "
                    f"{self._metadata.address} whose reference count is already zero"
                )
            self._metadata.ref_count -= 1
            released = self._metadata.ref_count == 0
            if released:
                self._valid = False
        # Outside our lock: the allocator takes its own lock and then ours (_mark_freed).
        if released and self.parent_allocator is not None:
            self.parent_allocator.free(self)

    def get_ref_count(self) -> int:
        return self._metadata.ref_count

    def pin(self) -> None:
        with self._lock:
            self._check_valid()
            self._metadata.pin_count += 1
            self._metadata.ref_count += 1

    def unpin(self) -> None:
        with self._lock:
            if self._metadata.pin_count <= 0:
                raise DoubleFreeError(
                    f"unpin() on {type(self).__name__} at address {self._metadata.address} "
                    "that is not pinned"
                )
            self._metadata.pin_count -= 1
        self.ref_count_down()

    @property
    def is_pinned(self) -> bool:
        return self._metadata.pin_count > 0

    def is_valid(self) -> bool:
        return self._valid

    def invalidate(self) -> None:
        self._valid = False

    def _mark_freed(self) -> None:
        # An explicit allocator.free() wins over outstanding references and pins.
        with self._lock:
            self._metadata.ref_count = 0
            self._metadata.pin_count = 0
            self._valid = False

    def __repr__(self) -> str:
        m = self._metadata
        return (
            f"{type(self).__name__}(fmt={m.fmt.name}, shape={tuple(m.shape)}, dtype={m.dtype}, "
            f"address={m.address}, phy_size={m.phy_size}, ref_count={m.ref_count}, "
            f"pin_count={m.pin_count}, valid={self._valid})"
        )


class TensorMemoryObj(RefCountedMemoryObj):
    """A MemoryObj over a slice of an allocator's flat uint8 region.

    ``raw_data`` is a flat uint8 tensor of at least ``get_size()`` bytes (the allocator
    passes its ``phy_size`` slice).
    """

    def __init__(
        self,
        raw_data: torch.Tensor,
        metadata: MemoryObjMetadata,
        parent_allocator: Any = None,
    ) -> None:
        super().__init__(metadata, parent_allocator)
        self.raw_data = raw_data
        # (shape, dtype, view): callers may rewrite metadata.shape (e.g. to trim the last
        # chunk), so the cached view is only reused while both still match.
        self._view_cache: tuple[torch.Size, torch.dtype, torch.Tensor] | None = None

    def get_size(self) -> int:
        m = self._metadata
        itemsize = m.dtype.itemsize if m.dtype is not None else 1
        return m.shape.numel() * itemsize

    @property
    def tensor(self) -> torch.Tensor | None:
        if not self._valid:
            # The seed's answer: no tensor. Never a view of memory that may already hold
            # another chunk; a caller that goes on to copy from None fails loudly.
            _log_misuse("freed-tensor", "tensor of %s, which was freed or invalidated: "
                        "returning None", self._describe())
            return None
        m = self._metadata
        cache = self._view_cache
        if cache is not None and cache[0] == m.shape and cache[1] == m.dtype:
            return cache[2]
        dtype = m.dtype if m.dtype is not None else torch.uint8
        view = self.raw_data[: self.get_size()].view(dtype).view(m.shape)
        self._view_cache = (m.shape, dtype, view)
        return view

    @property
    def byte_array(self) -> memoryview:
        self._check_valid()
        if self.raw_data.device.type != "cpu":
            raise RuntimeError(
                f"byte_array needs memory the CPU can address; this MemoryObj lives on "
                f"{self.raw_data.device}"
            )
        return memoryview(self.raw_data[: self.get_size()].numpy())


class BytesBufferMemoryObj(RefCountedMemoryObj):
    """A MemoryObj over a Python byte buffer (format ``BINARY_BUFFER``), e.g. bytes
    received from a remote store. Writable when made over a ``bytearray``.
    """

    def __init__(self, raw_bytes: bytes, metadata: MemoryObjMetadata | None = None) -> None:
        if metadata is None:
            metadata = MemoryObjMetadata(
                shape=torch.Size([len(raw_bytes)]),
                dtype=None,
                address=0,
                phy_size=len(raw_bytes),
                ref_count=1,
                fmt=MemoryFormat.BINARY_BUFFER,
            )
        super().__init__(metadata)
        self.raw_data = raw_bytes

    def get_size(self) -> int:
        return memoryview(self.raw_data).nbytes

    @property
    def tensor(self) -> torch.Tensor | None:
        return None

    @property
    def byte_array(self) -> memoryview:
        self._check_valid()
        return memoryview(self.raw_data).cast("B")


@dataclass
class FreeBlock:
    """A free byte range ``[start, start + size)`` in an allocator's region."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def release(memory_obj: MemoryObj) -> None:
    """Mark ``memory_obj`` freed by its allocator: an explicit ``free`` wins over any
    outstanding references and pins (for an allocator's ``free``)."""
    if isinstance(memory_obj, RefCountedMemoryObj):
        memory_obj._mark_freed()
    else:
        memory_obj.invalidate()


def warn_second_free(memory_obj: MemoryObj) -> None:
    """What an allocator's ``free`` does with an object it has already freed: nothing,
    with a warning (the seed's behaviour). Safe because allocators recognise their live
    objects by identity, so the memory, which may now belong to another object, is not
    touched."""
    _log_misuse("second-free", "free() of %r, which this allocator has already freed: "
                "ignored", memory_obj)


def normalize_shape(shape: Any) -> torch.Size:
    """``shape`` as a ``torch.Size`` of non-negative ints; ``ValueError`` otherwise."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise ValueError(
            f"shape must be a torch.Size or a sequence of non-negative ints, got {shape!r}"
        )
    try:
        dims = [operator.index(d) for d in shape]
    except TypeError:
        raise ValueError(
            f"shape must be a torch.Size or a sequence of non-negative ints, got {shape!r}"
        ) from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {tuple(dims)}")
    return torch.Size(dims)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


class TensorMemoryAllocator(MemoryAllocatorInterface):
    """An explicit free-list allocator over one preallocated tensor.

    The tensor is used as flat bytes. The usable region (`buffer`) starts at its
    first byte whose address is a multiple of `ALIGN_BYTES`, and every object's
    ``metadata.address`` is an offset into that region; every allocation is rounded up to
    `ALIGN_BYTES` (at least one unit), so every payload starts aligned. Allocation
    is first fit over a free list sorted by address; freeing merges the block with both
    neighbours, so an empty allocator always holds exactly one free block.
    """

    ALIGN_BYTES = 512

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_contiguous():
            raise ValueError("expected a contiguous tensor to allocate from")
        flat = tensor.reshape(-1).view(torch.uint8)
        skip = (-flat.data_ptr()) % self.ALIGN_BYTES
        usable = max(0, flat.numel() - skip) // self.ALIGN_BYTES * self.ALIGN_BYTES
        self.buffer: torch.Tensor = flat[skip : skip + usable]
        self._capacity = usable
        self._lock = threading.Lock()
        self._free_blocks: list[FreeBlock] = [FreeBlock(0, usable)] if usable else []
        self._live: dict[int, TensorMemoryObj] = {}
        self._allocated_bytes = 0

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.KV_BLOB,
    ) -> TensorMemoryObj | None:
        size_shape = normalize_shape(shape)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"dtype must be a torch.dtype for tensor memory (format {fmt.name}), got {dtype!r}"
            )
        nbytes = size_shape.numel() * dtype.itemsize
        phy_size = max(self.ALIGN_BYTES, _round_up(nbytes, self.ALIGN_BYTES))
        with self._lock:
            i = self._first_fit(phy_size)
            if i < 0:
                return None
            block = self._free_blocks[i]
            address = block.start
            if block.size == phy_size:
                del self._free_blocks[i]
            else:
                block.start += phy_size
                block.size -= phy_size
            metadata = MemoryObjMetadata(
                shape=size_shape,
                dtype=dtype,
                address=address,
                phy_size=phy_size,
                ref_count=1,
                fmt=fmt,
            )
            obj = TensorMemoryObj(self.buffer[address : address + phy_size], metadata, self)
            self._live[address] = obj
            self._allocated_bytes += phy_size
        return obj

    def free(self, memory_obj: MemoryObj) -> None:
        address = memory_obj.metadata.address
        with self._lock:
            if self._live.get(address) is not memory_obj:
                if getattr(memory_obj, "parent_allocator", self) is not self:
                    raise ValueError(
                        f"{memory_obj!r} was not allocated by this {type(self).__name__}"
                    )
                warn_second_free(memory_obj)
                return
            del self._live[address]
            phy_size = memory_obj.metadata.phy_size
            self._allocated_bytes -= phy_size
            self._insert_free_block(address, phy_size)
        release(memory_obj)

    def _first_fit(self, size: int) -> int:
        for i, block in enumerate(self._free_blocks):
            if block.size >= size:
                return i
        return -1

    def _insert_free_block(self, start: int, size: int) -> None:
        blocks = self._free_blocks
        i = bisect.bisect_left(blocks, start, key=operator.attrgetter("start"))
        merge_prev = i > 0 and blocks[i - 1].end == start
        merge_next = i < len(blocks) and blocks[i].start == start + size
        if merge_prev and merge_next:
            blocks[i - 1].size += size + blocks[i].size
            del blocks[i]
        elif merge_prev:
            blocks[i - 1].size += size
        elif merge_next:
            blocks[i].start = start
            blocks[i].size += size
        else:
            blocks.insert(i, FreeBlock(start, size))

    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        return memory_obj.get_ref_count()

    @property
    def free_blocks(self) -> list[FreeBlock]:
        """A snapshot of the free list, sorted by address."""
        with self._lock:
            return [FreeBlock(b.start, b.size) for b in self._free_blocks]

    @property
    def num_active_allocations(self) -> int:
        return len(self._live)

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_bytes

    #: The seed's name of `allocated_bytes`.
    total_allocated_size = allocated_bytes

    @property
    def capacity(self) -> int:
        return self._capacity

    def memcheck(self) -> bool:
        """Whether the free list and the live objects account for the region exactly:
        free blocks sorted, merged and inside the region, no live object overlapping a
        free block or another object, and the byte counts adding up. Logs what is wrong
        and returns False; never raises (the seed's check)."""
        with self._lock:
            ranges = sorted([(b.start, b.end, "free") for b in self._free_blocks]
                            + [(a, a + o.metadata.phy_size, "live")
                               for a, o in self._live.items()])
            problems = []
            position = 0
            for (start, end, kind), nxt in zip(ranges, ranges[1:] + [None]):
                if start < position:
                    problems.append(f"{kind} block [{start}, {end}) overlaps the one before")
                position = max(position, end)
                if kind == "free" and nxt is not None and nxt[2] == "free" \
                        and nxt[0] == end:
                    problems.append(f"free blocks at {start} and {end} are not merged")
            if position > self._capacity:
                problems.append(f"blocks reach byte {position}, past the region's "
                                f"{self._capacity}")
            free = sum(b.size for b in self._free_blocks)
            live = sum(o.metadata.phy_size for o in self._live.values())
            if live != self._allocated_bytes or free + live != self._capacity:
                problems.append(f"{free} free + {live} live bytes (counted "
                                f"{self._allocated_bytes}) for a region of {self._capacity}")
        for problem in problems:
            logger.error("memcheck of %s: %s", type(self).__name__, problem)
        return not problems


