"""Unit tests of lmcache.experimental.memory_management (allocators and MemoryObj)."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from types import SimpleNamespace

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from lmcache.builtin.allocators import region as mm
from lmcache.experimental.memory_management import (
    BufferAllocator,
    BytesBufferMemoryObj,
    DoubleFreeError,
    FreeBlock,
    GPUMemoryAllocator,
    HostMemoryAllocator,
    InvalidMemoryObjError,
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
    MemoryObjMetadata,
    MixedMemoryAllocator,
    PinMemoryAllocator,
    PinnedMemoryUnavailableWarning,
    TensorMemoryAllocator,
    TensorMemoryObj,
)

MiB = 1024 * 1024
ALIGN = TensorMemoryAllocator.ALIGN_BYTES
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU fallback")


@pytest.fixture
def host() -> HostMemoryAllocator:
    return HostMemoryAllocator(MiB)


def _assert_empty(allocator) -> None:
    assert allocator.num_active_allocations == 0
    assert allocator.allocated_bytes == 0
    assert allocator.free_blocks == [FreeBlock(0, allocator.capacity)]


# --- the module's surface ------------------------------------------------------------


def test_memory_format_values() -> None:
    assert [(f.name, f.value) for f in MemoryFormat] == [
        ("UNDEFINED", 0),
        ("KV_BLOB", 1),
        ("BINARY", 2),
        ("BINARY_BUFFER", 3),
    ]


def test_metadata_defaults() -> None:
    m = MemoryObjMetadata(torch.Size([4]), torch.float16, 0, 512, 1)
    assert m.fmt is MemoryFormat.UNDEFINED
    assert m.pin_count == 0


def test_interfaces_are_abstract() -> None:
    with pytest.raises(TypeError):
        MemoryObj()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        MemoryAllocatorInterface()  # type: ignore[abstract]
    assert TensorMemoryAllocator.ALIGN_BYTES == 512
    assert issubclass(DoubleFreeError, RuntimeError)
    assert issubclass(InvalidMemoryObjError, RuntimeError)


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_tensor_round_trip(host: HostMemoryAllocator, dtype: torch.dtype) -> None:
    shape = (2, 3, 7, 16)  # [2, num_layers, num_tokens, hidden_dim]
    obj = host.allocate(shape, dtype)
    assert obj is not None
    assert obj.get_memory_format() is MemoryFormat.KV_BLOB
    assert obj.get_shape() == torch.Size(shape)
    assert obj.get_dtype() == dtype
    assert obj.get_size() == 2 * 3 * 7 * 16 * dtype.itemsize
    assert obj.metadata.phy_size % ALIGN == 0 and obj.metadata.phy_size >= obj.get_size()

    src = torch.arange(2 * 3 * 7 * 16).reshape(shape).to(dtype)
    obj.tensor.copy_(src)
    assert obj.tensor.dtype == dtype and obj.tensor.shape == torch.Size(shape)
    assert torch.equal(obj.tensor, src)
    # The bytes seen through byte_array are the tensor's bytes, no copy in between.
    view = obj.byte_array
    assert isinstance(view, memoryview) and not view.readonly
    assert view.nbytes == obj.get_size()
    assert bytes(view) == src.contiguous().view(torch.uint8).numpy().tobytes()


def test_byte_array_writes_reach_tensor(host: HostMemoryAllocator) -> None:
    obj = host.allocate((4,), torch.float32)
    obj.byte_array[:] = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(torch.uint8).numpy().tobytes()
    assert obj.tensor.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_objects_do_not_share_bytes(host: HostMemoryAllocator) -> None:
    a = host.allocate((100,), torch.float32)
    b = host.allocate((100,), torch.float32)
    a.tensor.fill_(1.0)
    b.tensor.fill_(2.0)
    assert torch.all(a.tensor == 1.0) and torch.all(b.tensor == 2.0)


def test_metadata_shape_change_is_honoured(host: HostMemoryAllocator) -> None:
    obj = host.allocate((2, 2, 8, 4), torch.float16)
    assert obj.tensor.shape == (2, 2, 8, 4)
    obj.metadata.shape = torch.Size([2, 2, 5, 4])  # e.g. a shorter last chunk
    assert obj.tensor.shape == (2, 2, 5, 4)
    assert obj.get_size() == 2 * 2 * 5 * 4 * 2


def test_zero_sized_allocation(host: HostMemoryAllocator) -> None:
    a = host.allocate((0, 4), torch.float32)
    b = host.allocate((0,), torch.float32)
    assert a.get_size() == 0 and a.tensor.numel() == 0 and a.byte_array.nbytes == 0
    assert a.metadata.address != b.metadata.address  # still distinct, freeable objects
    a.ref_count_down()
    b.ref_count_down()
    _assert_empty(host)


# --- alignment -----------------------------------------------------------------------


def test_alignment_over_misaligned_tensor() -> None:
    raw = torch.empty(64 * 1024 + 3 * ALIGN, dtype=torch.uint8)
    misaligned = raw[(-raw.data_ptr()) % ALIGN + 1 :]  # starts one byte past a boundary
    assert misaligned.data_ptr() % ALIGN == 1
    alloc = TensorMemoryAllocator(misaligned)
    assert alloc.capacity % ALIGN == 0
    assert alloc.capacity == (misaligned.numel() - (ALIGN - 1)) // ALIGN * ALIGN
    objs = [alloc.allocate((n,), torch.uint8) for n in (1, 511, 512, 513, 1000)]
    for obj in objs:
        assert obj.tensor.data_ptr() % ALIGN == 0
        assert obj.metadata.address % ALIGN == 0
    assert [o.metadata.phy_size for o in objs] == [512, 512, 512, 1024, 1024]


def test_host_capacity_and_alignment() -> None:
    alloc = HostMemoryAllocator(MiB + 100)
    assert alloc.capacity == MiB  # rounded down to whole alignment units
    obj = alloc.allocate((MiB // 4,), torch.float32)
    assert obj is not None and obj.tensor.data_ptr() % ALIGN == 0


def test_allocator_accepts_other_dtypes_and_refuses_non_contiguous() -> None:
    alloc = TensorMemoryAllocator(torch.empty(4096, dtype=torch.float32))
    assert alloc.capacity >= 4096 * 4 - ALIGN
    with pytest.raises(ValueError, match="contiguous"):
        TensorMemoryAllocator(torch.empty(64, 64, dtype=torch.uint8).t())


# --- failure and bad arguments -------------------------------------------------------


def test_allocation_failure_returns_none(host: HostMemoryAllocator) -> None:
    assert host.allocate((MiB + 1,), torch.uint8) is None
    whole = host.allocate((MiB,), torch.uint8)
    assert whole is not None
    assert host.allocate((1,), torch.uint8) is None
    whole.ref_count_down()
    assert host.allocate((1,), torch.uint8) is not None


def test_fragmentation_failure_returns_none(host: HostMemoryAllocator) -> None:
    objs = [host.allocate((MiB // 8,), torch.uint8) for _ in range(8)]
    for obj in objs[::2]:
        obj.ref_count_down()
    assert host.allocated_bytes == MiB // 2
    # Half the region is free, but no contiguous quarter is.
    assert host.allocate((MiB // 4,), torch.uint8) is None


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((-1, 4), torch.float16, "non-negative"),
        ((2, 2.5), torch.float16, "sequence of non-negative ints"),
        ("abc", torch.float16, "sequence of non-negative ints"),
        (7, torch.float16, "sequence of non-negative ints"),
        ((4,), None, "dtype must be a torch.dtype"),
        ((4,), "float16", "dtype must be a torch.dtype"),
    ],
)
def test_bad_arguments_raise_value_error(host, shape, dtype, match) -> None:
    with pytest.raises(ValueError, match=match):
        host.allocate(shape, dtype)
    _assert_empty(host)


def test_bad_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        HostMemoryAllocator(-1)
    with pytest.raises(ValueError, match="non-negative int"):
        HostMemoryAllocator(1.5)  # type: ignore[arg-type]


# --- reference counting, validity, pinning -------------------------------------------


def test_ref_count_returns_memory_at_zero(host: HostMemoryAllocator) -> None:
    obj = host.allocate((1000,), torch.float16)
    assert obj.get_ref_count() == 1 and host.get_ref_count(obj) == 1
    assert host.num_active_allocations == 1 and host.allocated_bytes == 2048
    obj.ref_count_up()
    assert obj.get_ref_count() == 2
    obj.ref_count_down()
    assert obj.is_valid() and host.num_active_allocations == 1
    obj.ref_count_down()
    assert not obj.is_valid()
    _assert_empty(host)


def test_freed_object_access_raises(host: HostMemoryAllocator, caplog) -> None:
    obj = host.allocate((16,), torch.float32)
    obj.ref_count_down()
    # the seed's answer for the tensor: None and a warning, never the reused memory
    with caplog.at_level(logging.DEBUG, logger="lmcache.kits.memory"):
        assert obj.tensor is None
    assert "freed" in caplog.text
    with pytest.raises(RuntimeError):
        _ = obj.byte_array
    with pytest.raises(InvalidMemoryObjError):
        obj.ref_count_up()
    with pytest.raises(InvalidMemoryObjError):
        obj.pin()


def test_invalidate_blocks_access_but_keeps_memory(host: HostMemoryAllocator) -> None:
    obj = host.allocate((16,), torch.float32)
    obj.invalidate()
    assert not obj.is_valid()
    assert obj.tensor is None
    with pytest.raises(InvalidMemoryObjError):
        _ = obj.byte_array
    assert host.num_active_allocations == 1
    obj.ref_count_down()
    _assert_empty(host)


def test_ref_count_down_at_zero_is_double_free(host: HostMemoryAllocator) -> None:
    obj = host.allocate((16,), torch.float32)
    obj.ref_count_down()
    with pytest.raises(DoubleFreeError):
        obj.ref_count_down()
    _assert_empty(host)


def test_second_free_is_ignored_with_a_warning(host: HostMemoryAllocator, caplog) -> None:
    # The seed's behaviour: a second free() does not crash. It must not touch memory
    # that another object holds by now either.
    obj = host.allocate((16,), torch.float32)
    host.free(obj)
    assert not obj.is_valid() and obj.get_ref_count() == 0
    with caplog.at_level(logging.DEBUG, logger="lmcache.kits.memory"):
        host.free(obj)
    assert "already freed" in caplog.text
    assert host.memcheck() and host.num_active_allocations == 0
    # The same address handed to a new object must not be freeable through the old one.
    again = host.allocate((16,), torch.float32)
    assert again.metadata.address == obj.metadata.address
    again.tensor.fill_(7)
    host.free(obj)
    assert again.is_valid() and host.num_active_allocations == 1
    assert torch.all(again.tensor == 7) and host.memcheck()
    # ... and the region it holds is not handed out twice
    other = host.allocate((16,), torch.float32)
    assert other.metadata.address != again.metadata.address


def test_free_of_foreign_object_refused() -> None:
    a, b = HostMemoryAllocator(64 * 1024), HostMemoryAllocator(64 * 1024)
    obj = a.allocate((16,), torch.uint8)
    with pytest.raises(ValueError, match="not allocated by"):
        b.free(obj)
    assert obj.is_valid()


def test_pin_holds_a_reference(host: HostMemoryAllocator) -> None:
    obj = host.allocate((16,), torch.float32)
    assert not obj.is_pinned
    obj.pin()
    obj.pin()
    assert obj.is_pinned and obj.get_ref_count() == 3
    obj.ref_count_down()  # the owner lets go; the pins keep it alive
    assert obj.is_valid() and obj.is_pinned
    obj.unpin()
    assert obj.is_pinned
    obj.unpin()
    assert not obj.is_pinned and not obj.is_valid()
    _assert_empty(host)
    with pytest.raises(DoubleFreeError):
        obj.unpin()


def test_unpin_without_pin_raises(host: HostMemoryAllocator) -> None:
    obj = host.allocate((16,), torch.float32)
    with pytest.raises(DoubleFreeError):
        obj.unpin()
    assert obj.get_ref_count() == 1 and obj.is_valid()


def test_standalone_tensor_obj_invalidates_at_zero() -> None:
    raw = torch.zeros(64, dtype=torch.uint8)
    meta = MemoryObjMetadata(torch.Size([16]), torch.float32, 0, 64, 1, MemoryFormat.KV_BLOB)
    obj = TensorMemoryObj(raw, meta)
    obj.tensor.fill_(3.0)
    assert obj.byte_array.nbytes == 64
    obj.ref_count_down()
    assert not obj.is_valid()


# --- coalescing ----------------------------------------------------------------------


@pytest.mark.parametrize("order", [(0, 2, 1), (1, 0, 2), (2, 1, 0), (0, 1, 2)])
def test_coalescing(host: HostMemoryAllocator, order) -> None:
    objs = [host.allocate((5000,), torch.uint8) for _ in range(3)]  # A, B, C
    addrs = [o.metadata.address for o in objs]
    assert addrs == sorted(addrs) and len(set(addrs)) == 3
    for i in order:
        objs[i].ref_count_down()
    _assert_empty(host)
    assert host.allocate((MiB,), torch.uint8) is not None


def test_free_a_and_c_then_b_leaves_one_block(host: HostMemoryAllocator) -> None:
    a, b, c = (host.allocate((4096,), torch.uint8) for _ in range(3))
    a.ref_count_down()
    c.ref_count_down()
    assert len(host.free_blocks) == 2  # [A] and [C + rest]
    b.ref_count_down()
    assert host.free_blocks == [FreeBlock(0, MiB)]


# --- threads -------------------------------------------------------------------------


def test_threads_allocate_and_free(host: HostMemoryAllocator) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        try:
            barrier.wait()
            for i in range(200):
                obj = host.allocate(((seed * 31 + i * 17) % 3000 + 1,), torch.uint8)
                if obj is None:
                    continue
                obj.tensor.fill_(seed)
                obj.ref_count_up()
                obj.ref_count_down()
                assert torch.all(obj.tensor == seed), "another thread wrote into my chunk"
                obj.ref_count_down()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _assert_empty(host)


def test_threads_share_one_object(host: HostMemoryAllocator) -> None:
    obj = host.allocate((16,), torch.uint8)

    def worker() -> None:
        for _ in range(500):
            obj.ref_count_up()
            obj.ref_count_down()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert obj.get_ref_count() == 1 and obj.is_valid()
    obj.ref_count_down()
    _assert_empty(host)


# --- pinned, GPU, mixed, buffer ------------------------------------------------------


@needs_no_cuda
def test_the_default_mixed_allocator_falls_back_without_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(mm, "_pin_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alloc = MixedMemoryAllocator(64 * 1024)
    assert not [w for w in caught if issubclass(w.category, PinnedMemoryUnavailableWarning)]
    assert not alloc.pin_allocator.is_page_locked


@needs_no_cuda
def test_pin_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm, "_pin_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = PinMemoryAllocator(64 * 1024)
        second = PinMemoryAllocator(64 * 1024)
    relevant = [w for w in caught if issubclass(w.category, PinnedMemoryUnavailableWarning)]
    assert len(relevant) == 1
    assert "needs CUDA" in str(relevant[0].message)
    assert relevant[0].filename == __file__  # points at the caller, not at lmcache
    for alloc in (first, second):
        assert not alloc.is_page_locked
        obj = alloc.allocate((2, 1, 4, 8), torch.float16)
        assert obj.tensor.data_ptr() % ALIGN == 0
        obj.ref_count_down()
        _assert_empty(alloc)


@needs_no_cuda
def test_gpu_allocator_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match=r"needs a CUDA device; torch.cuda.is_available\(\)"):
        GPUMemoryAllocator(MiB)


def test_gpu_allocator_refuses_non_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        GPUMemoryAllocator(MiB, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_allocator_on_cuda() -> None:
    alloc = GPUMemoryAllocator(MiB, device="cuda")
    obj = alloc.allocate((2, 2, 16, 8), torch.bfloat16)
    assert obj.tensor.is_cuda and obj.tensor.data_ptr() % ALIGN == 0
    src = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, device="cuda")
    obj.tensor.copy_(src)
    assert torch.equal(obj.tensor, src)
    with pytest.raises(RuntimeError, match="CPU"):
        _ = obj.byte_array
    obj.ref_count_down()
    _assert_empty(alloc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_allocator_is_page_locked_on_cuda() -> None:
    alloc = PinMemoryAllocator(MiB)
    obj = alloc.allocate((256,), torch.float32)
    assert alloc.is_page_locked and obj.tensor.is_pinned()
    obj.tensor.copy_(torch.arange(256, dtype=torch.float32, device="cuda"), non_blocking=True)
    torch.cuda.synchronize()
    assert obj.tensor[255].item() == 255.0
    obj.ref_count_down()
    _assert_empty(alloc)


@pytest.mark.filterwarnings(
    "ignore::lmcache.experimental.memory_management.PinnedMemoryUnavailableWarning"
)
def test_mixed_allocator_routing() -> None:
    alloc = MixedMemoryAllocator(MiB)
    assert alloc.capacity == MiB
    kv = alloc.allocate((2, 2, 8, 16), torch.float16)  # KV_BLOB by default
    binary = alloc.allocate((100,), torch.uint8, MemoryFormat.BINARY)
    undefined = alloc.allocate((10,), torch.float32, MemoryFormat.UNDEFINED)
    buf = alloc.allocate((100,), None, MemoryFormat.BINARY_BUFFER)
    for obj in (kv, binary, undefined):
        assert isinstance(obj, TensorMemoryObj)
    assert [o.get_memory_format() for o in (kv, binary, undefined)] == [
        MemoryFormat.KV_BLOB,
        MemoryFormat.BINARY,
        MemoryFormat.UNDEFINED,
    ]
    assert isinstance(buf, BytesBufferMemoryObj) and buf.tensor is None
    assert alloc.pin_allocator.num_active_allocations == 3
    assert alloc.buffer_allocator.num_active_allocations == 1
    assert alloc.num_active_allocations == 4
    assert alloc.allocated_bytes == 1024 + 512 + 512 + 100
    assert alloc.get_ref_count(buf) == 1 and alloc.get_ref_count(kv) == 1

    alloc.free(buf)  # explicit free routes by type
    assert not buf.is_valid() and alloc.buffer_allocator.num_active_allocations == 0
    alloc.free(buf)  # a second free is ignored (with a warning)
    assert alloc.buffer_allocator.num_active_allocations == 0 and alloc.memcheck()
    for obj in (kv, binary, undefined):
        obj.ref_count_down()
    assert alloc.num_active_allocations == 0 and alloc.allocated_bytes == 0
    _assert_empty(alloc.pin_allocator)
    assert alloc.allocate((MiB + 1,), torch.uint8) is None


def test_buffer_allocator() -> None:
    alloc = BufferAllocator()
    obj = alloc.allocate((10,), None)
    assert isinstance(obj, BytesBufferMemoryObj)
    assert obj.get_memory_format() is MemoryFormat.BINARY_BUFFER
    assert obj.get_size() == 10 and obj.get_shape() == torch.Size([10])
    assert obj.tensor is None
    obj.byte_array[:] = b"0123456789"
    assert bytes(obj.raw_data) == b"0123456789"
    assert alloc.num_active_allocations == 1 and alloc.allocated_bytes == 10
    obj.ref_count_up()
    obj.ref_count_down()
    assert obj.is_valid()
    obj.ref_count_down()
    assert not obj.is_valid()
    assert alloc.num_active_allocations == 0 and alloc.allocated_bytes == 0
    with pytest.raises(InvalidMemoryObjError):
        _ = obj.byte_array
    alloc.free(obj)  # a second free is ignored (with a warning)
    assert alloc.allocated_bytes == 0 and alloc.memcheck()
    with pytest.raises(ValueError, match="not allocated by"):
        alloc.free(BufferAllocator().allocate((4,), None))
    with pytest.raises(ValueError, match="BINARY_BUFFER"):
        alloc.allocate((10,), None, MemoryFormat.KV_BLOB)
    with pytest.raises(ValueError, match="non-negative"):
        alloc.allocate((-1,), None)


def test_bytes_buffer_obj_over_bytes() -> None:
    obj = BytesBufferMemoryObj(b"abc")
    assert obj.metadata.fmt is MemoryFormat.BINARY_BUFFER and obj.metadata.ref_count == 1
    assert obj.get_size() == 3 and obj.metadata.dtype is None
    assert bytes(obj.byte_array) == b"abc" and obj.byte_array.readonly
    obj.ref_count_down()
    assert not obj.is_valid()


# --- plugin options ------------------------------------------------------------------


ALLOCATOR_CLASSES = [
    HostMemoryAllocator,
    PinMemoryAllocator,
    GPUMemoryAllocator,
    MixedMemoryAllocator,
]


@pytest.mark.parametrize("cls", ALLOCATOR_CLASSES)
def test_options_refuse_unknown_keys(cls) -> None:
    cls.Options()
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        cls.Options(bogus=1)
    for name, field in cls.Options.model_fields.items():
        assert field.description, f"{cls.__name__}.Options.{name} lacks a description"


@pytest.mark.filterwarnings(
    "ignore::lmcache.experimental.memory_management.PinnedMemoryUnavailableWarning"
)
@pytest.mark.parametrize("cls", [HostMemoryAllocator, PinMemoryAllocator, MixedMemoryAllocator])
def test_from_options_sizes_from_config(cls) -> None:
    config = SimpleNamespace(max_local_cpu_size=1 / 1024)  # 1 MiB
    alloc = cls.from_options(cls.Options(prefault=True), config, None)
    assert isinstance(alloc, cls)
    assert alloc.capacity == MiB
    obj = alloc.allocate((MiB,), torch.uint8)
    assert obj is not None
    obj.ref_count_down()


@needs_no_cuda
def test_gpu_from_options_without_cuda_raises() -> None:
    opts = GPUMemoryAllocator.Options(device="cuda:0", size_gb=0.001)
    assert opts.device == "cuda:0" and opts.size_gb == 0.001
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GPUMemoryAllocator.from_options(opts, SimpleNamespace(max_local_cpu_size=1.0), None)


def test_prefault_leaves_region_usable() -> None:
    alloc = HostMemoryAllocator(MiB, prefault=True)
    obj = alloc.allocate((MiB // 4,), torch.float32)
    obj.tensor.fill_(1.5)
    assert float(obj.tensor.sum()) == 1.5 * (MiB // 4)


def _resident_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s pages that are backed by memory (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    length = t.data_ptr() + t.numel() * t.element_size() - start
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0
    return sum(b & 1 for b in vec) * page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE")
def test_background_prefault_backs_the_region_and_keeps_stored_bytes(monkeypatch) -> None:
    # The default: start-up does not wait, the region gets backed, and stores that race
    # the thread keep their bytes. (The thread's idle priority is left out here: on a
    # busy machine it would wait for a free core.)
    from lmcache.builtin.allocators.region import Prefault

    class Owner:
        pass

    monkeypatch.setattr(mm, "_idle_priority", lambda: None)
    region = torch.empty(64 * MiB, dtype=torch.uint8)
    owner = Owner()
    prefault = Prefault(region, owner)
    region[:4 * MiB].fill_(7)
    region[-MiB:].fill_(9)
    assert prefault.done.wait(30)
    if prefault.supported is False:
        pytest.skip("this kernel cannot populate pages without writing (before 5.14)")
    assert prefault.populated >= 64 * MiB - 8192
    assert _resident_bytes(region) >= 64 * MiB
    assert bool((region[:4 * MiB] == 7).all()) and bool((region[-MiB:] == 9).all())
    assert not region[4 * MiB:-MiB].any()
    # stopped early when the allocator that started it goes
    big = torch.empty(1024 * MiB, dtype=torch.uint8)
    other = Owner()
    stopped = Prefault(big, other)
    del other
    assert stopped.done.wait(10) and stopped.populated < 1024 * MiB


def test_allocator_prefault_modes_from_the_configuration(monkeypatch) -> None:
    monkeypatch.setattr(mm, "_idle_priority", lambda: None)
    config = SimpleNamespace(max_local_cpu_size=4 / 1024)  # 4 MiB
    default = HostMemoryAllocator.from_options(HostMemoryAllocator.Options(), config, None)
    assert default.prefault is not None  # "background" unless told otherwise
    obj = default.allocate((MiB,), torch.float32)
    obj.tensor.fill_(2.0)  # races the thread: the bytes stay
    assert default.prefault.done.wait(10)
    assert float(obj.tensor.sum()) == 2.0 * MiB
    obj.ref_count_down()
    default.close()
    off = HostMemoryAllocator.from_options(HostMemoryAllocator.Options(prefault=False),
                                           config, None)
    assert off.prefault is None
    mixed = MixedMemoryAllocator.from_options(MixedMemoryAllocator.Options(), config, None)
    assert mixed.prefault is not None or mixed.pin_allocator.is_page_locked
    mixed.close()
    assert mixed.prefault is None or mixed.prefault.done.wait(5)


# --- properties ----------------------------------------------------------------------

REGION = 256 * 1024
DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / free / ref-count traffic against one TensorMemoryAllocator."""

    objs = Bundle("objs")

    def __init__(self) -> None:
        super().__init__()
        raw = torch.empty(REGION + 1000, dtype=torch.uint8)
        self.alloc = TensorMemoryAllocator(raw[7:])  # deliberately misaligned base
        self.live: dict[int, TensorMemoryObj] = {}

    @rule(
        target=objs,
        dims=st.lists(st.integers(0, 64), min_size=1, max_size=3),
        dtype=st.sampled_from(DTYPES),
        fmt=st.sampled_from([MemoryFormat.KV_BLOB, MemoryFormat.BINARY, MemoryFormat.UNDEFINED]),
    )
    def allocate(self, dims, dtype, fmt):
        obj = self.alloc.allocate(tuple(dims), dtype, fmt)
        if obj is None:
            need = max(ALIGN, -(-torch.Size(dims).numel() * dtype.itemsize // ALIGN) * ALIGN)
            assert all(b.size < need for b in self.alloc.free_blocks)
            return None
        assert obj.get_ref_count() == 1 and obj.get_memory_format() is fmt
        self.live[id(obj)] = obj
        obj.tensor.view(torch.uint8).reshape(-1).fill_(obj.metadata.address // ALIGN % 251)
        return obj

    @rule(obj=consumes(objs))
    def release(self, obj):
        if obj is None:
            return
        obj.ref_count_down()
        del self.live[id(obj)]
        assert not obj.is_valid()

    @rule(obj=objs)
    def share(self, obj):
        if obj is None:
            return
        obj.ref_count_up()
        obj.ref_count_down()
        assert obj.is_valid() and obj.get_ref_count() == 1

    @invariant()
    def no_overlap_and_aligned(self):
        spans = sorted((o.metadata.address, o.metadata.phy_size) for o in self.live.values())
        for (a, sa), (b, _) in zip(spans, spans[1:]):
            assert a + sa <= b
        for o in self.live.values():
            assert o.tensor.data_ptr() % ALIGN == 0
            assert o.metadata.phy_size % ALIGN == 0 and o.metadata.phy_size >= o.get_size()
            # Nobody else wrote into this object's bytes.
            expected = o.metadata.address // ALIGN % 251
            assert bool((o.tensor.view(torch.uint8).reshape(-1) == expected).all())

    @invariant()
    def accounting(self):
        assert self.alloc.allocated_bytes == sum(o.metadata.phy_size for o in self.live.values())
        assert self.alloc.num_active_allocations == len(self.live)
        free = self.alloc.free_blocks
        assert sum(b.size for b in free) + self.alloc.allocated_bytes == self.alloc.capacity
        for a, b in zip(free, free[1:]):
            assert a.start + a.size < b.start  # sorted and fully coalesced

    def teardown(self):
        for obj in list(self.live.values()):
            obj.ref_count_down()
        assert self.alloc.allocated_bytes == 0
        assert self.alloc.free_blocks == [FreeBlock(0, self.alloc.capacity)]
        whole = self.alloc.allocate((self.alloc.capacity,), torch.uint8)
        assert whole is not None
        whole.ref_count_down()


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase
