"""Unit tests of the vllm_cpu_blocks connector (vLLM's CPU layout as whole pages)."""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest
import torch

from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMCPUBlockConnector
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat

LAYERS, HEADS, HEAD, BLOCK, NUM_BLOCKS = 3, 2, 8, 16, 20


@pytest.fixture
def allocator() -> Iterator[HostMemoryAllocator]:
    alloc = HostMemoryAllocator(8 * 1024 * 1024)
    yield alloc
    assert alloc.num_active_allocations == 0, "a test leaked a memory object"


def _caches(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD), generator=gen).to(dtype)
            for _ in range(LAYERS)]


def _slots(blocks: list[int], num_tokens: int) -> torch.Tensor:
    slots = [b * BLOCK + i for b in blocks for i in range(BLOCK)]
    return torch.tensor(slots[:num_tokens], dtype=torch.int64)


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run with the compiled row kernels and with the pure-torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr("lmcache.builtin.connectors.cpu_blocks.cpu_ops", lambda: None)
        monkeypatch.setattr("lmcache.builtin.connectors._cpu_moves.cpu_ops", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_moves_whole_pages(dtype, allocator, kernels):
    conn = VLLMCPUBlockConnector(LAYERS, HEADS, HEAD, BLOCK)
    src, dst = _caches(dtype, 1), _caches(dtype, 2)
    before = [t.clone() for t in dst]
    src_blocks, dst_blocks = [7, 2, 11, 5], [0, 13, 4, 9]
    n = 3 * BLOCK + 5  # ends inside the fourth block
    obj = allocator.allocate(conn.get_shape(n), dtype, MemoryFormat.UNDEFINED)
    assert tuple(obj.tensor.shape) == (LAYERS, 4, HEADS, BLOCK, 2 * HEAD)
    conn.from_gpu(obj, 0, n, kvcaches=src, slot_mapping=_slots(src_blocks, n))
    assert obj.metadata.fmt == MemoryFormat.KV_BLOB
    conn.to_gpu(obj, 0, n, kvcaches=dst, slot_mapping=_slots(dst_blocks, n))
    obj.ref_count_down()
    for layer in range(LAYERS):
        for s, d in zip(src_blocks, dst_blocks):
            assert torch.equal(dst[layer][d].view(torch.uint8), src[layer][s].view(torch.uint8))
        untouched = [b for b in range(NUM_BLOCKS) if b not in dst_blocks]
        assert torch.equal(dst[layer][untouched], before[layer][untouched])


def test_chunk_in_the_middle_and_skipped_blocks(allocator, kernels):
    conn = VLLMCPUBlockConnector(LAYERS, HEADS, HEAD, BLOCK)
    src, dst = _caches(torch.float32, 3), _caches(torch.float32, 4)
    before = [t.clone() for t in dst]
    seq = [1, 3, 5, 7, 9, 11]
    slots = _slots(seq, 6 * BLOCK)
    obj = allocator.allocate(conn.get_shape(4 * BLOCK), torch.float32)
    conn.from_gpu(obj, 2 * BLOCK, 6 * BLOCK, kvcaches=src, slot_mapping=slots)
    target = _slots([0, 2, 4, 6, 8, 10], 6 * BLOCK)
    target[2 * BLOCK:3 * BLOCK] = -1  # the serving engine holds block 4 already
    conn.to_gpu(obj, 2 * BLOCK, 6 * BLOCK, kvcaches=dst, slot_mapping=target)
    obj.ref_count_down()
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][4], before[layer][4])  # skipped
        for s, d in ((7, 6), (9, 8), (11, 10)):
            assert torch.equal(dst[layer][d], src[layer][s])
        assert torch.equal(dst[layer][:4], before[layer][:4])


@pytest.mark.parametrize("case,message", [
    ("no_kvcaches", "missing keyword argument 'kvcaches'"),
    ("no_slots", "missing keyword argument 'slot_mapping'"),
    ("gpu_layout", "vLLM's CPU layout"),
    ("layers", "expected 3"),
    ("float_slots", "1-D integer tensor"),
    ("unaligned_start", "block boundary"),
    ("unaligned_slots", "block aligned"),
    ("out_of_range", "the cache has 20 blocks"),
    ("minus_one", "-1 in the range to store"),
])
def test_errors_name_what_was_expected(case, message, allocator):
    conn = VLLMCPUBlockConnector(LAYERS, HEADS, HEAD, BLOCK)
    caches = _caches(torch.float32, 5)
    kwargs = {"kvcaches": caches, "slot_mapping": _slots([0, 1, 2], 3 * BLOCK)}
    start, end = 0, 2 * BLOCK
    if case == "no_kvcaches":
        del kwargs["kvcaches"]
    elif case == "no_slots":
        del kwargs["slot_mapping"]
    elif case == "gpu_layout":
        kwargs["kvcaches"] = [torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, HEAD)] * LAYERS
    elif case == "layers":
        kwargs["kvcaches"] = caches[:2]
    elif case == "float_slots":
        kwargs["slot_mapping"] = kwargs["slot_mapping"].float()
    elif case == "unaligned_start":
        start, end = 3, BLOCK + 3
    elif case == "unaligned_slots":
        kwargs["slot_mapping"] = kwargs["slot_mapping"] + 1
    elif case == "out_of_range":
        kwargs["slot_mapping"] = _slots([0, 25, 2], 3 * BLOCK)
    elif case == "minus_one":
        kwargs["slot_mapping"][BLOCK:] = -1
    obj = allocator.allocate(conn.get_shape(end - start), torch.float32)
    try:
        with pytest.raises(ValueError, match=message):
            conn.from_gpu(obj, start, end, **kwargs)
    finally:
        obj.ref_count_down()


def test_registry_builds_it_and_checks_chunk_size(plugin_registry):
    metadata = LMCacheEngineMetadata("m", 1, 0, "vllm", torch.bfloat16, (4, 2, 256, 2, 16))
    conn = plugin_registry.create("gpu_connector", "vllm_cpu_blocks", {},
                                  LMCacheEngineConfig(chunk_size=256), metadata)
    assert isinstance(conn, VLLMCPUBlockConnector)
    assert conn.get_shape(256) == torch.Size([4, 2, 2, 128, 32])
    assert conn.get_shape(129) == torch.Size([4, 2, 2, 128, 32])
    with pytest.raises(ValueError, match="not a multiple of the block size 128"):
        plugin_registry.create("gpu_connector", "vllm_cpu_blocks", {},
                               LMCacheEngineConfig(chunk_size=200), metadata)
    with pytest.raises(pydantic.ValidationError):
        plugin_registry.create("gpu_connector", "vllm_cpu_blocks", {"block_size": 0},
                               LMCacheEngineConfig(chunk_size=256), metadata)


# -- vllm_mla_blocks: the latent cache of an MLA model --------------------------------------


def test_mla_blocks_round_trip_whole_latent_pages(allocator, kernels):
    from lmcache.experimental.gpu_connector import VLLMMLABlockConnector
    from lmcache.plugin.registry import registry as plugin_registry

    latent = 24
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn((NUM_BLOCKS, BLOCK, latent), generator=gen) for _ in range(LAYERS)]
    dst = [torch.zeros_like(c) for c in src]
    config = LMCacheEngineConfig(chunk_size=32)
    metadata = LMCacheEngineMetadata("m", 1, 0, "vllm", torch.float32,
                                     (LAYERS, 1, 32, 1, latent))
    conn = plugin_registry.create("gpu_connector", "vllm_mla_blocks", {"block_size": BLOCK},
                                  config, metadata)
    assert isinstance(conn, VLLMMLABlockConnector)
    assert conn.get_shape(20) == torch.Size((LAYERS, 2, BLOCK, latent))
    obj = allocator.allocate(conn.get_shape(32), torch.float32, MemoryFormat.KV_BLOB)
    try:
        conn.from_gpu(obj, 0, 32, kvcaches=src, slot_mapping=_slots([7, 2], 32))
        conn.to_gpu(obj, 0, 32, kvcaches=dst, slot_mapping=_slots([4, 9], 32))
    finally:
        obj.ref_count_down()
    for s, d in zip(src, dst):
        assert torch.equal(d[4], s[7]) and torch.equal(d[9], s[2])
        assert not d[7].any()  # nothing else written
    with pytest.raises(ValueError, match=r"expected a tensor \[num_blocks, 16, 24\] "
                                         r"\(vLLM's MLA layout\)"):
        conn.check_kwargs(32, kvcaches=_caches(torch.float32, 1), slot_mapping=_slots([1], 32))


@pytest.mark.parametrize("inference", [False, True])
def test_a_slot_mapping_written_since_is_checked_and_read_again(allocator, inference):
    # The arguments of a call's chunks are checked once; a slot mapping written in
    # place afterwards is read and checked again (an inference tensor, which has no
    # version counter, every time), so a chunk never goes to stale blocks.
    conn = VLLMCPUBlockConnector(LAYERS, HEADS, HEAD, BLOCK)
    src, dst = _caches(torch.float32, 5), _caches(torch.float32, 6)
    with torch.inference_mode(inference):
        slots = _slots([3, 8], 2 * BLOCK)
    obj = allocator.allocate(conn.get_shape(2 * BLOCK), torch.float32, MemoryFormat.UNDEFINED)
    conn.from_gpu(obj, 0, 2 * BLOCK, kvcaches=src, slot_mapping=slots)
    with torch.inference_mode(inference):
        slots[BLOCK:] += (12 - 8) * BLOCK  # the second block is now block 12
    conn.to_gpu(obj, 0, 2 * BLOCK, kvcaches=dst, slot_mapping=slots)
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][12], src[layer][8])
        assert not torch.equal(dst[layer][8], src[layer][8])
    with torch.inference_mode(inference):
        slots[0] = NUM_BLOCKS * BLOCK  # beyond the cache
    with pytest.raises(ValueError, match="addresses block"):
        conn.to_gpu(obj, 0, 2 * BLOCK, kvcaches=dst, slot_mapping=slots)
    obj.ref_count_down()
