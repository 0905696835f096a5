"""Peer-to-peer sharing (``enable_p2p``): instances serve their chunks to each other,
found through a real Redis index; dead, frozen and forgetful peers are bounded misses."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from lmcache.testing.servers import free_ports
from tests.kvutil import Geometry, paged_cache, slot_mapping, slots_of

CHUNK = 16
N = 3 * CHUNK
TIMEOUT_S = 1.0


@pytest.fixture
def peers(redis_server):
    """``make()`` builds an engine with a CPU tier and the p2p tier on one index."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    made = []

    def make(flat: bool = False, ttl_s: float = 10.0):
        g = Geometry(num_blocks=64)
        (port,) = free_ports(1)
        address = f"127.0.0.1:{port}"
        if flat:  # as LMCache's P2P example writes it
            config = LMCacheEngineConfig(
                chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host", enable_p2p=True,
                lookup_url=redis_server.url.removeprefix("redis://"),
                distributed_url=address)
        else:
            config = LMCacheEngineConfig(
                chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host",
                storage_backends=[{"name": "local_cpu"}, {
                    "name": "p2p", "lookup_url": redis_server.url, "distributed_url": address,
                    "namespace": namespace, "timeout_s": TIMEOUT_S, "ttl_s": ttl_s}])
        meta = LMCacheEngineMetadata("org/p2p-model", 1, 0, "vllm", g.dtype, g.kv_shape(CHUNK))
        instance = f"p2p-{uuid.uuid4().hex[:8]}"
        engine = LMCacheEngineBuilder.get_or_create(
            instance, config, meta, VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
        made.append(instance)
        return engine, g

    yield make
    for instance in made:
        LMCacheEngineBuilder.destroy(instance)


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (N,), generator=torch.Generator().manual_seed(seed))


def kv(g, seed, zero=False):
    return {"kvcaches": paged_cache(g, seed=seed, zero=zero),
            "slot_mapping": slot_mapping(g, N, seed=seed)}


def exact(g, src_seed, dst, n=N) -> bool:
    src = kv(g, src_seed)
    s = src["slot_mapping"][:n]
    return all(torch.equal(slots_of(a, s), slots_of(b, s))
               for a, b in zip(src["kvcaches"], dst["kvcaches"]))


def p2p_of(engine):
    return engine.storage_manager.tiers["p2p"]


def test_a_chunk_stored_by_one_instance_is_loaded_by_another(peers):
    a, g = peers()
    b, _ = peers()
    p = prompt(1)
    a.store(p, **kv(g, 1))
    a.storage_manager.flush()
    assert b.lookup(p) == N
    dst = kv(g, 1, zero=True)
    assert bool(b.retrieve(p, **dst).all()) and exact(g, 1, dst)
    assert p2p_of(b).stats.hits == 3
    # promoted: the next retrieve is local
    assert all(b.storage_manager.hot_tier.contains(k)
               for _, _, k in b.token_database.process_tokens(p))


def test_the_flat_fields_of_lmcache_s_example(peers):
    a, g = peers(flat=True)
    b, _ = peers(flat=True)
    p = prompt(2)
    a.store(p, **kv(g, 2))
    a.storage_manager.flush()
    dst = kv(g, 2, zero=True)
    assert bool(b.retrieve(p, **dst).all()) and exact(g, 2, dst)


def test_salts_keep_tenants_apart_across_peers(peers):
    a, g = peers()
    b, _ = peers()
    p = prompt(3)
    a.store(p, cache_salt="tenant-a", **kv(g, 3))
    a.storage_manager.flush()
    assert b.lookup(p, cache_salt="tenant-b") == 0 and b.lookup(p) == 0
    assert b.lookup(p, cache_salt="tenant-a") == N


def test_a_peer_that_left_is_not_counted(peers):
    a, g = peers()
    b, _ = peers()
    p = prompt(4)
    a.store(p, **kv(g, 4))
    a.storage_manager.flush()
    LMCacheEngineBuilder.destroy(a.engine_id)
    assert b.lookup(p) == 0


def test_a_dead_peer_is_a_bounded_miss_and_its_entries_expire(peers):
    a, g = peers(ttl_s=1.5)
    b, _ = peers(ttl_s=1.5)
    p = prompt(5)
    a.store(p, **kv(g, 5))
    a.storage_manager.flush()
    tier = p2p_of(a)  # a dies: its service goes, its heartbeat stops, nothing cleans up
    tier._stop.set()
    tier.service.stop()
    started = time.monotonic()
    got = b.retrieve(p, **kv(g, 5, zero=True))
    assert not got.any() and time.monotonic() - started < TIMEOUT_S + 0.5
    time.sleep(1.6)  # the heartbeat key expired: the index forgets a's chunks
    started = time.monotonic()
    assert b.lookup(p) == 0 and time.monotonic() - started < TIMEOUT_S + 0.5


def test_a_frozen_peer_is_a_bounded_miss(peers):
    a, g = peers()
    b, _ = peers()
    p = prompt(6)
    a.store(p, **kv(g, 6))
    a.storage_manager.flush()
    # a's address now answers nothing: a listener that accepts and never replies
    tier = p2p_of(a)
    host, port = tier.service.address
    tier.service.stop()
    frozen = socket.socket()
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    frozen.bind((host, port))
    frozen.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        frozen.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(frozen.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        started = time.monotonic()
        got = b.retrieve(p, **kv(g, 6, zero=True))
        elapsed = time.monotonic() - started
        assert not got.any() and elapsed < TIMEOUT_S + 0.5, elapsed
    finally:
        stop.set()
        frozen.close()
        for s in held:
            s.close()


def test_a_peer_that_evicted_the_chunk_answers_not_found_and_the_entry_goes(peers):
    a, g = peers()
    b, _ = peers()
    p = prompt(7)
    a.store(p, **kv(g, 7))
    a.storage_manager.flush()
    first = next(iter(a.token_database.process_tokens(p)))[2]
    a.storage_manager.hot_tier.remove(first)
    got = b.retrieve(p, **kv(g, 7, zero=True))
    assert not got.any()
    assert p2p_of(b).transport.index.owner(first.to_string()) is None
    assert b.lookup(p) == 0
