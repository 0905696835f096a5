"""Allocators that own one region of memory and hand it out through the free list of
`lmcache.kits.memory.TensorMemoryAllocator`.

* ``host``   -- `HostMemoryAllocator`, ordinary (pageable) host memory;
* ``pinned`` -- `PinMemoryAllocator`, page-locked host memory for fast DMA to and
  from the GPU (ordinary memory, with a warning, where CUDA is missing);
* ``gpu``    -- `GPUMemoryAllocator`, one region on a CUDA device.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import mmap
import operator
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Literal

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
    "Prefault",
    "PrefaultOptions",
]

logger = logging.getLogger(__name__)


class PinnedMemoryUnavailableWarning(RuntimeWarning):
    """Page-locked memory was asked for but needs CUDA; ordinary host memory is used."""


class PrefaultOptions(PluginOptions):
    """Options of the allocators that own a host region (``host``, ``pinned``, ``mixed``)."""

    prefault: Literal[True, False, "background"] = Field(
        default="background",
        description='When the pages of the region get backed by memory. "background" '
        "(the default): a thread of idle priority backs the whole region after start-up, "
        "without writing to it, so start-up does not wait and stores do not pay page "
        "faults (Linux 5.14+; elsewhere pages are backed on first use). true: every page "
        "is touched before the allocator is returned (start-up waits). false: pages are "
        "backed on first use. Either of the first two commits the whole region, as "
        "page-locked memory always is.",
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


#: ``madvise`` advice that backs pages as a write would, without writing (Linux 5.14).
_MADV_POPULATE_WRITE = 23
#: Bytes populated per system call: short, so that the call never holds the process's
#: memory map for long (other threads' mmap/munmap wait for it) and `stop` is quick.
_PREFAULT_SLICE = 4 << 20
_THREAD_NAME = "lmcache-prefault"


def _libc_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _idle_priority() -> None:
    # The calling thread runs only when a core has nothing else to do (Linux): backing
    # pages never takes a core from the serving engine.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass


class Prefault:
    """Backs a host region with memory on a daemon thread of idle priority, low
    addresses first (where the allocator hands out first), so that stores do not pay
    page faults.

    Start-up does not wait, and the thread only runs on a core that has nothing else to
    do: on a serving machine the region is backed within seconds of start-up, while the
    serving engine loads its model. It never writes to the region: the kernel is asked
    to populate the pages (``MADV_POPULATE_WRITE``), so stores that come meanwhile are
    safe and fault the pages not reached yet themselves. Where the kernel cannot do that
    (before Linux 5.14, not Linux) nothing happens and `supported` is False. `stop` ends
    the thread within one slice (4 MiB); so does the allocator that started it becoming
    garbage, and so does the interpreter's exit, which waits for it (a thread still in
    the system call when the interpreter finalizes could abort the process).
    """

    def __init__(self, region: torch.Tensor, owner: object) -> None:
        self.done = threading.Event()
        self.supported: bool | None = None  # None until the first slice answered
        self.populated = 0
        #: Seconds from the start of the thread to its end (None until it ended).
        self.seconds: float | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        weakref.finalize(owner, self.stop)
        self._thread = threading.Thread(target=self._run, args=(region,),
                                        name=_THREAD_NAME, daemon=True)
        _running.add(self)
        self._thread.start()

    def _run(self, region: torch.Tensor) -> None:
        try:
            _idle_priority()
            madvise = _libc_madvise()
            page = mmap.PAGESIZE
            base = region.data_ptr()
            addr = (base + page - 1) // page * page
            last = (base + region.numel()) // page * page
            if madvise is None or last <= addr:
                self.supported = madvise is not None
                return
            while addr < last and not self._stop.is_set():
                n = min(_PREFAULT_SLICE, last - addr)
                if madvise(addr, n, _MADV_POPULATE_WRITE) != 0:
                    self.supported = self.populated > 0
                    logger.debug("prefault stopped after %d bytes: madvise: %s",
                                 self.populated, os.strerror(ctypes.get_errno()))
                    return
                self.supported = True
                addr += n
                self.populated += n
        finally:
            del region  # the memory may go as soon as the allocator does
            _running.discard(self)
            self.seconds = time.monotonic() - self._started
            self.done.set()

    def stop(self, wait: bool = False) -> None:
        """End the thread (within one slice; with ``wait``, return once it ended); the
        memory stays usable. Without ``wait`` it returns at once: at idle priority on a
        busy machine the last slice may take a while, and nothing needs to wait for it."""
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


#: Prefaults whose thread has not ended.
_running: weakref.WeakSet[Prefault] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for prefault in list(_running):
        prefault.stop()
    # every such thread still alive is joined, not just waited for: it frees the region
    # on its way out, which must not overlap the interpreter's finalization
    for thread in threading.enumerate():
        if thread.name == _THREAD_NAME and thread is not threading.current_thread():
            thread.join(5.0)


def _start_prefault(region: torch.Tensor, mode: bool | str, owner: object
                    ) -> Prefault | None:
    if mode is True:
        _prefault(region)
        return None
    if mode == "background":
        return Prefault(region, owner)
    return None


class _RegionAllocator(MemoryAllocatorInterface):
    # Glue shared by the allocators that own one region and delegate to a
    # TensorMemoryAllocator over it.

    allocator: TensorMemoryAllocator
    #: The background prefault of the region, if one was started.
    prefault: Prefault | None = None

    def close(self) -> None:
        """Stop background work on the region (its prefault); the memory stays usable
        until the allocator is garbage."""
        if self.prefault is not None:
            self.prefault.stop()

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

    ``prefault`` says when the region's pages get backed by memory (`PrefaultOptions`):
    ``"background"`` on a thread right away (`Prefault`), ``True`` before the
    constructor returns, ``False`` on first use.
    """

    Options = PrefaultOptions

    def __init__(self, size: int, *, prefault: bool | str = False) -> None:
        region = _reserve_region(size)
        self.prefault = _start_prefault(region, prefault, self)
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
    memory and a `PinnedMemoryUnavailableWarning` is issued once per process (unless
    ``warn_unpinned`` is False: the ``mixed`` default, which is right on both).
    """

    Options = PrefaultOptions

    def __init__(self, size: int, *, prefault: bool | str = False,
                 warn_unpinned: bool = True) -> None:
        pinned = torch.cuda.is_available()
        if not pinned and warn_unpinned:
            _warn_pin_fallback_once()
        region = _reserve_region(size, pin_memory=pinned)
        self.is_page_locked = pinned
        if not pinned:  # page-locked memory is resident already
            self.prefault = _start_prefault(region, prefault, self)
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


