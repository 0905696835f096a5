"""The compiled CPU kernels and the pure-torch path give the same, exact results."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmcache.builtin.connectors._cpu_moves import whole_blocks as _whole_blocks
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from lmcache.experimental.memory_management import HostMemoryAllocator
from lmcache.ops import ENV, cpu_ops
from tests.kvutil import Geometry, paged_cache, slots_of

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler")


@needs_compiler
def test_kernels_build_here():
    ops = cpu_ops(wait=True)
    assert ops is not None and hasattr(ops, "scatter_rows") and hasattr(ops, "gather_rows")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert cpu_ops(wait=True) is None


def _slots(g: Geometry, n: int, pages: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if pages:
        order = torch.randperm(g.num_blocks, generator=gen)[: n // g.block_size]
        return order.repeat_interleave(g.block_size) * g.block_size + \
            torch.arange(g.block_size).repeat(len(order))
    return torch.randperm(g.num_blocks * g.block_size, generator=gen)[:n]


def _round_trip(g, slots, stacked, skip_prefix):
    conn = VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers)
    alloc = HostMemoryAllocator(8 << 20)
    n = slots.numel()
    obj = alloc.allocate(conn.get_shape(n), g.dtype)
    src = paged_cache(g, seed=5, stacked=stacked)
    conn.from_gpu(obj, 0, n, kvcaches=src, slot_mapping=slots)
    blob = obj.tensor.clone()
    dst = paged_cache(g, seed=6, stacked=stacked)  # random, to see what is left alone
    before = [t.clone() if isinstance(t, torch.Tensor) else (t[0].clone(), t[1].clone())
              for t in dst]
    mapping = slots.clone()
    if skip_prefix:
        mapping[: g.block_size] = -1  # prefix cached by the serving engine
    conn.to_gpu(obj, 0, n, kvcaches=dst, slot_mapping=mapping)
    obj.ref_count_down()
    return src, blob, before, dst, mapping


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pages", [True, False])
@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("skip_prefix", [False, True])
def test_kernel_and_torch_paths_agree(monkeypatch, dtype, pages, stacked, skip_prefix):
    g = Geometry(dtype=dtype, num_blocks=32)
    n = 4 * g.block_size
    slots = _slots(g, n, pages, seed=1)
    assert (_whole_blocks(slots, g.block_size) is not None) == pages
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(ENV, mode)
        assert (cpu_ops(wait=True) is None) == (mode == "0")
        results[mode] = _round_trip(g, slots, stacked, skip_prefix)
    for mode, (src, blob, before, dst, mapping) in results.items():
        # the chunk holds exactly the source slots
        for i, layer in enumerate(src):
            kv = slots_of(layer, slots)
            assert torch.equal(blob[:, i], kv.reshape(2, n, -1)), mode
        # the cache got the chunk where the mapping is >= 0 and kept everything else
        keep = mapping >= 0
        for layer, old, new in zip(src, before, dst):
            assert torch.equal(slots_of(new, mapping[keep]), slots_of(layer, slots[keep]))
            untouched = torch.ones(g.num_blocks * g.block_size, dtype=torch.bool)
            untouched[mapping[keep]] = False
            idx = untouched.nonzero().squeeze(1)
            assert torch.equal(slots_of(new, idx), slots_of(old, idx)), mode
    assert torch.equal(results["1"][1], results["0"][1])


@needs_compiler
@pytest.mark.parametrize("nbytes", [0, 8, 8192, 8192 * 3 + 5, (4 << 20) + 8192 * 7 + 13])
def test_sum64_checksum_same_with_and_without_kernels(monkeypatch, nbytes):
    from lmcache.experimental.storage_backend.object_format import PayloadHasher

    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(nbytes)).numpy().tobytes()
    digests = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(ENV, mode)
        assert (cpu_ops(wait=True) is None) == (mode == "0")
        whole = PayloadHasher("sum64").update(data).digest()
        split = 8192 * 2
        pieces = PayloadHasher("sum64").update(data[:split]).update(data[split:]).digest() \
            if nbytes > split else whole
        assert whole == pieces
        digests[mode] = whole
    assert digests["1"] == digests["0"]


@needs_compiler
@pytest.mark.parametrize("pages", [True, False])
@pytest.mark.parametrize("n", [16, 48, 256])
def test_the_gather_checksums_the_payload_as_it_copies(pages, n):
    # The kernel's sum64 from the rows it copies equals the checksum of the payload it
    # wrote (one pass instead of two), for whole pages and for token rows.
    from lmcache.experimental.gpu_connector import VLLMCPUBlockConnector
    from lmcache.kits.checksum import payload_checksum

    assert cpu_ops(wait=True) is not None
    g = Geometry(num_blocks=40)
    slots = _slots(g, n, pages, seed=n)
    conn = VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers)
    alloc = HostMemoryAllocator(32 << 20)
    obj = alloc.allocate(conn.get_shape(n), g.dtype)
    conn.from_gpu(obj, 0, n, kvcaches=paged_cache(g, seed=1), slot_mapping=slots)
    assert obj.metadata.payload_checksum is None  # nobody asked for it
    obj.metadata.want_checksum = "sum64"
    conn.from_gpu(obj, 0, n, kvcaches=paged_cache(g, seed=1), slot_mapping=slots)
    assert obj.metadata.payload_checksum == ("sum64", payload_checksum(obj.byte_array))
    obj.ref_count_down()
    blocks = VLLMCPUBlockConnector(3, 2, 64, 16)
    caches = [torch.randn(12, 2, 16, 128).to(torch.bfloat16) for _ in range(3)]
    block_slots = torch.tensor([5, 0, 9, 2, 7])
    block_slots = (block_slots.repeat_interleave(16) * 16 + torch.arange(16).repeat(5))
    m = min(n, 80)
    obj = alloc.allocate(blocks.get_shape(m), torch.bfloat16)
    obj.metadata.want_checksum = "sum64"
    blocks.from_gpu(obj, 0, m, kvcaches=caches, slot_mapping=block_slots)
    assert obj.metadata.payload_checksum == ("sum64", payload_checksum(obj.byte_array))
    obj.ref_count_down()
