"""Unit tests of lmcache.experimental.gpu_connector (vLLM nested-tuple and paged connectors)."""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from lmcache.abc.gpu_connector import ConnectorContext
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import (
    GPUConnectorInterface,
    VLLMNestedTupleGPUConnector,
    VLLMPagedMemGPUConnector,
    VLLMPagedMemGPUConnectorV2,
)
from lmcache.experimental.memory_management import (
    BytesBufferMemoryObj,
    HostMemoryAllocator,
    MemoryFormat,
    MemoryObj,
)

LAYERS, HEADS, HEAD_SIZE = 3, 2, 8
HIDDEN = HEADS * HEAD_SIZE
NUM_BLOCKS, BLOCK_SIZE = 24, 16
NUM_SLOTS = NUM_BLOCKS * BLOCK_SIZE
SEQ_LEN = 300  # 4 chunks of 64 and a partial one of 44
CHUNK = 64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PAGED = [
    pytest.param(lambda: VLLMPagedMemGPUConnector(HIDDEN, LAYERS), id="v1"),
    pytest.param(lambda: VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS), id="v2"),
    pytest.param(lambda: VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, use_gpu=True),
                 id="v2-staging"),
]
LAYOUTS = ["pairs", "stacked"]


@pytest.fixture
def allocator() -> Iterator[HostMemoryAllocator]:
    alloc = HostMemoryAllocator(16 * 1024 * 1024)
    yield alloc
    assert alloc.num_active_allocations == 0, "a test leaked a memory object"


# --- helpers ---------------------------------------------------------------------------


def _random(shape, dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    # Values that an arithmetic "copy" would not preserve bit for bit: -0.0, inf, tiny.
    t = torch.randn(shape, generator=gen).to(dtype)
    flat = t.view(-1)
    flat[::7] = -0.0
    flat[3::11] = float("inf")
    flat[5::13] = torch.finfo(dtype).tiny
    return t.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern, so that comparisons are bit-exact (-0.0 != 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _paged_cache(layout: str, dtype, gen, device="cpu", num_layers=LAYERS) -> list:
    """``kvcaches`` in one of the two accepted layouts."""
    caches = []
    for _ in range(num_layers):
        kv = _random((2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE), dtype, gen, device)
        caches.append(kv if layout == "stacked" else (kv[0].clone(), kv[1].clone()))
    return caches


def _flats(caches) -> list[torch.Tensor]:
    """A ``[2, num_slots, hidden]`` copy of each layer (slot = block * block_size + offset)."""
    return [torch.stack([layer[0].reshape(NUM_SLOTS, HIDDEN), layer[1].reshape(NUM_SLOTS, HIDDEN)])
            for layer in caches]


def _expected_blob(caches, slots: list[int]) -> torch.Tensor:
    # Reference gather, token by token from (block, offset): independent of the connector.
    out = []
    for kv in (0, 1):
        per_layer = []
        for layer in caches:
            rows = [layer[kv][s // BLOCK_SIZE, s % BLOCK_SIZE].reshape(HIDDEN) for s in slots]
            per_layer.append(torch.stack(rows) if rows else layer[kv].new_empty(0, HIDDEN))
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def _slot_mapping(gen: torch.Generator, seq_len=SEQ_LEN, prefix=0) -> torch.Tensor:
    # distinct slots in random blocks and offsets; the last slot is never mapped, so a -1
    # used as an index (which wraps to it) would show up as a write there
    slots = torch.randperm(NUM_SLOTS - 1, generator=gen)[:seq_len]
    slots[:prefix] = -1
    return slots


def _alloc(allocator, connector, n, dtype, fmt=MemoryFormat.KV_BLOB) -> MemoryObj:
    obj = allocator.allocate(connector.get_shape(n), dtype, fmt)
    assert obj is not None
    return obj


def _chunks(seq_len=SEQ_LEN, chunk=CHUNK):
    return [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)]


# --- shapes and construction -----------------------------------------------------------


@pytest.mark.parametrize("cls", [VLLMNestedTupleGPUConnector, VLLMPagedMemGPUConnector,
                                 VLLMPagedMemGPUConnectorV2])
def test_get_shape(cls):
    connector = cls(HIDDEN, LAYERS)
    assert isinstance(connector, GPUConnectorInterface)
    assert connector.get_shape(5) == torch.Size([2, LAYERS, 5, HIDDEN])
    assert connector.get_shape(0) == torch.Size([2, LAYERS, 0, HIDDEN])


@pytest.mark.parametrize("cls", [VLLMNestedTupleGPUConnector, VLLMPagedMemGPUConnector,
                                 VLLMPagedMemGPUConnectorV2])
@pytest.mark.parametrize("args", [(0, 2), (16, 0), (16.0, 2), (True, 2)])
def test_constructor_rejects_bad_dims(cls, args):
    with pytest.raises(ValueError, match="positive int"):
        cls(*args)


def test_v2_constructor_kwargs():
    with pytest.raises(TypeError, match="chunk_siz"):
        VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, chunk_siz=4)
    c = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, use_gpu=True, chunk_size=32,
                                   dtype=torch.float16, device="cpu")
    assert c.use_gpu
    assert c._staging is not None and c._staging.numel() == 2 * LAYERS * 32 * HIDDEN
    assert VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, chunk_size=32).use_gpu is False


# --- paged round trips ------------------------------------------------------------------


@pytest.mark.parametrize("make", PAGED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_round_trip_bit_exact(make, layout, dtype, allocator):
    gen = torch.Generator().manual_seed(1)
    connector = make()
    src = _paged_cache(layout, dtype, gen)
    dst = _paged_cache(layout, dtype, gen)  # random background, not zeros
    slot_mapping = _slot_mapping(gen)
    for start, end in _chunks():
        obj = _alloc(allocator, connector, end - start, dtype)
        connector.from_gpu(obj, start, end, kvcaches=src, slot_mapping=slot_mapping)
        slots = slot_mapping[start:end].tolist()
        assert obj.metadata.fmt == MemoryFormat.KV_BLOB
        assert _same_bits(obj.tensor, _expected_blob(src, slots))

        before = [f.clone() for f in _flats(dst)]
        connector.to_gpu(obj, start, end, kvcaches=dst, slot_mapping=slot_mapping)
        obj.ref_count_down()
        untouched = torch.ones(NUM_SLOTS, dtype=torch.bool)
        untouched[slots] = False
        for got, old, want in zip(_flats(dst), before, _flats(src)):
            assert _same_bits(got[:, slots], want[:, slots])
            assert _same_bits(got[:, untouched], old[:, untouched])
    for got, want in zip(_flats(dst), _flats(src)):
        mapped = slot_mapping.tolist()
        assert _same_bits(got[:, mapped], want[:, mapped])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), layout=st.sampled_from(LAYOUTS), v1=st.booleans())
def test_paged_arbitrary_ranges(data, layout, v1):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    seq_len = data.draw(st.integers(1, NUM_SLOTS - 1), label="seq_len")
    start = data.draw(st.integers(0, seq_len), label="start")
    end = data.draw(st.integers(start, seq_len), label="end")
    connector = (VLLMPagedMemGPUConnector(HIDDEN, 2) if v1
                 else VLLMPagedMemGPUConnectorV2(HIDDEN, 2))
    src = _paged_cache(layout, torch.float16, gen, num_layers=2)
    dst = _paged_cache(layout, torch.float16, gen, num_layers=2)
    slot_mapping = _slot_mapping(gen, seq_len)
    alloc = HostMemoryAllocator(1024 * 1024)
    obj = _alloc(alloc, connector, end - start, torch.float16)
    connector.from_gpu(obj, start, end, kvcaches=src, slot_mapping=slot_mapping)
    slots = slot_mapping[start:end].tolist()
    assert _same_bits(obj.tensor, _expected_blob(src, slots))
    before = [f.clone() for f in _flats(dst)]
    connector.to_gpu(obj, start, end, kvcaches=dst, slot_mapping=slot_mapping)
    expected = [b.clone() for b in before]
    for e, s in zip(expected, _flats(src)):
        e[:, slots] = s[:, slots]
    assert all(_same_bits(g, e) for g, e in zip(_flats(dst), expected))
    obj.ref_count_down()


@pytest.mark.parametrize("make", PAGED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_offset_means_a_window_of_the_slot_mapping(make, layout, allocator):
    # The seed's ``offset``: slot_mapping[i] is the slot of token offset + i. Moving
    # chunks through a window must give exactly what the full slot mapping gives.
    gen = torch.Generator().manual_seed(11)
    connector = make()
    src = _paged_cache(layout, torch.float16, gen)
    dst = _paged_cache(layout, torch.float16, gen)
    full = _slot_mapping(gen)
    offset = 2 * CHUNK
    window = full[offset:].clone()
    connector.check_kwargs(SEQ_LEN, kvcaches=src, slot_mapping=window, offset=offset)
    before = [f.clone() for f in _flats(dst)]
    for start, end in _chunks()[2:]:
        via_window = _alloc(allocator, connector, end - start, torch.float16)
        connector.from_gpu(via_window, start, end, kvcaches=src, slot_mapping=window,
                           offset=offset)
        slots = full[start:end].tolist()
        assert _same_bits(via_window.tensor, _expected_blob(src, slots))
        connector.to_gpu(via_window, start, end, kvcaches=dst, slot_mapping=window,
                         offset=offset)
        via_window.ref_count_down()
    written = full[offset:].tolist()
    untouched = torch.ones(NUM_SLOTS, dtype=torch.bool)
    untouched[written] = False
    for got, old, want in zip(_flats(dst), before, _flats(src)):
        assert _same_bits(got[:, written], want[:, written])
        assert _same_bits(got[:, untouched], old[:, untouched])
    # offset=0 (and None) is the full slot mapping
    obj = _alloc(allocator, connector, CHUNK, torch.float16)
    connector.from_gpu(obj, 0, CHUNK, kvcaches=src, slot_mapping=full, offset=0)
    assert _same_bits(obj.tensor, _expected_blob(src, full[:CHUNK].tolist()))
    obj.ref_count_down()


@pytest.mark.parametrize("make", PAGED)
def test_paged_offset_errors(make, allocator):
    gen = torch.Generator().manual_seed(12)
    connector = make()
    src = _paged_cache("stacked", torch.float16, gen)
    full = _slot_mapping(gen)
    window = full[CHUNK:].clone()
    # a chunk before the window cannot be moved
    obj = _alloc(allocator, connector, CHUNK, torch.float16)
    with pytest.raises(ValueError, match="begin before offset"):
        connector.from_gpu(obj, 0, CHUNK, kvcaches=src, slot_mapping=window, offset=CHUNK)
    obj.ref_count_down()
    # through the engine a full slot mapping with an offset is refused, never misread
    with pytest.raises(ValueError, match="with offset=64 expected 236"):
        connector.check_kwargs(SEQ_LEN, kvcaches=src, slot_mapping=full, offset=CHUNK)
    with pytest.raises(ValueError, match="too short"):
        connector.check_kwargs(SEQ_LEN, kvcaches=src, slot_mapping=window[:10], offset=CHUNK)
    with pytest.raises(ValueError, match="beyond"):
        connector.check_kwargs(SEQ_LEN, kvcaches=src, slot_mapping=window,
                               offset=SEQ_LEN + 1)
    for bad in (-1, 1.5, True, "64", torch.tensor(64)):
        with pytest.raises(ValueError, match="offset must be a non-negative int"):
            connector.check_kwargs(SEQ_LEN, kvcaches=src, slot_mapping=window, offset=bad)


def test_paged_accepts_int32_slot_mapping(allocator):
    gen = torch.Generator().manual_seed(2)
    connector = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)
    src = _paged_cache("stacked", torch.bfloat16, gen)
    slot_mapping = _slot_mapping(gen).to(torch.int32)
    obj = _alloc(allocator, connector, 20, torch.bfloat16)
    connector.from_gpu(obj, 10, 30, kvcaches=src, slot_mapping=slot_mapping)
    assert _same_bits(obj.tensor, _expected_blob(src, slot_mapping[10:30].tolist()))
    dst = [torch.zeros_like(x) for x in src]
    connector.to_gpu(obj, 10, 30, kvcaches=dst, slot_mapping=slot_mapping)
    obj.ref_count_down()
    assert _same_bits(_expected_blob(dst, slot_mapping[10:30].tolist()),
                      _expected_blob(src, slot_mapping[10:30].tolist()))


def test_from_gpu_turns_undefined_into_kv_blob(allocator):
    gen = torch.Generator().manual_seed(3)
    connector = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)
    src = _paged_cache("pairs", torch.float32, gen)
    obj = _alloc(allocator, connector, 8, torch.float32, MemoryFormat.UNDEFINED)
    connector.from_gpu(obj, 0, 8, kvcaches=src, slot_mapping=_slot_mapping(gen))
    assert obj.metadata.fmt == MemoryFormat.KV_BLOB
    obj.ref_count_down()


# --- prefix caching: slot -1 ------------------------------------------------------------


@pytest.mark.parametrize("make", PAGED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_gpu_skips_prefix_cached_slots(make, layout, allocator):
    gen = torch.Generator().manual_seed(4)
    connector = make()
    src = _paged_cache(layout, torch.bfloat16, gen)
    dst = _paged_cache(layout, torch.bfloat16, gen)
    prefix = 40
    slot_mapping = _slot_mapping(gen, prefix=prefix)
    full = _slot_mapping(torch.Generator().manual_seed(4))  # any slots, to fill the blob
    obj = _alloc(allocator, connector, 64, torch.bfloat16)
    connector.from_gpu(obj, 0, 64, kvcaches=src, slot_mapping=full)

    before = [f.clone() for f in _flats(dst)]
    connector.to_gpu(obj, 0, 64, kvcaches=dst, slot_mapping=slot_mapping)
    written = slot_mapping[prefix:64].tolist()
    expected = [b.clone() for b in before]
    for e, i in zip(expected, range(LAYERS)):
        e[:, written] = obj.tensor[:, i, prefix:64]
    # only the slots of tokens [40, 64) changed; in particular the last slot (what a -1
    # used as an index would hit) did not
    assert all(_same_bits(g, e) for g, e in zip(_flats(dst), expected))

    # a range made only of prefix-cached tokens writes nothing at all
    obj2 = _alloc(allocator, connector, 16, torch.bfloat16)
    obj2.tensor.fill_(1.0)
    before = [f.clone() for f in _flats(dst)]
    connector.to_gpu(obj2, 8, 24, kvcaches=dst, slot_mapping=slot_mapping)
    assert all(_same_bits(g, b) for g, b in zip(_flats(dst), before))
    obj.ref_count_down()
    obj2.ref_count_down()


@pytest.mark.parametrize("make", PAGED)
def test_from_gpu_refuses_prefix_cached_slots(make, allocator):
    gen = torch.Generator().manual_seed(5)
    connector = make()
    src = _paged_cache("stacked", torch.float16, gen)
    slot_mapping = _slot_mapping(gen, prefix=40)
    obj = _alloc(allocator, connector, 64, torch.float16)
    obj.tensor.fill_(3.0)
    with pytest.raises(ValueError, match=r"contains -1"):
        connector.from_gpu(obj, 32, 96, kvcaches=src, slot_mapping=slot_mapping)
    assert bool((obj.tensor == 3.0).all()), "from_gpu wrote before raising"
    # right after the prefix it is fine
    connector.from_gpu(obj, 40, 104, kvcaches=src, slot_mapping=slot_mapping)
    assert _same_bits(obj.tensor, _expected_blob(src, slot_mapping[40:104].tolist()))
    obj.ref_count_down()


# --- nested tuple ------------------------------------------------------------------------


def _nested_cache(shape_kind: str, layout: str, dtype, gen, seq_len=SEQ_LEN):
    tail = (HEADS, HEAD_SIZE) if shape_kind == "heads" else (HIDDEN,)
    caches = []
    for _ in range(LAYERS):
        kv = _random((2, seq_len, *tail), dtype, gen)
        caches.append(kv if layout == "stacked" else (kv[0].clone(), kv[1].clone()))
    return caches


def _nested_rows(caches) -> list[torch.Tensor]:
    return [torch.stack([layer[0].reshape(-1, HIDDEN), layer[1].reshape(-1, HIDDEN)])
            for layer in caches]


@pytest.mark.parametrize("shape_kind", ["heads", "hidden"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_tuple_round_trip_bit_exact(shape_kind, layout, dtype, allocator):
    gen = torch.Generator().manual_seed(6)
    connector = VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)
    src = _nested_cache(shape_kind, layout, dtype, gen)
    dst = _nested_cache(shape_kind, layout, dtype, gen)
    for j, (start, end) in enumerate([*_chunks(), (17, 18), (5, 250), (300, 300)]):
        fmt = MemoryFormat.UNDEFINED if j % 2 else MemoryFormat.KV_BLOB
        obj = _alloc(allocator, connector, end - start, dtype, fmt)
        connector.from_gpu(obj, start, end, kvcaches=src)
        assert obj.metadata.fmt == MemoryFormat.KV_BLOB
        want = torch.stack([r[:, start:end] for r in _nested_rows(src)], dim=1)
        assert _same_bits(obj.tensor, want)
        before = [r.clone() for r in _nested_rows(dst)]
        connector.to_gpu(obj, start, end, kvcaches=dst)
        obj.ref_count_down()
        for got, old, new in zip(_nested_rows(dst), before, _nested_rows(src)):
            assert _same_bits(got[:, start:end], new[:, start:end])
            assert _same_bits(got[:, :start], old[:, :start])
            assert _same_bits(got[:, end:], old[:, end:])


def test_nested_tuple_non_contiguous_source(allocator):
    # K/V that are views with odd strides (e.g. split from a fused QKV) copy correctly
    gen = torch.Generator().manual_seed(7)
    connector = VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)
    fused = [_random((SEQ_LEN, 3, HEADS, HEAD_SIZE), torch.float16, gen) for _ in range(LAYERS)]
    caches = [(f[:, 1], f[:, 2]) for f in fused]
    obj = _alloc(allocator, connector, 30, torch.float16)
    connector.from_gpu(obj, 100, 130, kvcaches=caches)
    assert _same_bits(obj.tensor[0, 1].view(30, HEADS, HEAD_SIZE), fused[1][100:130, 1])
    assert _same_bits(obj.tensor[1, 2].view(30, HEADS, HEAD_SIZE), fused[2][100:130, 2])
    obj.ref_count_down()


# --- the hot path: no per-token work ----------------------------------------------------


class _CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["paged", "nested"])
def test_torch_calls_do_not_grow_with_tokens(kind, allocator):
    gen = torch.Generator().manual_seed(8)
    if kind == "paged":
        connector: GPUConnectorInterface = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)
        caches = _paged_cache("stacked", torch.float16, gen)
        extra = {"slot_mapping": _slot_mapping(gen)}
    else:
        connector = VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)
        caches = _nested_cache("heads", "pairs", torch.float16, gen)
        extra = {}
    counts = []
    # both sizes whole pages, so that both take the same path (whole-page or per-token);
    # a new connector each time, so that both check their arguments (see below)
    for n in (BLOCK_SIZE * 2, BLOCK_SIZE * 16):
        connector = type(connector)(HIDDEN, LAYERS)
        obj = _alloc(allocator, connector, n, torch.float16)
        _ = obj.tensor  # build the memory object's cached view outside the count
        with _CountOps() as ops:
            connector.from_gpu(obj, 0, n, kvcaches=caches, **extra)
            connector.to_gpu(obj, 0, n, kvcaches=caches, **extra)
        counts.append(ops.calls)
        obj.ref_count_down()
    assert counts[0] == counts[1], "torch calls grow with the number of tokens"


def test_paged_arguments_are_checked_once_per_call_and_again_when_they_change(allocator):
    # The chunks of one store or retrieve share their arguments: the second chunk does
    # not check them again, but a slot mapping written in place (or another layer list)
    # is checked again, and a slot mapping without a version counter always is.
    gen = torch.Generator().manual_seed(81)
    connector = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)
    caches = _paged_cache("stacked", torch.float16, gen)
    slots = _slot_mapping(gen)
    counts = []
    for _ in range(2):
        obj = _alloc(allocator, connector, BLOCK_SIZE, torch.float16)
        _ = obj.tensor
        with _CountOps() as ops:
            connector.from_gpu(obj, 0, BLOCK_SIZE, kvcaches=caches, slot_mapping=slots)
        counts.append(ops.calls)
        obj.ref_count_down()
    assert counts[1] < counts[0]
    obj = _alloc(allocator, connector, BLOCK_SIZE, torch.float16)
    slots[3] = NUM_SLOTS + 5  # written in place: its version counter moved
    with pytest.raises(ValueError, match="holds slot"):
        connector.from_gpu(obj, 0, BLOCK_SIZE, kvcaches=caches, slot_mapping=slots)
    with torch.inference_mode():
        frozen = _slot_mapping(torch.Generator().manual_seed(82))
    connector.from_gpu(obj, 0, BLOCK_SIZE, kvcaches=caches, slot_mapping=frozen)
    with torch.inference_mode():
        frozen[3] = NUM_SLOTS + 5
    with pytest.raises(ValueError, match="holds slot"):
        connector.from_gpu(obj, 0, BLOCK_SIZE, kvcaches=caches, slot_mapping=frozen)
    obj.ref_count_down()


# --- validation ----------------------------------------------------------------------------


def _paged_setup(allocator, dtype=torch.float16, n=16):
    gen = torch.Generator().manual_seed(9)
    connector = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)
    caches = _paged_cache("pairs", dtype, gen)
    slot_mapping = _slot_mapping(gen)
    obj = _alloc(allocator, connector, n, dtype)
    connector.from_gpu(obj, 0, n, kvcaches=caches, slot_mapping=slot_mapping)
    return connector, caches, slot_mapping, obj


def _k(caches, i=0):
    return caches[i][0]


_PAGED_ERRORS = {
    "missing kvcaches": (lambda c, sm: {"slot_mapping": sm}, r"'kvcaches'"),
    "missing slot_mapping": (lambda c, sm: {"kvcaches": c}, r"'slot_mapping'"),
    "too few layers": (lambda c, sm: {"kvcaches": c[:-1], "slot_mapping": sm},
                       rf"2 layers; expected {LAYERS}"),
    "too many layers": (lambda c, sm: {"kvcaches": [*c, c[0]], "slot_mapping": sm},
                        rf"4 layers; expected {LAYERS}"),
    "kvcaches not a sequence": (lambda c, sm: {"kvcaches": 3, "slot_mapping": sm},
                                r"kvcaches must be a sequence"),
    "layer not a pair": (lambda c, sm: {"kvcaches": [c[0], c[1], (_k(c),)],
                                        "slot_mapping": sm}, r"kvcaches\[2\].*\(K, V\) pair"),
    "stacked tensor not [2, ...]": (
        lambda c, sm: {"kvcaches": [torch.stack([_k(c), _k(c), _k(c)]), *c[1:]],
                       "slot_mapping": sm}, r"stacked on dim 0"),
    "hidden dim": (lambda c, sm: {"kvcaches": [(x[..., :4], y[..., :4]) for x, y in c],
                                  "slot_mapping": sm}, r"hidden_dim_size"),
    "K/V shapes differ": (lambda c, sm: {"kvcaches": [c[0], (_k(c, 1), _k(c, 1)[:-1]), c[2]],
                                         "slot_mapping": sm}, r"kvcaches\[1\].*same shape"),
    "layer differs from layer 0": (
        lambda c, sm: {"kvcaches": [c[0], c[1], (_k(c, 2)[:-1], _k(c, 2)[:-1])],
                       "slot_mapping": sm}, r"kvcaches\[2\] has shape .* like kvcaches\[0\]"),
    "K/V dtypes differ": (lambda c, sm: {"kvcaches": [c[0], (_k(c, 1), _k(c, 1).float()), c[2]],
                                         "slot_mapping": sm}, r"same dtype"),
    "K/V devices differ": (
        lambda c, sm: {"kvcaches": [(_k(c), _k(c).to("meta")), *c[1:]], "slot_mapping": sm},
        r"same device"),
    "layer on another device": (
        lambda c, sm: {"kvcaches": [*c[:2], (_k(c, 2).to("meta"), _k(c, 2).to("meta"))],
                       "slot_mapping": sm}, r"kvcaches\[2\] has device meta"),
    "V of a later layer on another device": (
        lambda c, sm: {"kvcaches": [*c[:2], (_k(c, 2), c[2][1].to("meta"))], "slot_mapping": sm},
        r"kvcaches\[2\]: K has device cpu but V has meta"),
    "stacked layer on another device": (
        lambda c, sm: {"kvcaches": [*map(torch.stack, c[:2]), torch.stack(c[2]).to("meta")],
                       "slot_mapping": sm}, r"kvcaches\[2\] has device meta; expected cpu"),
    "stacked layer dtype": (
        lambda c, sm: {"kvcaches": [*map(torch.stack, c[:2]), torch.stack(c[2]).float()],
                       "slot_mapping": sm}, r"kvcaches\[2\] has dtype torch.float32"),
    "stacked layer shape": (
        lambda c, sm: {"kvcaches": [*map(torch.stack, c[:2]), torch.stack(c[2])[:, 1:]],
                       "slot_mapping": sm}, r"kvcaches\[2\] has shape"),
    "blocks not viewable": (
        lambda c, sm: {"kvcaches": [(x.transpose(0, 1), y.transpose(0, 1)) for x, y in c],
                       "slot_mapping": sm}, r"cannot be viewed"),
    "stacked blocks not viewable": (
        lambda c, sm: {"kvcaches": [torch.stack([x, y]).transpose(1, 2) for x, y in c],
                       "slot_mapping": sm}, r"cannot be viewed"),
    "pairs then stacked": (lambda c, sm: {"kvcaches": [*c[:2], torch.stack(c[2])],
                                          "slot_mapping": sm}, r"laid out unlike kvcaches\[0\]"),
    "stacked then pairs": (lambda c, sm: {"kvcaches": [torch.stack(c[0]), *c[1:]],
                                          "slot_mapping": sm}, r"laid out unlike kvcaches\[0\]"),
    "slot_mapping 2-D": (lambda c, sm: {"kvcaches": c, "slot_mapping": sm.view(-1, 1)},
                         r"1-D"),
    "slot_mapping float": (lambda c, sm: {"kvcaches": c, "slot_mapping": sm.float()},
                           r"integer dtype"),
    "slot_mapping list": (lambda c, sm: {"kvcaches": c, "slot_mapping": sm.tolist()},
                          r"torch.Tensor"),
    "slot_mapping too short": (lambda c, sm: {"kvcaches": c, "slot_mapping": sm[:10]},
                               r"too short"),
    "slot_mapping device": (lambda c, sm: {"kvcaches": c, "slot_mapping": sm.to("meta")},
                            r"slot_mapping is on device meta; expected cpu"),
    "slot too large": (lambda c, sm: {"kvcaches": c,
                                      "slot_mapping": torch.cat([sm[:15], sm.new_tensor(
                                          [NUM_SLOTS])])}, rf"holds slot {NUM_SLOTS}"),
    "slot below -1": (lambda c, sm: {"kvcaches": c,
                                     "slot_mapping": torch.cat([sm[:15], sm.new_tensor([-2])])},
                      r"holds slot -2"),
}


@pytest.mark.parametrize("direction", ["from_gpu", "to_gpu"])
@pytest.mark.parametrize("case", list(_PAGED_ERRORS))
def test_paged_validation_errors(case, direction, allocator):
    connector, caches, slot_mapping, obj = _paged_setup(allocator)
    make_kwargs, match = _PAGED_ERRORS[case]
    kwargs = make_kwargs(caches, slot_mapping)
    cache_before = [f.clone() for f in _flats(caches)]
    obj_before = obj.tensor.clone()
    with pytest.raises(ValueError, match=match):
        getattr(connector, direction)(obj, 0, 16, **kwargs)
    # checked before copying: neither side changed
    assert all(_same_bits(a, b) for a, b in zip(_flats(caches), cache_before))
    assert _same_bits(obj.tensor, obj_before)
    obj.ref_count_down()


@pytest.mark.parametrize("direction", ["from_gpu", "to_gpu"])
@pytest.mark.parametrize("start,end", [(-1, 15), (10, 9), (0, SEQ_LEN + 1)])
def test_paged_range_errors(start, end, direction, allocator):
    connector, caches, slot_mapping, obj = _paged_setup(allocator)
    n = max(end - start, 0)
    bad = _alloc(allocator, connector, n, torch.float16)
    with pytest.raises(ValueError, match=r"out of range|too short"):
        getattr(connector, direction)(bad, start, end, kvcaches=caches, slot_mapping=slot_mapping)
    bad.ref_count_down()
    obj.ref_count_down()


@pytest.mark.parametrize("direction", ["from_gpu", "to_gpu"])
def test_memory_object_errors(direction, allocator):
    connector, caches, slot_mapping, obj = _paged_setup(allocator, n=16)
    call = getattr(connector, direction)
    kw = {"kvcaches": caches, "slot_mapping": slot_mapping}
    wrong_dtype = _alloc(allocator, connector, 16, torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype torch.bfloat16; expected torch.float16"):
        call(wrong_dtype, 0, 16, **kw)
    with pytest.raises(ValueError, match=r"get_shape\(end - start\)"):
        call(obj, 0, 15, **kw)
    wrong_shape = allocator.allocate(torch.Size([2, LAYERS, 16, HIDDEN + 1]), torch.float16)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 16, 16\) = get_shape"):
        call(wrong_shape, 0, 16, **kw)
    binary = _alloc(allocator, connector, 16, torch.float16, MemoryFormat.BINARY)
    with pytest.raises(ValueError, match=r"format BINARY; expected KV_BLOB"):
        call(binary, 0, 16, **kw)
    with pytest.raises(AssertionError, match=r"no tensor"):
        call(BytesBufferMemoryObj(bytearray(64)), 0, 16, **kw)
    for o in (wrong_dtype, wrong_shape, binary, obj):
        o.ref_count_down()


def test_to_gpu_refuses_undefined_format(allocator):
    connector, caches, slot_mapping, _ = _paged_setup(allocator)
    _.ref_count_down()
    obj = _alloc(allocator, connector, 16, torch.float16, MemoryFormat.UNDEFINED)
    with pytest.raises(ValueError, match=r"format UNDEFINED; expected KV_BLOB"):
        connector.to_gpu(obj, 0, 16, kvcaches=caches, slot_mapping=slot_mapping)
    obj.ref_count_down()


_NESTED_ERRORS = {
    "missing kvcaches": (lambda c: {}, r"'kvcaches'"),
    "wrong layers": (lambda c: {"kvcaches": c[:2]}, rf"2 layers; expected {LAYERS}"),
    "hidden dim": (lambda c: {"kvcaches": [(k[..., :1], v[..., :1]) for k, v in c]},
                   r"hidden_dim_size"),
    "4-D K": (lambda c: {"kvcaches": [(k[None], v[None]) for k, v in c]}, r"hidden_dim_size"),
    "K/V shapes differ": (lambda c: {"kvcaches": [c[0], (c[1][0], c[1][1][:-1]), c[2]]},
                          r"same shape"),
    "layer shorter": (lambda c: {"kvcaches": [c[0], (c[1][0][:-1], c[1][1][:-1]), c[2]]},
                      r"like kvcaches\[0\]"),
    "device": (lambda c: {"kvcaches": [c[0], c[1], (c[2][0], c[2][1].to("meta"))]},
               r"same device"),
    "dtype": (lambda c: {"kvcaches": [(k.float(), v.float()) for k, v in c]},
              r"dtype torch.float16; expected torch.float32"),
}


@pytest.mark.parametrize("direction", ["from_gpu", "to_gpu"])
@pytest.mark.parametrize("case", list(_NESTED_ERRORS))
def test_nested_tuple_validation_errors(case, direction, allocator):
    gen = torch.Generator().manual_seed(10)
    connector = VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)
    caches = _nested_cache("heads", "pairs", torch.float16, gen, seq_len=40)
    obj = _alloc(allocator, connector, 16, torch.float16)
    connector.from_gpu(obj, 0, 16, kvcaches=caches)
    before = [r.clone() for r in _nested_rows(caches)]
    make_kwargs, match = _NESTED_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        getattr(connector, direction)(obj, 0, 16, **make_kwargs(caches))
    assert all(_same_bits(a, b) for a, b in zip(_nested_rows(caches), before))
    for start, end in [(-1, 15), (10, 9), (30, 46)]:
        bad = _alloc(allocator, connector, max(end - start, 0), torch.float16)
        with pytest.raises(ValueError, match=r"out of range.*<= 40"):
            getattr(connector, direction)(bad, start, end, kvcaches=caches)
        bad.ref_count_down()
    with pytest.raises(AssertionError, match="no tensor"):
        getattr(connector, direction)(BytesBufferMemoryObj(b"x"), 0, 16, kvcaches=caches)
    obj.ref_count_down()


# --- plugins -------------------------------------------------------------------------------


@pytest.fixture
def engine():
    config = LMCacheEngineConfig(chunk_size=256)
    metadata = LMCacheEngineMetadata("m", 1, 0, "vllm", torch.bfloat16, (4, 2, 256, 2, 16))
    return config, metadata


@pytest.mark.parametrize("name,cls", [("vllm_nested_tuple", VLLMNestedTupleGPUConnector),
                                      ("vllm_paged", VLLMPagedMemGPUConnector),
                                      ("vllm_paged_v2", VLLMPagedMemGPUConnectorV2)])
def test_registry_builds_connectors(name, cls, engine, plugin_registry):
    config, metadata = engine
    assert name in plugin_registry.names("gpu_connector")
    connector = plugin_registry.create("gpu_connector", name, {}, config, metadata)
    assert type(connector) is cls
    assert (connector.num_layers, connector.hidden_dim_size) == (4, 32)
    assert connector.get_shape(256) == torch.Size([2, 4, 256, 32])
    with pytest.raises(pydantic.ValidationError):
        plugin_registry.create("gpu_connector", name, {"nope": 1}, config, metadata)


def test_registry_v2_use_gpu(engine, plugin_registry):
    config, metadata = engine
    c = plugin_registry.create("gpu_connector", "vllm_paged_v2", {"use_gpu": True}, config,
                               metadata)
    assert c.use_gpu and c._staging is None  # made on first use
    c = plugin_registry.create("gpu_connector", "vllm_paged_v2", {"use_gpu": True}, config,
                               metadata, ConnectorContext(device="cpu"))
    assert c._staging.numel() == 2 * 4 * 256 * 32 and c._staging.dtype == torch.bfloat16
    assert "use_gpu" in VLLMPagedMemGPUConnectorV2.Options.model_fields
    assert VLLMPagedMemGPUConnectorV2.Options.model_fields["use_gpu"].description


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("use_gpu", [False, True])
@pytest.mark.parametrize("mem_device", ["cpu", "cuda"])
def test_cuda_round_trip(use_gpu, mem_device):
    from lmcache.experimental.memory_management import GPUMemoryAllocator, PinMemoryAllocator

    gen = torch.Generator().manual_seed(11)
    alloc = (PinMemoryAllocator(8 * 1024 * 1024) if mem_device == "cpu"
             else GPUMemoryAllocator(8 * 1024 * 1024))
    connector = VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, use_gpu=use_gpu)
    src = _paged_cache("stacked", torch.bfloat16, gen, device="cuda")
    dst = _paged_cache("stacked", torch.bfloat16, gen, device="cuda")
    slot_mapping = _slot_mapping(gen, prefix=8).cuda()
    before = [f.clone() for f in _flats(dst)]
    for start, end in [(8, 72), (72, 136), (136, 150)]:
        obj = _alloc(alloc, connector, end - start, torch.bfloat16)
        assert obj.tensor.device.type == mem_device
        connector.from_gpu(obj, start, end, kvcaches=src, slot_mapping=slot_mapping)
        connector.to_gpu(obj, start, end, kvcaches=dst, slot_mapping=slot_mapping)
        obj.ref_count_down()
    torch.cuda.synchronize()
    written = slot_mapping[8:150].tolist()
    for got, old, want in zip(_flats(dst), before, _flats(src)):
        expected = old.clone()
        expected[:, written] = want[:, written]
        assert _same_bits(got, expected)

    nested = VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)
    caches = [tuple(_random((2, 50, HEADS, HEAD_SIZE), torch.float16, gen, "cuda"))
              for _ in range(LAYERS)]
    obj = _alloc(alloc, nested, 20, torch.float16)
    nested.from_gpu(obj, 10, 30, kvcaches=caches)
    out = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in caches]
    nested.to_gpu(obj, 10, 30, kvcaches=out)
    obj.ref_count_down()
    assert all(_same_bits(o[0][10:30], c[0][10:30]) and _same_bits(o[1][10:30], c[1][10:30])
               for o, c in zip(out, caches))
