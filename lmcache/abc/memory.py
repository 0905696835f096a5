"""The memory contract: memory objects and the allocators that hand them out.

A `MemoryObj` is one reference-counted piece of memory holding one chunk (a KV blob, a
serialized byte string, ...). A `MemoryAllocatorInterface` hands them out of memory it
reserved up front, so that storing a chunk on the serving path never asks the operating
system or the CUDA driver for memory.

Who calls what
    The engine allocates one object per chunk it stores (``allocate`` on the serving
    engine's thread, through the storage manager, which evicts from the hot tier and
    retries when ``allocate`` answers ``None``). Tiers allocate the objects their
    ``get_blocking`` returns from the allocator in their `TierContext`. Objects travel
    between threads (writer threads of lower tiers hold references), so every method
    here is thread-safe. Nobody calls ``free`` directly: an object's last
    ``ref_count_down`` does.

Concrete objects and a free-list allocator to build on are in `lmcache.kits.memory`;
lmcache's own allocators (``host``, ``pinned``, ``gpu``, ``mixed``) in
`lmcache.builtin.allocators`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = [
    "DoubleFreeError",
    "InvalidMemoryObjError",
    "MemoryAllocatorInterface",
    "MemoryFormat",
    "MemoryObj",
    "MemoryObjError",
    "MemoryObjMetadata",
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



class MemoryObjError(RuntimeError):
    """Base of the errors raised for a misused `MemoryObj` or allocator."""


class DoubleFreeError(MemoryObjError):
    """A MemoryObj was released more often than it was acquired.

    Raised by ``ref_count_down()`` on an object whose reference count is already zero
    and by ``unpin()`` on an object that is not pinned. (An allocator's second
    ``free()`` of one object only logs a warning.)
    """


class InvalidMemoryObjError(MemoryObjError):
    """The MemoryObj was freed or invalidated; its memory may already hold another chunk."""


@dataclass
class MemoryObjMetadata:
    """What an allocator knows about one `MemoryObj`.

    ``address`` is the offset of the payload in the allocator's region and ``phy_size``
    the bytes reserved there (the payload rounded up to the allocator's alignment).
    ``pin_count`` counts outstanding `MemoryObj.pin` calls. ``payload_checksum`` is
    ``(algorithm, value)`` of the payload when the code that wrote it computed it on the
    way (a connector's ``from_gpu`` during a store), so that storing the object need
    not read it again to checksum it; code that changes the payload of an object that
    carries one sets it to ``None``. A stale value can only make a stored copy fail its
    check (a miss), never pass one. Objects that tiers read back carry none.
    ``want_checksum`` names the algorithm whose checksum the object's stores will need
    (set by the engine before a ``from_gpu`` when a tier below the CPU will store it;
    ``None``: none will, so a writer need not compute one).
    """

    shape: torch.Size
    dtype: torch.dtype | None
    address: int
    phy_size: int
    ref_count: int
    fmt: MemoryFormat = MemoryFormat.UNDEFINED
    pin_count: int = 0
    payload_checksum: tuple[str, int] | None = None
    want_checksum: str | None = None


class MemoryObj(abc.ABC):
    """One reference-counted piece of memory that holds one chunk.

    Life cycle
        An allocator returns a new object with reference count 1, owned by the caller.
        Whoever keeps the object beyond the current call (a storage tier, a pending
        asynchronous write) takes its own reference with `ref_count_up` and gives
        it back with `ref_count_down`. When the count reaches zero the memory goes
        back to the allocator that made it, and the object becomes *invalid*: because
        the same bytes may already belong to another chunk, `tensor` is then ``None``
        (with a warning, as in the seed) and `byte_array`, `ref_count_up` and `pin`
        raise `InvalidMemoryObjError`. Releasing more often than acquiring raises
        `DoubleFreeError`. Counting is thread-safe.

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

        ``None`` (and a logged warning) once the object is freed or invalidated: never a
        view of memory that may hold another chunk by now.
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


class MemoryAllocatorInterface(abc.ABC):
    """Hands out `MemoryObj` instances from memory reserved up front.

    Contract for implementers:

    * `allocate` returns an object with reference count 1, or ``None`` when the
      request cannot be met right now (not enough contiguous space): running out is an
      expected event that the caller handles by evicting or skipping the chunk, never an
      exception. Malformed requests (negative dimensions, no dtype for tensor memory)
      raise ``ValueError`` naming what was expected.
    * `free` takes the memory back. Callers do not call it directly; an object's
      last ``ref_count_down()`` does. After ``free`` the object is invalid. Freeing an
      object a second time does nothing but log a warning (the seed's behaviour): the
      allocator recognises its live objects by identity, so memory that another object
      holds by now is never touched. An object of another allocator is a ``ValueError``.
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
        Called for every chunk on the serving engine's thread (store) and on tiers'
        reader threads (loads): it never waits -- for the operating system, for I/O, for
        other allocations to end -- and never raises for a full allocator.
        """

    @abc.abstractmethod
    def free(self, memory_obj: MemoryObj) -> None:
        """Take back ``memory_obj``'s memory and invalidate it.

        Not to be called directly: use ``memory_obj.ref_count_down()``. An object this
        allocator has already freed is ignored, with a warning.
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

    def close(self) -> None:
        """Stop the allocator's background work (such as backing its region with memory
        on a thread); called once when its engine closes. Objects handed out stay usable
        and memory returns when the allocator is garbage. The default does nothing."""
        return None
