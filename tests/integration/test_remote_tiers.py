"""Remote tiers on real servers: Redis (redis-server) and S3 (SeaweedFS), through the engine.

Tenant isolation in every tier, two instances in two processes sharing one cache, and a
Redis server killed and restarted in the middle of a run of stores and retrieves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.object_format import HEADER_SIZE, decode_header
from lmcache.experimental.storage_backend.remote_backend import RemoteBackend
from lmcache.plugin.registry import registry
from lmcache.testing.fixtures import service_missing
from lmcache.testing.servers import RedisServer, ServiceUnavailable
from lmcache.utils import CacheEngineKey
from tests.integration.test_engine import (
    CHUNK,
    CONNECTORS,
    REPO,
    build,  # noqa: F401 - the fixture
    make_config,
    metadata,
    paged_kwargs,
    tokens,
)
from tests.kvutil import Geometry, slots_of


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def redis_tier(server, **options) -> dict:
    return {"name": "redis", "url": server.url, "namespace": namespace(), **options}


def s3_tier(server, bucket: str, **options) -> dict:
    return {"name": "remote", "url": f"{bucket}/kv", "namespace": namespace(),
            "storage_options": server.storage_options(), **options}


def loaded_exactly(src, dst, mask, slots) -> bool:
    """The loaded tokens are bit-exact and nothing else was written."""
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        got, want = slots_of(b, slots), slots_of(a, slots)
        if not torch.equal(got[:, mask], want[:, mask]) or got[:, ~mask].any():
            return False
    return True


# -- the S3 tier ---------------------------------------------------------------------------


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(64 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"


def chunk(allocator, seed: int, shape=(4, 2, 16, 4, 32)):
    obj = allocator.allocate(shape, torch.bfloat16, MemoryFormat.KV_BLOB)
    obj.tensor.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                     .to(torch.bfloat16))
    return obj


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "org/Model-8B", 1, 0, f"{i:064x}")


def open_s3(s3_server, bucket, allocator, **options) -> RemoteBackend:
    spec = s3_tier(s3_server, bucket, **options)
    spec.pop("name")
    return registry.create("storage_backend", "remote", spec, None, None,
                           TierContext(tier_name="s3", memory_allocator=allocator))


@pytest.mark.parametrize("serde", ["naive", "zstd"])
def test_s3_round_trip_and_objects(s3_server, s3_bucket, allocator, serde):
    backend = open_s3(s3_server, s3_bucket, allocator, serde=serde)
    other = open_s3(s3_server, s3_bucket, allocator, serde=serde,
                    namespace=backend.transport.prefix.rsplit("/", 1)[-1])
    try:
        objs = [chunk(allocator, i) for i in range(3)]
        for i, obj in enumerate(objs):
            assert backend.submit_put_task(key(i), obj).result(timeout=60)
        fs = s3_server.filesystem()
        names = fs.ls(backend.transport.prefix)
        assert len(names) == 3 and all(n.endswith(".kvobj") for n in names)
        assert decode_header(fs.cat_file(names[0])[:HEADER_SIZE]) is not None
        for i, obj in enumerate(objs):
            assert other.contains(key(i))
            got = other.get_blocking(key(i))
            assert got is not None and bytes(got.byte_array) == bytes(obj.byte_array)
            got.ref_count_down()
        assert not other.contains(key(7)) and other.get_blocking(key(7)) is None
        assert other.remove(key(0)) and not other.contains(key(0))
        for obj in objs:
            obj.ref_count_down()
    finally:
        backend.close()
        other.close()


def test_s3_frozen_server_is_bounded_then_back(s3_server, s3_bucket, allocator):
    backend = open_s3(s3_server, s3_bucket, allocator, timeout_s=1.0, retry_interval_s=0.2)
    # the chunk is written by a tier with a generous bound (a loaded machine's SeaweedFS
    # may take more than 1 s for a first write); the 1 s tier only reads it
    writer = open_s3(s3_server, s3_bucket, allocator, timeout_s=30.0,
                     namespace=backend.transport.prefix.rsplit("/", 1)[-1])
    obj = chunk(allocator, 5)
    try:
        assert writer.submit_put_task(key(5), obj).result(timeout=60)
        writer.close()
        s3_server.pause()
        try:
            started = time.monotonic()
            assert not backend.contains(key(5))
            assert backend.get_blocking(key(5)) is None
            assert backend.submit_put_task(key(6), obj) is None
            assert time.monotonic() - started < 2.5  # one timeout, then the back-off
        finally:
            s3_server.resume()
        deadline = time.monotonic() + 30
        while not backend.contains(key(5)):
            assert time.monotonic() < deadline, "the S3 tier did not come back"
            time.sleep(0.1)
        got = backend.get_blocking(key(5))
        assert bytes(got.byte_array) == bytes(obj.byte_array)
        got.ref_count_down()
    finally:
        obj.ref_count_down()
        backend.close()


# -- tenants ------------------------------------------------------------------------------


@pytest.fixture
def tier_config(request, tmp_path):
    """Storage tiers of one kind only, so that only that tier can answer."""

    def make(tier: str) -> list:
        if tier == "cpu":
            return ["local_cpu"]
        if tier == "disk":
            return [{"name": "local_disk", "path": str(tmp_path / "disk"), "max_size_gb": 0.01}]
        if tier == "redis":
            return [redis_tier(request.getfixturevalue("redis_server"))]
        server = request.getfixturevalue("s3_server")
        return [s3_tier(server, request.getfixturevalue("s3_bucket"))]

    return make


@pytest.mark.parametrize("tier", ["cpu", "disk", "redis", "s3"])
def test_tenants_never_hit_each_others_chunks(build, tier_config, tier):  # noqa: F811
    g = Geometry()
    tiers = tier_config(tier)
    n = 3 * CHUNK
    toks = tokens(n, seed=4)
    src = paged_kwargs(g, n, seed=4)
    slots = src["slot_mapping"]

    # per request: one engine, two salts
    engine = build(make_config(storage_backends=tiers), metadata(g),
                   CONNECTORS["paged_v2_stacked"](g))
    engine.store(toks, cache_salt="alice", **src)
    engine.storage_manager.flush()
    assert engine.lookup(toks, cache_salt="bob") == 0
    assert engine.lookup(toks) == 0
    dst = paged_kwargs(g, n, seed=4, zero=True)
    mask = engine.retrieve(toks, cache_salt="bob", **dst)
    assert not mask.any() and loaded_exactly(src, dst, mask, slots)
    assert engine.lookup(toks, cache_salt="alice") == n
    mask = engine.retrieve(toks, cache_salt="alice", **dst)
    assert mask.all() and loaded_exactly(src, dst, mask, slots)

    # per engine: a salt in the configuration; engines share the tier's storage
    if tier == "cpu":
        return  # the CPU tier belongs to one engine; nothing to share
    salted = dict(storage_backends=tiers, token_database={"name": "chunked", "salt": "t-a"})
    a = build(make_config(**salted), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    a.store(toks, **src)
    a.storage_manager.flush()
    if tier == "disk":  # a disk directory serves one live engine: reopen it
        from lmcache.experimental.cache_engine import LMCacheEngineBuilder

        LMCacheEngineBuilder.destroy(a.engine_id)
    other = build(make_config(storage_backends=tiers, token_database={
        "name": "chunked", "salt": "t-b"}), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    assert other.lookup(toks) == 0
    dst = paged_kwargs(g, n, seed=4, zero=True)
    assert not other.retrieve(toks, **dst).any()
    same_tenant = build(make_config(**salted), metadata(g),
                        CONNECTORS["paged_v2_stacked"](g))
    assert same_tenant.lookup(toks) == n
    mask = same_tenant.retrieve(toks, **dst)
    assert mask.all() and loaded_exactly(src, dst, mask, slots)


# -- two instances, one cache -------------------------------------------------------------


def run_instance(role: str, config: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.integration.remote_instance", role, json.dumps(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": str(hash(role) % 1000)})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_instances_in_two_processes_share_redis_and_s3(redis_server, s3_server,
                                                           s3_bucket):
    from tests.integration.remote_instance import NUM_TOKENS

    shared_redis = redis_tier(redis_server, serde="naive")
    shared_s3 = s3_tier(s3_server, s3_bucket, serde="zstd")
    base = dict(chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host")
    stored = run_instance("store", {**base, "storage_backends": [
        "local_cpu", shared_redis, shared_s3]})
    chunks = -(-NUM_TOKENS // CHUNK)
    assert stored["stats"]["redis"]["puts"] == chunks
    assert stored["stats"]["remote"]["puts"] == chunks
    for tiers in ([shared_redis], [shared_s3]):
        loaded = run_instance("load", {**base, "storage_backends": ["local_cpu", *tiers]})
        assert loaded == {"role": "load", "lookup": NUM_TOKENS, "loaded": NUM_TOKENS,
                          "exact": True}, tiers[0]["name"]


# -- the store dies in the middle of a run ---------------------------------------------


def test_redis_killed_and_restarted_during_stores_and_retrieves(build, caplog):  # noqa: F811
    try:
        server = RedisServer().start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    g = Geometry()
    # No CPU tier: every hit comes from Redis. error_handling off: had the tier raised,
    # the exception would reach this test.
    config = make_config(error_handling=False, storage_backends=[
        redis_tier(server, timeout_s=1.0, retry_interval_s=0.1, max_retry_interval_s=0.2)])
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    tier = engine.storage_manager.tiers["redis"]
    n = 2 * CHUNK
    prompts = []
    hits_before = hits_during = hits_after = 0
    try:
        for step in range(24):
            if step == 8:
                server.kill()
            if step == 16:
                server.start()  # the same port, empty
                time.sleep(0.3)  # longer than the back-off: the next call probes
            prompts.append(step)
            toks = tokens(n, seed=100 + step)
            src = paged_kwargs(g, n, seed=100 + step)
            engine.store(toks, **src)
            engine.storage_manager.flush()
            for seed in prompts[-3:]:  # the last few prompts, this one included
                toks = tokens(n, seed=100 + seed)
                src = paged_kwargs(g, n, seed=100 + seed)
                dst = paged_kwargs(g, n, seed=100 + seed, zero=True)
                mask = engine.retrieve(toks, **dst)
                assert loaded_exactly(src, dst, mask, src["slot_mapping"]), (step, seed)
                hit = int(mask.sum())
                if step < 8:
                    hits_before += hit
                elif step < 16:
                    hits_during += hit
                elif seed >= 16:
                    hits_after += hit
        assert hits_before > 0 and hits_during == 0 and hits_after == 8 * 3 * n - 3 * n
        stats = tier.stats
        assert stats.outages >= 1 and stats.dropped_puts > 0
        # the restarted server holds only what was stored after it came back
        prefix = config.storage_backends[0].options["namespace"]
        keys = redis.Redis(port=server.port).keys(f"{prefix}:*")
        assert len(keys) == 8 * 2
    finally:
        server.stop()


# --- the S3 tier runs the storage backend conformance kit --------------------------------

from lmcache.experimental.storage_backend.remote_backend import FsspecTransport  # noqa: E402
from lmcache.experimental.storage_backend.serde import NaiveSerde  # noqa: E402
from tests.unit.test_conformance_backends import _RemoteKit  # noqa: E402


class TestS3Conformance(_RemoteKit):
    """The kit against a real S3 server (SeaweedFS): ``s3://`` through `FsspecTransport`;
    the damage helpers are the fsspec ones of the other remote kits."""

    @pytest.fixture
    def backend_factory(self, allocator, s3_server, s3_bucket):
        ns = namespace()

        def make(budget_bytes=None):
            transport = FsspecTransport(f"{s3_bucket}/kit", ns, timeout_s=10,
                                        storage_options=s3_server.storage_options())
            return RemoteBackend(transport, NaiveSerde(), allocator, timeout_s=10)

        return make


def test_no_caller_waits_for_a_store_that_is_down(allocator):
    """After the call that finds the store frozen, callers never wait for it again: the
    probe at the end of each back-off runs on the tier's own thread; once the store
    answers, the probe brings the tier back by itself."""
    try:
        server = RedisServer().start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    spec = redis_tier(server, timeout_s=0.5, retry_interval_s=0.1,
                      max_retry_interval_s=0.2)
    spec.pop("name")
    backend = registry.create("storage_backend", "redis", spec, None, None,
                              TierContext(tier_name="redis", memory_allocator=allocator))
    obj = chunk(allocator, 9)
    try:
        assert backend.submit_put_task(key(9), obj).result(timeout=30)
        backend._known.clear()
        server.pause()
        try:
            started = time.monotonic()
            assert not backend.contains(key(9))  # the call that finds it frozen
            first = time.monotonic() - started
            slowest, until = 0.0, time.monotonic() + 2.0  # ten back-off intervals
            while time.monotonic() < until:
                t0 = time.monotonic()
                assert not backend.contains(key(9))
                assert backend.submit_put_task(key(10), obj) is None
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.02)
            assert backend.stats.timeouts >= 3  # the probes did ask the frozen store
        finally:
            server.resume()
        print(f"\nfrozen Redis: first call {first:.2f} s, slowest later call "
              f"{slowest * 1000:.1f} ms")
        assert first >= 0.4 and slowest < 0.05, (first, slowest)
        deadline = time.monotonic() + 10
        while not backend.available:  # the probe, not a caller, brings it back
            assert time.monotonic() < deadline, "the tier did not come back"
            time.sleep(0.02)
        assert backend.contains(key(9))
    finally:
        obj.ref_count_down()
        backend.close()
        server.stop()
