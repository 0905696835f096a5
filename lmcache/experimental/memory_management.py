"""Where a chunk's KV lives while lmcache holds it: memory objects and their allocators.

A `MemoryObj` is one reference-counted piece of memory holding one chunk (a KV
blob, a serialized byte string, ...). An allocator hands them out of a region that was
reserved once at start-up, so that storing a chunk on the serving path never asks the
operating system or the CUDA driver for memory.

Allocators, by entry-point name in the ``lmcache.allocators`` group:

* ``host``   -- `HostMemoryAllocator`, ordinary (pageable) host memory;
* ``pinned`` -- `PinMemoryAllocator`, page-locked host memory for fast DMA to and
  from the GPU (ordinary memory, with a warning, where CUDA is missing);
* ``gpu``    -- `GPUMemoryAllocator`, one region on a CUDA device;
* ``mixed``  -- `MixedMemoryAllocator`, pinned memory for tensors and plain
  ``bytearray`` objects for byte buffers.
"""

from __future__ import annotations

import abc
import bisect
import mmap
import operator
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from pydantic import Field

from lmcache.plugin.options import PluginOptions

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


class MemoryFormat(Enum):
    """How the bytes of a `MemoryObj` are to be read."""

    UNDEFINED = 0
    #: A KV tensor of shape ``[2, num_layers, num_tokens, hidden_dim]`` (K and V stacked).
    KV_BLOB = 1
    #: A compressed or otherwise serialized binary array, held in tensor memory.
    BINARY = 2
    #: A plain byte buffer (a ``bytearray``), not backed by an allocator's region.
    BINARY_BUFFER = 3


_TENSOR_FORMATS = frozenset({MemoryFormat.UNDEFINED, MemoryFormat.KV_BLOB, MemoryFormat.BINARY})


class MemoryObjError(RuntimeError):
    """Base of the errors raised for a misused `MemoryObj` or allocator."""


class DoubleFreeError(MemoryObjError):
    """A MemoryObj was released more often than it was acquired.

    Raised by ``ref_count_down()`` on an object whose reference count is already zero,
    by ``unpin()`` on an object that is not pinned, and by an allocator's ``free()`` of
    an object it does not currently hold as allocated.
    """


class InvalidMemoryObjError(MemoryObjError):
    """The MemoryObj was freed or invalidated; its memory may already hold another chunk."""


class PinnedMemoryUnavailableWarning(RuntimeWarning):
    """Page-locked memory was asked for but needs CUDA; ordinary host memory is used."""


@dataclass
class MemoryObjMetadata:
    """What an allocator knows about one `MemoryObj`.

    ``address`` is the offset of the payload in the allocator's region and ``phy_size``
    the bytes reserved there (the payload rounded up to the allocator's alignment).
    ``pin_count`` counts outstanding `MemoryObj.pin` calls.
    """

    shape: torch.Size
    dtype: torch.dtype | None
    address: int
    phy_size: int
    ref_count: int
    fmt: MemoryFormat = MemoryFormat.UNDEFINED
    pin_count: int = 0


class MemoryObj(abc.ABC):
    """One reference-counted piece of memory that holds one chunk.

    Life cycle
        An allocator returns a new object with reference count 1, owned by the caller.
        Whoever keeps the object beyond the current call (a storage tier, a pending
        asynchronous write) takes its own reference with `ref_count_up` and gives
        it back with `ref_count_down`. When the count reaches zero the memory goes
        back to the allocator that made it, and the object becomes *invalid*: reading
        `tensor` or `byte_array` then raises `InvalidMemoryObjError`,
        because the same bytes may already belong to another chunk. Releasing more often
        than acquiring raises `DoubleFreeError`. Counting is thread-safe.

    Pinning
        `pin` marks an object that storage tiers must never evict (a chunk that a
        request is about to load, for instance). A pin *also holds a reference*: while
        pinned, the object cannot be freed by anyone else's ``ref_count_down``, and
        `unpin` gives that reference back (and may therefore free the object). Pins
        nest; `is_pinned` is true while at least one is outstanding. This is
        unrelated to page-locked ("pinned") host memory, which is the allocator's affair.

    Payload
        `tensor` is a typed view (dtype and shape from `metadata`) of the
        payload for tensor memory, ``None`` for byte buffers. `byte_array` is a
        writable ``memoryview`` of exactly the payload bytes (``get_size()`` of them) for
        memory the CPU can address. Neither copies.
    """

    @property
    @abc.abstractmethod
    def metadata(self) -> MemoryObjMetadata:
        """The object's metadata (shape, dtype, address, sizes, counts, format)."""

    @abc.abstractmethod
    def get_memory_format(self) -> MemoryFormat:
        """The format of the payload (see `MemoryFormat`)."""

    @property
    @abc.abstractmethod
    def tensor(self) -> torch.Tensor | None:
        """A typed view of the payload, or ``None`` for memory that is not a tensor.

        Raises `InvalidMemoryObjError` once the object is freed or invalidated.
        """

    @property
    @abc.abstractmethod
    def byte_array(self) -> memoryview:
        """A ``memoryview`` (format ``"B"``) of exactly the payload bytes, without a copy.

        Writable unless the object wraps immutable ``bytes``. Raises
        `InvalidMemoryObjError` once the object is freed or invalidated, and
        ``RuntimeError`` for memory the CPU cannot address (GPU memory).
        """

    @abc.abstractmethod
    def get_size(self) -> int:
        """Payload size in bytes (``numel * itemsize``), not the aligned ``phy_size``."""

    def get_shape(self) -> torch.Size:
        """The payload's shape."""
        return self.metadata.shape

    def get_dtype(self) -> torch.dtype | None:
        """The payload's dtype, ``None`` for byte buffers."""
        return self.metadata.dtype

    @abc.abstractmethod
    def ref_count_up(self) -> None:
        """Take one more reference. Raises `InvalidMemoryObjError` if freed."""

    @abc.abstractmethod
    def ref_count_down(self) -> None:
        """Give one reference back; at zero the memory returns to its allocator.

        Raises `DoubleFreeError` if the count is already zero.
        """

    @abc.abstractmethod
    def get_ref_count(self) -> int:
        """The number of outstanding references (pins included)."""

    @abc.abstractmethod
    def pin(self) -> None:
        """Protect the object from eviction; holds one reference until `unpin`."""

    @abc.abstractmethod
    def unpin(self) -> None:
        """Undo one `pin` and give back its reference.

        Raises `DoubleFreeError` if the object is not pinned.
        """

    @property
    @abc.abstractmethod
    def is_pinned(self) -> bool:
        """Whether at least one `pin` is outstanding; tiers never evict such objects."""

    @abc.abstractmethod
    def is_valid(self) -> bool:
        """False once the object was freed or `invalidate` was called."""

    @abc.abstractmethod
    def invalidate(self) -> None:
        """Mark the payload unusable (for instance after its memory was given back).

        Does not return memory by itself; that happens when the reference count reaches
        zero. Idempotent.
        """


class _RefCountedMemoryObj(MemoryObj):
    # The shared bookkeeping of the concrete objects: counts live in the metadata (the
    # seed's fields), guarded by a per-object lock; at zero the allocator gets it back.

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

    def _check_valid(self) -> None:
        if not self._valid:
            raise InvalidMemoryObjError(
                f"{type(self).__name__} at address {self._metadata.address} was freed or "
                "invalidated; its memory may already hold another chunk"
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


class TensorMemoryObj(_RefCountedMemoryObj):
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
        self._check_valid()
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


class BytesBufferMemoryObj(_RefCountedMemoryObj):
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
        self._check_valid()
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


class MemoryAllocatorInterface(abc.ABC):
    """Hands out `MemoryObj` instances from memory reserved up front.

    Contract for implementers:

    * `allocate` returns an object with reference count 1, or ``None`` when the
      request cannot be met right now (not enough contiguous space): running out is an
      expected event that the caller handles by evicting or skipping the chunk, never an
      exception. Malformed requests (negative dimensions, no dtype for tensor memory)
      raise ``ValueError`` naming what was expected.
    * `free` takes the memory back. Callers do not call it directly; an object's
      last ``ref_count_down()`` does. Freeing an object that is not currently allocated
      raises `DoubleFreeError`. After ``free`` the object is invalid.
    * All methods are safe to call from several threads.
    * For tests and leak checks, an allocator reports `num_active_allocations`,
      `allocated_bytes` (bytes reserved, alignment included) and `capacity`
      (bytes it can hand out in all).

    A plugin allocator also carries a nested ``Options`` model and a ``from_options``
    classmethod (see `lmcache.plugin.options`).
    """

    @abc.abstractmethod
    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.UNDEFINED,
    ) -> MemoryObj | None:
        """Allocate memory for a payload of ``shape`` and ``dtype`` in format ``fmt``.

        Returns the new object (reference count 1), or ``None`` if the allocation failed.
        """

    @abc.abstractmethod
    def free(self, memory_obj: MemoryObj) -> None:
        """Take back ``memory_obj``'s memory and invalidate it.

        Not to be called directly: use ``memory_obj.ref_count_down()``. Raises
        `DoubleFreeError` if ``memory_obj`` is not currently allocated here.
        """

    @abc.abstractmethod
    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        """The reference count of ``memory_obj``."""

    # Not abstract so that existing subclasses keep working; every built-in overrides them.
    @property
    def num_active_allocations(self) -> int:
        """Objects handed out and not yet freed."""
        raise NotImplementedError(f"{type(self).__name__} does not report its allocations")

    @property
    def allocated_bytes(self) -> int:
        """Bytes reserved by live objects (their ``phy_size``, alignment included)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its allocations")

    @property
    def capacity(self) -> int:
        """Bytes this allocator can hand out in all."""
        raise NotImplementedError(f"{type(self).__name__} does not report its capacity")


def _normalize_shape(shape: Any) -> torch.Size:
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
        size_shape = _normalize_shape(shape)
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
                raise DoubleFreeError(f"free() of {memory_obj!r}, which is not allocated")
            del self._live[address]
            phy_size = memory_obj.metadata.phy_size
            self._allocated_bytes -= phy_size
            self._insert_free_block(address, phy_size)
        if isinstance(memory_obj, _RefCountedMemoryObj):
            memory_obj._mark_freed()
        else:
            memory_obj.invalidate()

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

    @property
    def capacity(self) -> int:
        return self._capacity


def _reserve_region(size: int, *, pin_memory: bool = False, device: str = "cpu") -> torch.Tensor:
    # One extra alignment unit so that an aligned slice of round_down(size) bytes fits
    # wherever the region happens to start.
    try:
        size = operator.index(size)
    except TypeError:
        raise ValueError(f"size must be a non-negative int (bytes), got {size!r}") from None
    if size < 0:
        raise ValueError(f"size must be a non-negative int (bytes), got {size}")
    align = TensorMemoryAllocator.ALIGN_BYTES
    usable = size // align * align
    region = torch.empty(usable + align, dtype=torch.uint8, device=device, pin_memory=pin_memory)
    skip = (-region.data_ptr()) % align
    return region[skip : skip + usable]


def _prefault(region: torch.Tensor) -> None:
    # One store per page makes the kernel back every page now, not on the serving path.
    if region.numel():
        region[:: mmap.PAGESIZE].fill_(0)


class _RegionAllocator(MemoryAllocatorInterface):
    # Glue shared by the allocators that own one region and delegate to a
    # TensorMemoryAllocator over it.

    allocator: TensorMemoryAllocator

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.KV_BLOB,
    ) -> MemoryObj | None:
        return self.allocator.allocate(shape, dtype, fmt)

    def free(self, memory_obj: MemoryObj) -> None:
        self.allocator.free(memory_obj)

    def get_ref_count(self, memory_obj: MemoryObj) -> int:
        return memory_obj.get_ref_count()

    @property
    def free_blocks(self) -> list[FreeBlock]:
        """A snapshot of the region's free list, sorted by address."""
        return self.allocator.free_blocks

    @property
    def num_active_allocations(self) -> int:
        return self.allocator.num_active_allocations

    @property
    def allocated_bytes(self) -> int:
        return self.allocator.allocated_bytes

    @property
    def capacity(self) -> int:
        return self.allocator.capacity


def _config_size_bytes(size_gb: float) -> int:
    return int(size_gb * 1024**3)


class HostMemoryAllocator(_RegionAllocator):
    """Allocates from one region of ordinary (pageable) host memory of ``size`` bytes.

    ``prefault=True`` touches every page at construction, so that the first stores do not
    pay page faults.
    """

    class Options(PluginOptions):
        prefault: bool = Field(
            default=False,
            description="Touch every page of the region at start-up so that the first "
            "stores do not pay page faults (start-up takes longer).",
        )

    def __init__(self, size: int, *, prefault: bool = False) -> None:
        region = _reserve_region(size)
        if prefault:
            _prefault(region)
        self.allocator = TensorMemoryAllocator(region)

    @classmethod
    def from_options(
        cls, options: HostMemoryAllocator.Options, config: Any, metadata: Any, **context: Any
    ) -> HostMemoryAllocator:
        return cls(_config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)


_pin_fallback_warned = False
_pin_fallback_lock = threading.Lock()


def _warn_pin_fallback_once() -> None:
    global _pin_fallback_warned
    with _pin_fallback_lock:
        if _pin_fallback_warned:
            return
        _pin_fallback_warned = True
    warnings.warn(
        "pinned (page-locked) host memory needs CUDA and torch.cuda.is_available() is "
        "False; PinMemoryAllocator uses ordinary host memory instead",
        PinnedMemoryUnavailableWarning,
        stacklevel=3,
    )


class PinMemoryAllocator(_RegionAllocator):
    """Allocates from one region of page-locked host memory of ``size`` bytes.

    Without CUDA there is no page-locked memory to be had: the region is ordinary host
    memory and a `PinnedMemoryUnavailableWarning` is issued once per process.
    """

    class Options(PluginOptions):
        prefault: bool = Field(
            default=False,
            description="Touch every page of the region at start-up so that the first "
            "stores do not pay page faults (start-up takes longer).",
        )

    def __init__(self, size: int, *, prefault: bool = False) -> None:
        pinned = torch.cuda.is_available()
        if not pinned:
            _warn_pin_fallback_once()
        region = _reserve_region(size, pin_memory=pinned)
        self.is_page_locked = pinned
        if prefault:
            _prefault(region)
        self.allocator = TensorMemoryAllocator(region)

    @classmethod
    def from_options(
        cls, options: PinMemoryAllocator.Options, config: Any, metadata: Any, **context: Any
    ) -> PinMemoryAllocator:
        return cls(_config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)


class GPUMemoryAllocator(_RegionAllocator):
    """Allocates from one region of ``size`` bytes on a CUDA device."""

    class Options(PluginOptions):
        device: str = Field(
            default="cuda",
            description='The CUDA device that holds the region, e.g. "cuda" or "cuda:1".',
        )
        size_gb: float | None = Field(
            default=None,
            ge=0,
            description="Size of the region in GiB; by default max_local_cpu_size.",
        )

    def __init__(self, size: int, device: str = "cuda") -> None:
        torch_device = torch.device(device)
        if torch_device.type != "cuda":
            raise ValueError(f"GPUMemoryAllocator expects a CUDA device, got {device!r}")
        if not torch.cuda.is_available():
            raise RuntimeError(
                "GPUMemoryAllocator needs a CUDA device; torch.cuda.is_available() is False "
                f"(asked for {device!r}). Choose the 'pinned' or 'host' allocator instead."
            )
        self.device = torch_device
        self.allocator = TensorMemoryAllocator(_reserve_region(size, device=device))

    @classmethod
    def from_options(
        cls, options: GPUMemoryAllocator.Options, config: Any, metadata: Any, **context: Any
    ) -> GPUMemoryAllocator:
        size_gb = options.size_gb if options.size_gb is not None else config.max_local_cpu_size
        return cls(_config_size_bytes(size_gb), device=options.device)


class BufferAllocator(MemoryAllocatorInterface):
    """Allocates `BytesBufferMemoryObj` objects over fresh ``bytearray`` buffers.

    There is no region: buffers come from the Python heap, so `capacity` is
    unbounded (``sys.maxsize``). Live objects are still counted (and referenced) until
    freed, so leaks show in `num_active_allocations`.
    """

    def __init__(self, device: str = "cpu") -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"BufferAllocator holds CPU byte buffers; got device {device!r}")
        self.device = device
        self._lock = threading.Lock()
        self._live: dict[int, BytesBufferMemoryObj] = {}
        self._allocated_bytes = 0

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.BINARY_BUFFER,
    ) -> BytesBufferMemoryObj:
        if fmt != MemoryFormat.BINARY_BUFFER:
            raise ValueError(f"BufferAllocator allocates format BINARY_BUFFER, got {fmt.name}")
        size_shape = _normalize_shape(shape)
        if len(size_shape) < 1:
            raise ValueError("shape must give the buffer's length in bytes as shape[0]")
        nbytes = size_shape[0]
        obj = BytesBufferMemoryObj(bytearray(nbytes))
        obj.parent_allocator = self
        with self._lock:
            self._live[id(obj)] = obj
            self._allocated_bytes += nbytes
        return obj

    def free(self, memory_obj: MemoryObj) -> None:
        with self._lock:
            if self._live.get(id(memory_obj)) is not memory_obj:
                raise DoubleFreeError(f"free() of {memory_obj!r}, which is not allocated")
            del self._live[id(memory_obj)]
            self._allocated_bytes -= memory_obj.metadata.phy_size
        if isinstance(memory_obj, _RefCountedMemoryObj):
            memory_obj._mark_freed()
        else:
            memory_obj.invalidate()

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
        return sys.maxsize


class MixedMemoryAllocator(MemoryAllocatorInterface):
    """Tensor formats (KV_BLOB, BINARY, UNDEFINED) from a `PinMemoryAllocator` of
    ``size`` bytes; BINARY_BUFFER from a `BufferAllocator`.

    The accounting properties add both up, except `capacity`, which is the pinned
    region's (byte buffers live on the unbounded Python heap).
    """

    class Options(PluginOptions):
        prefault: bool = Field(
            default=False,
            description="Touch every page of the pinned region at start-up so that the "
            "first stores do not pay page faults (start-up takes longer).",
        )

    def __init__(self, size: int, *, prefault: bool = False) -> None:
        self.pin_allocator = PinMemoryAllocator(size, prefault=prefault)
        self.buffer_allocator = BufferAllocator("cpu")

    def allocate(
        self,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype | None,
        fmt: MemoryFormat = MemoryFormat.KV_BLOB,
    ) -> MemoryObj | None:
        if fmt == MemoryFormat.BINARY_BUFFER:
            return self.buffer_allocator.allocate(shape, dtype, fmt)
        if fmt in _TENSOR_FORMATS:
            return self.pin_allocator.allocate(shape, dtype, fmt)
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

    @classmethod
    def from_options(
        cls, options: MixedMemoryAllocator.Options, config: Any, metadata: Any, **context: Any
    ) -> MixedMemoryAllocator:
        return cls(_config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)
