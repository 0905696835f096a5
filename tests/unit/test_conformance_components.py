"""Every first-party allocator, GPU connector, token database and serde runs the shipped
conformance kit (`lmcache.testing.conformance`)."""

from __future__ import annotations

import pytest
import torch

from lmcache.experimental.gpu_connector import (
    VLLMCPUBlockConnector,
    VLLMNestedTupleGPUConnector,
    VLLMPagedMemGPUConnector,
    VLLMPagedMemGPUConnectorV2,
)
from lmcache.experimental.memory_management import (
    GPUMemoryAllocator,
    HostMemoryAllocator,
    MemoryFormat,
    MixedMemoryAllocator,
    PinMemoryAllocator,
)
from lmcache.experimental.storage_backend.serde import NaiveSerde, ZstdSerde

# --8<-- [start:imports]
from lmcache.testing.conformance import (
    AllocatorConformance,
    GPUConnectorConformance,
    SerdeConformance,
    TokenDatabaseConformance,
)

# --8<-- [end:imports]

# -- allocators ------------------------------------------------------------------------------


# --8<-- [start:allocator]
class TestHostMemoryAllocator(AllocatorConformance):
    @pytest.fixture
    def allocator(self):
        return HostMemoryAllocator(4 << 20)
# --8<-- [end:allocator]


@pytest.mark.filterwarnings("ignore::lmcache.experimental.memory_management."
                            "PinnedMemoryUnavailableWarning")
class TestPinMemoryAllocator(AllocatorConformance):
    @pytest.fixture
    def allocator(self):
        return PinMemoryAllocator(4 << 20)


@pytest.mark.filterwarnings("ignore::lmcache.experimental.memory_management."
                            "PinnedMemoryUnavailableWarning")
class TestMixedMemoryAllocator(AllocatorConformance):
    @pytest.fixture
    def allocator(self):
        return MixedMemoryAllocator(4 << 20)

    def test_byte_buffers_round_trip(self, allocator):
        obj = allocator.allocate((100,), None, MemoryFormat.BINARY_BUFFER)
        obj.byte_array[:] = bytes(range(100))
        assert bytes(obj.byte_array) == bytes(range(100))
        obj.ref_count_down()


@pytest.mark.gpu
class TestGPUMemoryAllocator(AllocatorConformance):
    device = "cuda"

    @pytest.fixture
    def allocator(self):
        return GPUMemoryAllocator(4 << 20)


# -- GPU connectors (on CPU tensors here; the same classes run on CUDA on a GPU machine) --

LAYERS, HEADS, HEAD_SIZE = 2, 2, 16
HIDDEN = HEADS * HEAD_SIZE
BLOCK = 16
NUM_BLOCKS = 12


def _paged_slots(num_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randperm(NUM_BLOCKS * BLOCK - 1, generator=gen)[:num_tokens]


class TestNestedTupleConnector(GPUConnectorConformance):
    @pytest.fixture
    def connector(self):
        return VLLMNestedTupleGPUConnector(HIDDEN, LAYERS)

    def make_kv(self, num_tokens, dtype):
        return {"kvcaches": [(torch.zeros(num_tokens, HEADS, HEAD_SIZE, dtype=dtype),
                              torch.zeros(num_tokens, HEADS, HEAD_SIZE, dtype=dtype))
                             for _ in range(LAYERS)]}


class _PagedKit(GPUConnectorConformance):
    stacked = False

    def make_kv(self, num_tokens, dtype):
        shape = (NUM_BLOCKS, BLOCK, HEADS, HEAD_SIZE)
        if self.stacked:  # vLLM's flash-attention layout: K and V in one tensor per layer
            caches = [torch.zeros(2, *shape, dtype=dtype) for _ in range(LAYERS)]
        else:
            caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                      for _ in range(LAYERS)]
        return {"kvcaches": caches, "slot_mapping": _paged_slots(num_tokens)}


class TestPagedConnector(_PagedKit):
    @pytest.fixture
    def connector(self):
        return VLLMPagedMemGPUConnector(HIDDEN, LAYERS)


class TestPagedConnectorV2(_PagedKit):
    @pytest.fixture
    def connector(self):
        return VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS)


class TestPagedConnectorV2Stacked(_PagedKit):
    stacked = True

    @pytest.fixture
    def connector(self):
        return VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, use_gpu=True)


# --8<-- [start:connector]
class TestCPUBlockConnector(GPUConnectorConformance):
    token_alignment = BLOCK

    @pytest.fixture
    def connector(self):
        return VLLMCPUBlockConnector(LAYERS, HEADS, HEAD_SIZE, block_size=BLOCK)

    def make_kv(self, num_tokens, dtype):
        blocks = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3))
        slots = (blocks[: -(-num_tokens // BLOCK)].repeat_interleave(BLOCK) * BLOCK
                 + torch.arange(BLOCK).repeat(-(-num_tokens // BLOCK)))[:num_tokens]
        caches = [torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE, dtype=dtype)
                  for _ in range(LAYERS)]
        return {"kvcaches": caches, "slot_mapping": slots}
# --8<-- [end:connector]


@pytest.mark.gpu
class TestPagedConnectorV2OnCUDA(_PagedKit):
    device = "cuda"

    @pytest.fixture
    def connector(self):
        return VLLMPagedMemGPUConnectorV2(HIDDEN, LAYERS, use_gpu=True)

    def make_kv(self, num_tokens, dtype):
        kv = super().make_kv(num_tokens, dtype)
        return {"kvcaches": [(k.cuda(), v.cuda()) for k, v in kv["kvcaches"]],
                "slot_mapping": kv["slot_mapping"].cuda()}


# -- token database --------------------------------------------------------------------------

_DB_SOURCE = """
import torch
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.token_database import ChunkedTokenDatabase

def make(chunk_size):
    md = LMCacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, (2, 2, 256, 8, 128))
    return ChunkedTokenDatabase(LMCacheEngineConfig(chunk_size=chunk_size), md)
"""


class TestChunkedTokenDatabase(TokenDatabaseConformance):
    database_source = _DB_SOURCE

    @pytest.fixture
    def make_database(self):
        scope: dict = {}
        exec(_DB_SOURCE, scope)  # the same source the cross-process test runs
        return scope["make"]

    def _accepts_lists(self) -> bool:
        return True


# -- serdes ----------------------------------------------------------------------------------


# --8<-- [start:serde]
class TestNaiveSerde(SerdeConformance):
    @pytest.fixture
    def serde(self):
        return NaiveSerde()
# --8<-- [end:serde]


class TestZstdSerde(SerdeConformance):
    @pytest.fixture
    def serde(self):
        return ZstdSerde()


class TestZstdSerdeNoShuffleCrc(SerdeConformance):
    @pytest.fixture
    def serde(self):
        return ZstdSerde(level=3, shuffle=False, checksum="crc32")

