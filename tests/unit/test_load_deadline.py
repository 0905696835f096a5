"""``retrieve(..., timeout_s=...)``: what the argument accepts, and what a deadline that
has already passed still loads (the hot tier's chunks: a copy from memory, not a wait).
The deadline against a frozen remote store is in tests/integration/test_load_deadline.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from tests.kvutil import Geometry, paged_cache, slot_mapping, slots_of

CHUNK = 16
N = 4 * CHUNK


@pytest.fixture
def engine(tmp_path):
    """A CPU tier above a disk tier; every memory object back to the allocator after."""
    g = Geometry()
    config = LMCacheEngineConfig(chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host",
                                 local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    meta = LMCacheEngineMetadata("org/test-model", 1, 0, "vllm", g.dtype, g.kv_shape(CHUNK))
    instance_id = f"deadline-{tmp_path.name}"
    made = LMCacheEngineBuilder.get_or_create(instance_id, config, meta,
                                              VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
    yield made
    LMCacheEngineBuilder.destroy(instance_id)
    assert made.memory_allocator.num_active_allocations == 0


G = Geometry()
TOKENS = torch.randint(0, 32000, (N,), generator=torch.Generator().manual_seed(5))


def kv(zero: bool = False) -> dict:
    return {"kvcaches": paged_cache(G, seed=5, zero=zero), "slot_mapping": slot_mapping(G, N)}


def loaded(src: dict, dst: dict, mask: torch.Tensor) -> bool:
    """The tokens of ``mask`` hold the stored KV, the others nothing."""
    slots = src["slot_mapping"]
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        got, want = slots_of(b, slots), slots_of(a, slots)
        if not torch.equal(got[:, mask], want[:, mask]) or got[:, ~mask].any():
            return False
    return True


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, False,
                                 "1", [1.0]])
def test_timeout_s_must_be_a_finite_number_of_seconds(engine, bad):
    src = kv()
    engine.store(TOKENS, **src)
    with pytest.raises(ValueError, match=r"timeout_s must be a finite number of seconds "
                                         r"> 0, or None"):
        engine.retrieve(TOKENS, **kv(zero=True), timeout_s=bad)


@pytest.mark.parametrize("good", [None, 30, 2.5, torch.tensor(1.0).item()])
def test_timeout_s_is_the_engines_not_the_connectors(engine, good):
    """The connector refuses arguments it does not know: ``timeout_s`` never reaches it."""
    src = kv()
    engine.store(TOKENS, **src)
    dst = kv(zero=True)
    mask = engine.retrieve(TOKENS, **dst, timeout_s=good)
    assert mask.all() and loaded(src, dst, mask)


def test_a_deadline_already_past_loads_the_hot_tiers_chunks_and_stops_below(engine):
    src = kv()
    engine.store(TOKENS, **src)
    engine.storage_manager.flush(timeout=30)
    hot = engine.storage_manager.hot_tier
    dst = kv(zero=True)
    mask = engine.retrieve(TOKENS, **dst, timeout_s=1e-6)
    assert mask.all() and loaded(src, dst, mask)  # all in memory: all loaded

    keys = [key for _, _, key in engine.token_database.process_tokens(TOKENS)]
    for key in keys[2:]:  # the tail is on disk only
        assert hot.remove(key)
    dst = kv(zero=True)
    mask = engine.retrieve(TOKENS, **dst, timeout_s=1e-6)
    assert int(mask.sum()) == 2 * CHUNK and mask[:2 * CHUNK].all()
    assert loaded(src, dst, mask)
    assert len(hot) == 2  # nothing was read from the disk, nothing promoted

    dst = kv(zero=True)  # with time to wait, the disk serves the rest
    mask = engine.retrieve(TOKENS, **dst, timeout_s=30)
    assert mask.all() and loaded(src, dst, mask) and len(hot) == 4
