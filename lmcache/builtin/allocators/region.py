"""Allocators that own one region of memory and hand it out through the free list of
`lmcache.kits.memory.TensorMemoryAllocator`.

* ``host``   -- `HostMemoryAllocator`, ordinary (pageable) host memory;
* ``pinned`` -- `PinMemoryAllocator`, page-locked host memory for fast DMA to and
  from the GPU (ordinary memory, with a warning, where CUDA is missing);
* ``gpu``    -- `GPUMemoryAllocator`, one region on a CUDA device.
"""

from __future__ import annotations

import mmap
import operator
import os
import threading
import warnings
from typing import Any

import torch
from pydantic import Field

from lmcache.abc.memory import MemoryAllocatorInterface, MemoryFormat, MemoryObj
from lmcache.kits.memory import FreeBlock, TensorMemoryAllocator
from lmcache.plugin.options import PluginOptions

__all__ = [
    "GPUMemoryAllocator",
    "HostMemoryAllocator",
    "PinMemoryAllocator",
    "PinnedMemoryUnavailableWarning",
    "PrefaultOptions",
]


class PinnedMemoryUnavailableWarning(RuntimeWarning):
    """Page-locked memory was asked for but needs CUDA; ordinary host memory is used."""


class PrefaultOptions(PluginOptions):
    """Options of the allocators that own a host region (``host``, ``pinned``, ``mixed``)."""

    prefault: bool = Field(
        default=False,
        description="Touch every page of the region at start-up so that the first "
        "stores do not pay page faults (start-up takes longer).",
    )


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
    if device == "cpu":
        physical = _physical_memory()
        if physical is not None and usable > physical:
            raise ValueError(f"cannot reserve {usable / 1024**3:.1f} GiB of host memory for "
                             f"the cache: this machine has {physical / 1024**3:.1f} GiB; "
                             "expected a smaller max_local_cpu_size")
    try:
        region = torch.empty(usable + align, dtype=torch.uint8, device=device,
                             pin_memory=pin_memory)
    except (RuntimeError, MemoryError) as exc:  # torch's OOM errors derive from these
        raise ValueError(f"cannot reserve {usable / 1024**3:.2f} GiB of "
                         f"{'page-locked ' if pin_memory else ''}{device} memory for the "
                         f"cache ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "expected a size this machine can hold (max_local_cpu_size)") from None
    skip = (-region.data_ptr()) % align
    return region[skip : skip + usable]


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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

    #: The seed's name of `allocated_bytes`.
    total_allocated_size = allocated_bytes

    def memcheck(self) -> bool:
        """See `TensorMemoryAllocator.memcheck`."""
        return self.allocator.memcheck()


def config_size_bytes(size_gb: float) -> int:
    return int(size_gb * 1024**3)


class HostMemoryAllocator(_RegionAllocator):
    """Allocates from one region of ordinary (pageable) host memory of ``size`` bytes.

    ``prefault=True`` touches every page at construction, so that the first stores do not
    pay page faults.
    """

    Options = PrefaultOptions

    def __init__(self, size: int, *, prefault: bool = False) -> None:
        region = _reserve_region(size)
        if prefault:
            _prefault(region)
        self.allocator = TensorMemoryAllocator(region)

    @classmethod
    def from_options(
        cls, options: PrefaultOptions, config: Any, metadata: Any
    ) -> HostMemoryAllocator:
        return cls(config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)


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

    Options = PrefaultOptions

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
        cls, options: PrefaultOptions, config: Any, metadata: Any
    ) -> PinMemoryAllocator:
        return cls(config_size_bytes(config.max_local_cpu_size), prefault=options.prefault)


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
        cls, options: GPUMemoryAllocator.Options, config: Any, metadata: Any
    ) -> GPUMemoryAllocator:
        size_gb = options.size_gb if options.size_gb is not None else config.max_local_cpu_size
        return cls(config_size_bytes(size_gb), device=options.device)


