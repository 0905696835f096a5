"""The remote kernel over fsspec file systems (file://, memory://), an lm:// server that
is not there, the `remote` tier's dispatch by URL scheme, and the configuration that
derives it. Redis and S3 servers are exercised in tests/integration/test_remote_tiers.py
and in plugins/lmcache-redis, the cache server in tests/integration/test_cache_server.py."""

from __future__ import annotations

import logging
import time
import uuid

import pydantic
import pytest
import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.config import ConfigError, LMCacheEngineConfig
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.object_format import decode_header
from lmcache.experimental.storage_backend.remote_backend import (
    FsspecTransport,
    LMServerTransport,
    RemoteBackend,
    RemoteStorageBackend,
    redact_url,
)
from lmcache.experimental.storage_backend.serde import NaiveSerde, ZstdSerde
from lmcache.plugin.registry import registry
from lmcache.utils import CacheEngineKey

SHAPE = (2, 2, 16, 2, 16)


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "org/model", 1, 0, f"{i:064x}")


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(16 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"


def chunk(allocator, seed: int):
    obj = allocator.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_BLOB)
    obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
                     .to(torch.bfloat16))
    return obj


def same(a, b) -> bool:
    return a.get_shape() == b.get_shape() and bytes(a.byte_array) == bytes(b.byte_array)


@pytest.fixture
def remote(allocator):
    made = []

    def make(url, **options) -> RemoteBackend:
        backend = registry.create("storage_backend", "remote", {"url": url, **options},
                                  None, None,
                                  TierContext(tier_name="remote", memory_allocator=allocator))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def put(backend, k, obj):
    future = backend.submit_put_task(k, obj)
    assert future is not None and future.result(timeout=30) is True


@pytest.mark.parametrize("serde", ["naive", "zstd"])
def test_fsspec_directory_round_trip(tmp_path, remote, allocator, serde):
    url = f"file://{tmp_path}/shared"
    a = remote(url, serde=serde)
    assert isinstance(a, RemoteStorageBackend) and isinstance(a.transport, FsspecTransport)
    objs = [chunk(allocator, i) for i in range(3)]
    for i, obj in enumerate(objs):
        put(a, key(i), obj)
    files = sorted((tmp_path / "shared" / "lmcache").iterdir())
    assert [f.name for f in files] == sorted(f"{key(i).to_string()}.kvobj" for i in range(3))
    assert all(decode_header(f.read_bytes()[:128]) is not None for f in files)
    b = remote(url, serde=serde)  # another instance on the same directory
    for i, obj in enumerate(objs):
        assert b.contains(key(i))
        got = b.get_blocking(key(i))
        assert same(obj, got)
        got.ref_count_down()
        obj.ref_count_down()
    assert not b.contains(key(9)) and b.get_blocking(key(9)) is None
    assert b.remove(key(0)) and not b.contains(key(0))
    assert b.stats.hits == 3 and b.stats.failures == 0


def test_memory_filesystem_and_namespaces(remote, allocator):
    url = f"memory://lmcache-{uuid.uuid4().hex}"
    a, b = remote(url, namespace="tenant-a"), remote(url, namespace="tenant-b")
    obj = chunk(allocator, 1)
    put(a, key(1), obj)
    assert a.contains(key(1)) and not b.contains(key(1))
    obj.ref_count_down()


def test_known_keys_save_round_trips_and_forget_what_vanished(tmp_path, remote, allocator):
    a = remote(f"file://{tmp_path}")
    obj = chunk(allocator, 2)
    put(a, key(2), obj)
    (tmp_path / "lmcache" / f"{key(2).to_string()}.kvobj").unlink()  # evicted elsewhere
    assert a.contains(key(2))  # still believed: no round trip for a known key
    assert a.get_blocking(key(2)) is None  # the load finds out
    assert not a.contains(key(2))
    assert a.stats.misses == 1
    obj.ref_count_down()


def test_bad_values_are_misses(tmp_path, remote, allocator):
    a = remote(f"file://{tmp_path}")
    obj = chunk(allocator, 3)
    put(a, key(3), obj)
    path = tmp_path / "lmcache" / f"{key(3).to_string()}.kvobj"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    b = remote(f"file://{tmp_path}")
    assert b.contains(key(3)) and b.get_blocking(key(3)) is None
    assert b.stats.bad_values == 1 and not b.contains(key(3))
    assert path.exists()  # not deleted: in a shared store it may be another program's
    obj.ref_count_down()


def test_pending_puts_are_bounded(tmp_path, allocator):
    backend = RemoteBackend(FsspecTransport(f"file://{tmp_path}"), NaiveSerde(), allocator,
                            max_pending_puts=2, num_workers=1)
    objs = [chunk(allocator, i) for i in range(6)]
    futures = [backend.submit_put_task(key(i), o) for i, o in enumerate(objs)]
    assert sum(f is not None for f in futures) >= 2
    for f in futures:
        if f is not None:
            f.result(timeout=30)
    stats = backend.stats
    assert stats.puts + stats.dropped_puts == 6 and stats.puts >= 2
    backend.close()
    for o in objs:
        o.ref_count_down()


def test_close_waits_for_writes_and_refuses_more(tmp_path, allocator):
    backend = RemoteBackend(FsspecTransport(f"file://{tmp_path}"), ZstdSerde(), allocator)
    objs = [chunk(allocator, i) for i in range(4)]
    for i, o in enumerate(objs):
        backend.submit_put_task(key(i), o)
    backend.close()
    assert backend.stats.puts == 4
    assert backend.submit_put_task(key(9), objs[0]) is None
    assert backend.get_blocking(key(0)) is None and backend.submit_prefetch_task(key(0)) is None
    for o in objs:
        o.ref_count_down()


def test_lm_url_without_a_server_is_a_dead_remote(remote, allocator, caplog):
    from lmcache.testing.servers import free_port

    with caplog.at_level(logging.WARNING):
        # the seed's default remote_url, on a port where nothing listens
        backend = remote(f"lm://localhost:{free_port()}", retry_interval_s=0.05)
        assert isinstance(backend.transport, LMServerTransport)
        obj = chunk(allocator, 4)
        started = time.monotonic()
        for i in range(100):
            assert not backend.contains(key(i))
            assert backend.get_blocking(key(i)) is None
            backend.submit_put_task(key(i), obj)
        assert time.monotonic() - started < 2.0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused" in m for m in messages) == 1  # the outage, logged once
    assert sum("a put was dropped" in m for m in messages) == 1  # the drops, logged once
    assert backend.stats.dropped_puts >= 90
    obj.ref_count_down()


def test_redis_urls_need_the_redis_tier(remote, plugin_registry):
    table = plugin_registry._discover()  # as if lmcache-redis were not installed
    table["storage_backend"].pop("redis", None)
    for scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
        table["url_scheme"].pop(scheme, None)
    with pytest.raises(ImportError, match="pip install -e plugins/lmcache-redis"):
        remote("redis://localhost:6379")
    with pytest.raises(ValueError, match="fsspec URLs only"):
        remote("lm://h:1", storage_options={"key": "x"})


def test_s3_url_without_s3fs_names_the_extra(monkeypatch, remote):
    import sys

    implementations = sys.modules["fsspec.registry"]._registry
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(implementations, protocol, raising=False)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[s3\]'"):
        remote("s3://bucket/prefix")


def test_options_are_validated():
    with pytest.raises(pydantic.ValidationError):
        RemoteStorageBackend.Options(url="s3://b", unknown=1)
    with pytest.raises(pydantic.ValidationError):
        RemoteStorageBackend.Options(url="s3://b", timeout_s=-1)
    with pytest.raises(pydantic.ValidationError):
        RemoteStorageBackend.Options(url="s3://b", namespace="../x")


def test_redact_url():
    assert redact_url("redis://alice:secret@h:1/0") == "redis://alice:***@h:1/0"
    assert redact_url("redis://:secret@h:1") == "redis://:***@h:1"
    assert redact_url("s3://bucket/p") == "s3://bucket/p"


# -- configuration -----------------------------------------------------------------------


def test_config_derives_the_remote_tier():
    config = LMCacheEngineConfig(remote_url="redis://cache:6379", remote_serde="zstd",
                                 blocking_timeout_secs=2)
    spec = config.storage_backend_specs()[-1]
    assert spec.name == "remote" and spec.options == {
        "url": "redis://cache:6379", "serde": "zstd", "timeout_s": 2.0}
    registry.validate_options("storage_backend", "remote", spec.options)


def test_config_checks_the_serde_and_agreement():
    with pytest.raises(ConfigError, match="remote_serde.*unknown serde 'zstdd'.*zstd"):
        LMCacheEngineConfig(remote_url="redis://c:1", remote_serde="zstdd")
    with pytest.raises(ConfigError, match="blocking_timeout_secs"):
        LMCacheEngineConfig(blocking_timeout_secs=1, storage_backends=[
            {"name": "remote", "url": "redis://c:1", "timeout_s": 3}])
    config = LMCacheEngineConfig(storage_backends=[
        "local_cpu", {"name": "remote", "url": "s3://b/p", "timeout_s": 3}])
    assert config.blocking_timeout_secs == 3 and config.remote_url == "s3://b/p"
