"""lmcache-prometheus end to end: a real engine, real tiers, the real HTTP endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import lmcache_prometheus
from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.plugin.manager import DISABLE_ENV, get_plugin_manager, reset_plugin_manager
from lmcache.plugin.registry import plugin_modules
from lmcache_prometheus import hooks as prometheus_hooks
from lmcache_prometheus.metrics import PORT_ENV, Metrics

CHUNK = 16
LAYERS, HEADS, HEAD = 2, 2, 16
BLOCK, BLOCKS = 16, 24
DTYPE = torch.bfloat16
CHUNK_BYTES = LAYERS * 2 * CHUNK * HEADS * HEAD * DTYPE.itemsize  # 4096


def metadata() -> LMCacheEngineMetadata:
    return LMCacheEngineMetadata("org/test-model", 1, 0, "vllm", DTYPE,
                                 (LAYERS, 2, CHUNK, HEADS, HEAD))


def kv(num_tokens: int, seed: int = 0, zero: bool = False) -> dict:
    """vLLM's paged flash-attention layout and a shuffled slot mapping."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, BLOCKS, BLOCK, HEADS, HEAD)
    caches = [torch.zeros(shape, dtype=DTYPE) if zero
              else torch.randn(shape, generator=gen).to(DTYPE) for _ in range(LAYERS)]
    slots = torch.randperm(BLOCKS * BLOCK, generator=gen)[:num_tokens].to(torch.long)
    return {"kvcaches": caches, "slot_mapping": slots}


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def scrape() -> dict[tuple[str, frozenset], float]:
    """GET /metrics on loopback: {(sample name, labels): value}."""
    address = lmcache_prometheus.server_address()
    assert address is not None, "the metrics endpoint did not start"
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv(PORT_ENV, "0")  # a free port; server_address() says which
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    reset_plugin_manager()
    assert get_plugin_manager().get_plugin("prometheus") is prometheus_hooks
    made = []

    def build(config: LMCacheEngineConfig):
        engine_id = f"prom-{uuid.uuid4().hex[:8]}"
        engine = LMCacheEngineBuilder.get_or_create(engine_id, config, metadata(), None)
        made.append(engine_id)
        return engine_id, engine

    yield build
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)
    reset_plugin_manager()


def test_metrics_follow_a_real_engine(endpoint, tmp_path):
    config = LMCacheEngineConfig(
        chunk_size=CHUNK, allocator="host", gpu_connector="vllm_paged_v2",
        error_handling=True, max_local_cpu_size=2 * CHUNK_BYTES / 1024**3,
        storage_backends=[
            "local_cpu",
            {"name": "local_disk", "path": str(tmp_path / "disk"), "max_size_gb": 0.01},
            # the seed's server protocol: unreachable; a long back-off keeps it down
            {"name": "remote", "url": "lm://127.0.0.1:1", "retry_interval_s": 600},
        ])
    eid, engine = endpoint(config)
    before = scrape()  # series exist from the start, at 0
    assert ("lmcache_hits_total", frozenset({"engine_id": eid, "operation": "lookup"}.items())) \
        in before
    assert value(before, "lmcache_tier_available", engine_id=eid, tier="remote") == 1

    toks = tokens(3 * CHUNK, seed=1)
    engine.store(toks, **kv(3 * CHUNK))
    engine.storage_manager.flush()
    s = scrape()
    for tier in ("local_cpu", "local_disk"):
        assert value(s, "lmcache_stored_chunks_total", engine_id=eid, tier=tier) == 3
        assert value(s, "lmcache_stored_tokens_total", engine_id=eid, tier=tier) == 3 * CHUNK
        assert value(s, "lmcache_stored_bytes_total", engine_id=eid, tier=tier) \
            == 3 * CHUNK_BYTES
    # the CPU budget holds two chunks: the third made room with the second, which the
    # disk holds too (a prompt never evicts its own prefix)
    assert value(s, "lmcache_evicted_chunks_total", engine_id=eid, tier="local_cpu") == 1
    assert value(s, "lmcache_evicted_bytes_total", engine_id=eid, tier="local_cpu") \
        == CHUNK_BYTES
    assert value(s, "lmcache_store_duration_seconds_count", engine_id=eid,
                 tier="local_cpu") == 1  # one store operation
    assert value(s, "lmcache_store_duration_seconds_count", engine_id=eid,
                 tier="local_disk") == 3  # one asynchronous write per chunk
    # the remote tier: the store asks it nothing (no round trip per chunk); the first
    # write found it down, and every put either failed as it was written or, once the
    # outage was known, was dropped unsent
    put_errors = value(s, "lmcache_storage_errors_total", engine_id=eid, tier="remote",
                       operation="put")
    assert put_errors >= 1
    assert value(s, "lmcache_tier_available", engine_id=eid, tier="remote") == 0
    assert value(s, "lmcache_tier_outages_total", engine_id=eid, tier="remote") == 1
    assert put_errors + value(s, "lmcache_dropped_puts_total", engine_id=eid, tier="remote",
                              reason="unavailable") == 3
    assert value(s, "lmcache_stored_chunks_total", engine_id=eid, tier="remote") == 0

    assert engine.lookup(toks) == 3 * CHUNK
    assert engine.lookup(tokens(2 * CHUNK, seed=2)) == 0
    second = torch.arange(2 * CHUNK) >= CHUNK  # the evicted chunk: from disk
    hit = engine.retrieve(toks[:2 * CHUNK], second, **kv(2 * CHUNK, zero=True))[CHUNK:]
    assert hit.all()
    missed = engine.retrieve(tokens(CHUNK, seed=3), **kv(CHUNK, zero=True))
    assert not missed.any()

    s = scrape()
    assert value(s, "lmcache_hits_total", engine_id=eid, operation="lookup") == 1
    assert value(s, "lmcache_misses_total", engine_id=eid, operation="lookup") == 1
    assert value(s, "lmcache_requested_tokens_total", engine_id=eid,
                 operation="lookup") == 5 * CHUNK
    assert value(s, "lmcache_hit_tokens_total", engine_id=eid, operation="lookup") \
        == 3 * CHUNK
    assert value(s, "lmcache_hits_total", engine_id=eid, operation="retrieve") == 1
    assert value(s, "lmcache_misses_total", engine_id=eid, operation="retrieve") == 1
    assert value(s, "lmcache_requested_tokens_total", engine_id=eid,
                 operation="retrieve") == 2 * CHUNK
    assert value(s, "lmcache_hit_tokens_total", engine_id=eid, operation="retrieve") \
        == CHUNK
    assert value(s, "lmcache_lookup_duration_seconds_count", engine_id=eid,
                 operation="lookup") == 2
    assert value(s, "lmcache_retrieved_chunks_total", engine_id=eid, tier="local_disk") == 1
    assert value(s, "lmcache_retrieved_bytes_total", engine_id=eid, tier="local_disk") \
        == CHUNK_BYTES
    assert value(s, "lmcache_retrieved_chunks_total", engine_id=eid, tier="local_cpu") == 0
    assert value(s, "lmcache_retrieve_duration_seconds_count", engine_id=eid,
                 tier="local_disk") == 1
    assert value(s, "lmcache_retrieve_duration_seconds_sum", engine_id=eid,
                 tier="local_disk") > 0
    # the chunk read from disk needed CPU memory: one more eviction
    assert value(s, "lmcache_evicted_chunks_total", engine_id=eid, tier="local_cpu") == 2
    # a remote that is down is not tried, so no new errors
    assert value(s, "lmcache_storage_errors_total", engine_id=eid, tier="remote",
                 operation="put") == put_errors
    assert value(s, "lmcache_storage_errors_total", engine_id=eid, tier="remote",
                 operation="get") == 0

    # the promoted chunk is served from the CPU tier now
    engine.retrieve(toks[:2 * CHUNK], second, **kv(2 * CHUNK, zero=True))
    s = scrape()
    assert value(s, "lmcache_retrieved_chunks_total", engine_id=eid, tier="local_cpu") == 1
    assert value(s, "lmcache_retrieved_tokens_total", engine_id=eid, tier="local_cpu") \
        == CHUNK


def test_engines_in_one_process_share_the_collectors(endpoint):
    config = LMCacheEngineConfig(chunk_size=CHUNK, allocator="host",
                                 gpu_connector="vllm_paged_v2", max_local_cpu_size=0.01)
    first_id, first = endpoint(config)
    address = lmcache_prometheus.server_address()
    second_id, second = endpoint(config)
    assert lmcache_prometheus.server_address() == address  # one server per process
    first.store(tokens(2 * CHUNK, seed=4), **kv(2 * CHUNK))
    second.store(tokens(CHUNK, seed=5), **kv(CHUNK))
    s = scrape()
    assert value(s, "lmcache_stored_chunks_total", engine_id=first_id, tier="local_cpu") == 2
    assert value(s, "lmcache_stored_chunks_total", engine_id=second_id, tier="local_cpu") == 1


def test_names_already_taken_do_not_break_the_engine(caplog):
    # The plugin's collectors are already in the default registry (and vLLM's may be):
    # a second set falls back to a private registry instead of raising.
    other = Metrics(REGISTRY)
    assert other.registry is not REGISTRY
    assert "private registry" in caplog.text
    names = {m.name for m in REGISTRY.collect()}
    assert "lmcache_hits" in names  # the first set is still registered
    private = Metrics(CollectorRegistry())
    private.request("e", "lookup", 32, 16, 0.001)
    assert private.registry.get_sample_value(
        "lmcache_hit_tokens_total", {"engine_id": "e", "operation": "lookup"}) == 16


def test_found_through_its_entry_point_and_disabled_by_env(monkeypatch):
    assert ("prometheus", "lmcache_prometheus.hooks") in \
        [(name, value) for name, value, _ in plugin_modules()]
    listed = subprocess.run([sys.executable, "-m", "lmcache.cli", "plugins", "list"],
                            capture_output=True, text=True, check=True).stdout
    assert any(line.split()[:3] == ["hooks", "prometheus", "lmcache-prometheus"]
               for line in listed.splitlines()), listed

    monkeypatch.setenv(DISABLE_ENV, "prometheus")
    reset_plugin_manager()
    try:
        pm = get_plugin_manager()
        assert pm.is_blocked("prometheus")
        assert pm.get_plugin("prometheus") is None
        impls = [i.plugin_name for i in pm.hook.lmcache_lookup_finished.get_hookimpls()]
        assert "prometheus" not in impls
    finally:
        monkeypatch.delenv(DISABLE_ENV)
        reset_plugin_manager()
    assert get_plugin_manager().get_plugin("prometheus") is prometheus_hooks


def test_no_port_means_no_server():
    # In a fresh process without LMCACHE_PROMETHEUS_PORT, an engine starts no server
    # but its metrics are in the default registry (for an application's own /metrics).
    code = (
        "import torch\n"
        "from prometheus_client import REGISTRY\n"
        "from lmcache.experimental.cache_engine import LMCacheEngineBuilder\n"
        "from lmcache.experimental.config import LMCacheEngineConfig, "
        "LMCacheEngineMetadata\n"
        "import lmcache_prometheus\n"
        "meta = LMCacheEngineMetadata('m', 1, 0, 'vllm', torch.bfloat16, (2, 2, 16, 2, 16))\n"
        "config = LMCacheEngineConfig(chunk_size=16, allocator='host', "
        "max_local_cpu_size=0.01)\n"
        "engine = LMCacheEngineBuilder.get_or_create('solo', config, meta, None)\n"
        "engine.lookup(torch.arange(32))\n"
        "assert lmcache_prometheus.server_address() is None\n"
        "print(REGISTRY.get_sample_value('lmcache_misses_total', "
        "{'engine_id': 'solo', 'operation': 'lookup'}))\n"
        "LMCacheEngineBuilder.destroy('solo')\n")
    env = {k: v for k, v in os.environ.items() if k not in (PORT_ENV, DISABLE_ENV)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1.0"
