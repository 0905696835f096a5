"""The engine as code written against upstream LMCache drives it: one tier named bare
in ``search_range``, the seed's tier class names, a store through a window of the slot
mapping (``offset``) and ``LMCacheEngineBuilder.destroy(ENGINE_NAME)``."""

from __future__ import annotations

import pytest
import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import (
    VLLMPagedMemGPUConnector,
    VLLMPagedMemGPUConnectorV2,
)
from lmcache.integration.vllm.utils import ENGINE_NAME
from tests.kvutil import Geometry, paged_cache, slot_mapping, slots_of

CHUNK = 16
_ids = iter(range(10**6))


@pytest.fixture
def build():
    made = []

    def make(g, **fields):
        base = dict(chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host")
        base.update(fields)
        meta = LMCacheEngineMetadata("org/m", 3, 123, "vllm", g.dtype, g.kv_shape(CHUNK))
        instance_id = f"seed-compat-{next(_ids)}"
        engine = LMCacheEngineBuilder.get_or_create(
            instance_id, LMCacheEngineConfig(**base), meta,
            VLLMPagedMemGPUConnector(g.hidden, g.num_layers))
        made.append(instance_id)
        return engine

    yield make
    for instance_id in made:
        LMCacheEngineBuilder.destroy(instance_id)


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(n))


def test_search_range_names_one_tier_bare(build, tmp_path):
    # the seed's callers write lookup(tokens, "LocalDiskBackend"): one tier, never the
    # letters of its name
    g = Geometry()
    engine = build(g, local_disk=str(tmp_path / "d"), max_local_disk_size=0.01,
                   remote_url="memory://seed-compat-remote")
    toks = _tokens(3 * CHUNK)
    engine.store(toks, kvcaches=paged_cache(g, seed=1), slot_mapping=slot_mapping(g, 3 * CHUNK))
    engine.storage_manager.flush()
    keys = [k for _, _, k in engine.token_database.process_tokens(toks)]
    engine.storage_manager.tiers["local_cpu"].remove(keys[0])
    for bare in ("LocalDiskBackend", "local_disk", "RemoteBackend", "remote"):
        assert engine.lookup(toks, bare) == 3 * CHUNK, bare
        assert engine.lookup(toks, [bare]) == 3 * CHUNK, bare
    for hot in ("LocalCPUBackend", "Hot", "local_cpu"):
        assert engine.lookup(toks, hot) == 0, hot
    with pytest.raises(ValueError, match=r"unknown tiers \['LocalDisk'\]"):
        engine.lookup(toks, "LocalDisk")


@pytest.mark.parametrize("connector", [VLLMPagedMemGPUConnector, VLLMPagedMemGPUConnectorV2])
def test_store_through_a_window_of_the_slot_mapping(build, connector):
    # The seed's incremental store: the first chunks were stored before; the rest come
    # with a mask over them, the slot mapping from `offset` on and offset=...
    g = Geometry(num_blocks=32)
    engine = build(g)
    engine.gpu_connector = connector(g.hidden, g.num_layers)
    n, stored = 5 * CHUNK + 7, 2 * CHUNK
    toks = _tokens(n)
    src = paged_cache(g, seed=2)
    slots = slot_mapping(g, n, seed=2)
    engine.store(toks[:stored], kvcaches=src, slot_mapping=slots[:stored])
    mask = torch.ones(n, dtype=torch.bool)
    mask[:stored] = False
    engine.store(toks, mask, kvcaches=src, slot_mapping=slots[stored:], offset=stored)
    assert engine.lookup(toks) == n
    dst = paged_cache(g, seed=3, zero=True)
    assert bool(engine.retrieve(toks, kvcaches=dst, slot_mapping=slots).all())
    for a, b in zip(src, dst):
        assert torch.equal(slots_of(a, slots), slots_of(b, slots))
    # a full slot mapping with an offset is refused before anything moves
    with pytest.raises(ValueError, match="with offset=32 expected"):
        engine.store(toks, mask, kvcaches=src, slot_mapping=slots, offset=stored)


def test_destroy_engine_name_closes_the_engines_aliased_to_it(build):
    g = Geometry()
    first, second = build(g), build(g)
    other = build(g)
    for engine in (first, second):
        LMCacheEngineBuilder.add_alias(ENGINE_NAME, engine.engine_id)
    LMCacheEngineBuilder.add_alias(ENGINE_NAME, first.engine_id)  # idempotent
    assert LMCacheEngineBuilder.get(ENGINE_NAME) is first
    LMCacheEngineBuilder.destroy(first.engine_id)  # destroyed by its own id first
    assert LMCacheEngineBuilder.get(ENGINE_NAME) is second
    LMCacheEngineBuilder.destroy(ENGINE_NAME)
    assert second._closed and first._closed and not other._closed
    assert LMCacheEngineBuilder.get(ENGINE_NAME) is None
    assert LMCacheEngineBuilder.get(second.engine_id) is None
    assert LMCacheEngineBuilder.get(other.engine_id) is other
    LMCacheEngineBuilder.destroy(ENGINE_NAME)  # nothing left: a no-op
