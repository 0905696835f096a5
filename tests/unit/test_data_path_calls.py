"""What the data path asks of a tier that must ask a remote store: no ``contains`` on
the save path (a round trip per chunk), no ``contains`` before a load (the load answers
a miss itself), with and without a deadline."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from lmcache.abc.storage_backend import StorageBackendInterface
from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from tests.kvutil import Geometry, paged_cache, slot_mapping, slots_of

CHUNK = 16
N = 4 * CHUNK
G = Geometry()


class CountingRemote(StorageBackendInterface):
    """A store reached over the network, as far as the engine can tell: it keeps copies
    of the chunks put (in a dict) and counts every call."""

    def __init__(self, allocator) -> None:
        self.calls: Counter[str] = Counter()
        self.allocator = allocator
        self.data: dict = {}
        self.pool = ThreadPoolExecutor(1)

    def contains(self, key):
        self.calls["contains"] += 1
        return key in self.data

    def exists_in_put_tasks(self, key):
        return False

    def submit_put_task(self, key, memory_obj):
        self.calls["put"] += 1
        self.data[key] = memory_obj.tensor.clone()
        done: Future = Future()
        done.set_result(True)
        return done

    def _load(self, key):
        stored = self.data.get(key)
        if stored is None:
            return None
        obj = self.allocator.allocate(stored.shape, stored.dtype)
        obj.tensor.copy_(stored)
        return obj

    def submit_prefetch_task(self, key):
        self.calls["prefetch"] += 1
        return self.pool.submit(self._load, key)

    def get_blocking(self, key):
        self.calls["get"] += 1
        return self._load(key)

    def remove(self, key):
        return self.data.pop(key, None) is not None

    def close(self):
        self.pool.shutdown()


@pytest.fixture
def engine(tmp_path):
    config = LMCacheEngineConfig(chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host")
    meta = LMCacheEngineMetadata("org/test-model", 1, 0, "vllm", G.dtype, G.kv_shape(CHUNK))
    name = f"calls-{tmp_path.name}"
    made = LMCacheEngineBuilder.get_or_create(name, config, meta,
                                              VLLMPagedMemGPUConnectorV2(G.hidden, G.num_layers))
    manager = made.storage_manager
    manager.add_tier("remote", CountingRemote(manager.reclaiming_allocator))
    yield made
    LMCacheEngineBuilder.destroy(name)
    assert made.memory_allocator.num_active_allocations == 0


def _kv(zero: bool = False) -> dict:
    return {"kvcaches": paged_cache(G, seed=3, zero=zero), "slot_mapping": slot_mapping(G, N)}


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_no_contains_round_trip_on_store_or_load(engine, timeout_s):
    remote = engine.storage_manager.tiers["remote"]
    tokens = torch.randint(0, 32000, (N,), generator=torch.Generator().manual_seed(1))
    src = _kv()
    engine.store(tokens, **src)
    assert remote.calls == {"put": N // CHUNK}  # the save path asked nothing
    engine.store(tokens, **src)  # stored already: the CPU tier says so from memory
    assert remote.calls == {"put": N // CHUNK}
    hot = engine.storage_manager.hot_tier
    for key in list(hot._objects):
        hot.remove(key)
    dst = _kv(zero=True)
    mask = engine.retrieve(tokens, **dst, timeout_s=timeout_s)
    assert mask.all()
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        assert torch.equal(slots_of(a, src["slot_mapping"]), slots_of(b, src["slot_mapping"]))
    loads = remote.calls["prefetch"] + remote.calls["get"]
    assert remote.calls["contains"] == 0 and loads == N // CHUNK
    # a prompt nobody stored: one load asked, answered with a miss, and no more
    remote.calls.clear()
    other = torch.randint(0, 32000, (N,), generator=torch.Generator().manual_seed(2))
    assert not engine.retrieve(other, **_kv(zero=True), timeout_s=timeout_s).any()
    assert remote.calls["contains"] == 0
    assert 1 <= remote.calls["prefetch"] + remote.calls["get"] <= 1 + 3  # + read-ahead
