"""The vLLM connector's layout self-check (`lmcache.integration.vllm.layout_check`).

The CPU cases use vLLM's own cache writer (``cpu_attn_reshape_and_cache``, the op vLLM's
CPU attention writes new tokens with); the mismatches are layouts that pass every shape
check and would still hand back wrong KV.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.experimental.gpu_connector import (
    VLLMCPUBlockConnector,
    VLLMPagedMemGPUConnectorV2,
)
from lmcache.integration.vllm.layout_check import (
    CacheLayout,
    LayoutMismatch,
    check_layout,
    vllm_writer,
)

BS, HEADS, HEAD = 32, 2, 64  # a configuration vLLM's CPU attention supports


def _cpu_caches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, HEADS, BS, 2 * HEAD, generator=gen) for _ in range(n)]


def _flash_caches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(2, 6, BS, HEADS, HEAD, generator=gen) for _ in range(n)]


CPU = CacheLayout("cpu", 0, BS, HEADS, HEAD)
FLASH = CacheLayout("flash", 1, BS, HEADS, HEAD)


def _cpu_writer():
    pytest.importorskip("vllm")
    writer = vllm_writer(CPU, torch.float32, "auto", torch.device("cpu"))
    if writer is None:
        pytest.skip("vLLM's CPU ops are not built here")
    return writer


def flash_writer(layer, slots, key, value):
    """The flash layout as vLLM's ``reshape_and_cache_flash`` writes it: K in
    ``layer[0][block, offset]``, V in ``layer[1][block, offset]``."""
    blocks, offsets = slots // BS, slots % BS
    layer[0][blocks, offsets] = key
    layer[1][blocks, offsets] = value


def test_vllms_cpu_writer_and_the_block_connector_agree_and_the_cache_is_kept():
    caches = _cpu_caches()
    before = [c.clone() for c in caches]
    connector = VLLMCPUBlockConnector(3, HEADS, HEAD, block_size=BS)
    assert check_layout(connector, caches, CPU, model_dtype=torch.float32,
                        writer=_cpu_writer()) is True
    assert all(torch.equal(a, b) for a, b in zip(caches, before))  # pages put back


def test_the_paged_connector_reads_k_and_v_where_the_flash_writer_puts_them():
    caches = _flash_caches()
    before = [c.clone() for c in caches]
    connector = VLLMPagedMemGPUConnectorV2(HEADS * HEAD, 3)
    assert check_layout(connector, caches, FLASH, model_dtype=torch.float32,
                        writer=flash_writer) is True
    assert all(torch.equal(a, b) for a, b in zip(caches, before))


def test_k_and_v_swapped_is_refused():
    # a vLLM whose stacked layout puts V first: same shape, every load would be wrong
    def swapped(layer, slots, key, value):
        flash_writer(layer, slots, value, key)

    caches = _flash_caches()
    before = [c.clone() for c in caches]
    with pytest.raises(LayoutMismatch, match="K and V are swapped"):
        check_layout(VLLMPagedMemGPUConnectorV2(HEADS * HEAD, 3), caches, FLASH,
                     model_dtype=torch.float32, writer=swapped)
    assert all(torch.equal(a, b) for a, b in zip(caches, before))  # kept on failure too


def test_a_writer_that_addresses_blocks_otherwise_is_refused():
    # e.g. a kernel block size other than the scheduler's: slot s is not in block s // BS
    def shifted(layer, slots, key, value):
        flash_writer(layer, slots - BS, key, value)

    with pytest.raises(LayoutMismatch, match="into other places than that block's page"):
        check_layout(VLLMPagedMemGPUConnectorV2(HEADS * HEAD, 3), _flash_caches(), FLASH,
                     model_dtype=torch.float32, writer=shifted)


def test_a_connector_that_does_not_round_trip_is_refused():
    class Lossy(VLLMCPUBlockConnector):  # a connector that loses the last layer's page
        def to_gpu(self, memory_obj, start, end, **kwargs):
            memory_obj.tensor[-1].zero_()
            super().to_gpu(memory_obj, start, end, **kwargs)

    with pytest.raises(LayoutMismatch, match="not the same in layer 2"):
        check_layout(Lossy(3, HEADS, HEAD, block_size=BS), _cpu_caches(), CPU,
                     model_dtype=torch.float32, writer=_cpu_writer())


def test_a_connector_told_another_block_size_is_refused():
    connector = VLLMCPUBlockConnector(3, HEADS, HEAD, block_size=BS // 2)
    with pytest.raises(LayoutMismatch, match="could not read block 5"):
        check_layout(connector, _cpu_caches(), CacheLayout("cpu", 0, BS, HEADS, HEAD),
                     model_dtype=torch.float32, writer=_cpu_writer())


def test_without_vllms_writer_the_round_trip_is_still_checked():
    caches = _cpu_caches()
    connector = VLLMCPUBlockConnector(3, HEADS, HEAD, block_size=BS)
    assert check_layout(connector, caches, CPU, model_dtype=torch.float32,
                        writer=None) is False

    class Lossy(VLLMCPUBlockConnector):
        def to_gpu(self, memory_obj, start, end, **kwargs):
            memory_obj.tensor[0].zero_()
            super().to_gpu(memory_obj, start, end, **kwargs)

    with pytest.raises(LayoutMismatch, match="not the same in layer 0"):
        check_layout(Lossy(3, HEADS, HEAD, block_size=BS), caches, CPU,
                     model_dtype=torch.float32, writer=None)


def test_a_writer_that_refuses_the_cache_falls_back_to_the_round_trip():
    # vLLM's CPU writer does not take head size 8: it is not the writer of such a cache
    caches = [torch.randn(6, HEADS, BS, 16) for _ in range(2)]
    connector = VLLMCPUBlockConnector(2, HEADS, 8, block_size=BS)
    assert check_layout(connector, caches, CacheLayout("cpu", 0, BS, HEADS, 8),
                        model_dtype=torch.float32, writer=_cpu_writer()) is False


def test_a_cache_of_one_block_is_refused():
    with pytest.raises(LayoutMismatch, match="needs two"):
        check_layout(VLLMCPUBlockConnector(1, HEADS, HEAD, block_size=BS),
                     [torch.zeros(1, HEADS, BS, 2 * HEAD)], CPU, model_dtype=torch.float32,
                     writer=None)
