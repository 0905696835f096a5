"""What the kernel gives lmcache's own tiers, a third party's get too, declared only
through entry points of a distribution (a hand-written dist-info, no pip):

* a hot tier (`lmcache.abc.storage_backend.HotTier`) gets eviction when the allocator is
  full, promotion of lower-tier hits, and the seed's ``"Hot"`` name in ``search_range``;
* a store that claims a URL scheme (``lmcache.url_schemes``) serves ``remote_url`` of
  that scheme, built by the ``remote`` tier with the same options.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.plugin.registry import DuplicatePluginError, PluginLoadError

# A hot tier written against the contracts only: chunks as memory objects from the
# engine's allocator, least recently used first out, and evict_for.
HOT_TIER = '''
import threading
from collections import OrderedDict
from concurrent.futures import Future

from lmcache.abc.storage_backend import StorageBackendInterface
from lmcache.plugin.options import PluginOptions

CALLS = []


def _done(value):
    future = Future()
    future.set_result(value)
    return future


class HotDict(StorageBackendInterface):
    class Options(PluginOptions):
        pass

    def __init__(self):
        self._lock = threading.Lock()
        self._objects = OrderedDict()

    @classmethod
    def from_options(cls, options, config, metadata, context):
        return cls()

    def contains(self, key):
        with self._lock:
            return key in self._objects

    def exists_in_put_tasks(self, key):
        return False

    def submit_put_task(self, key, memory_obj):
        with self._lock:
            if key in self._objects:
                return None
            memory_obj.ref_count_up()
            self._objects[key] = memory_obj
        return _done(True)

    def submit_prefetch_task(self, key):
        obj = self.get_blocking(key)
        return None if obj is None else _done(obj)

    def get_blocking(self, key):
        with self._lock:
            obj = self._objects.get(key)
            if obj is not None:
                obj.ref_count_up()
                self._objects.move_to_end(key)
            return obj

    def remove(self, key):
        with self._lock:
            obj = self._objects.pop(key, None)
        if obj is not None:
            obj.ref_count_down()
        return obj is not None

    def close(self):
        with self._lock:
            objects, self._objects = list(self._objects.values()), OrderedDict()
        for obj in objects:
            obj.ref_count_down()

    def evict_for(self, nbytes):
        CALLS.append(nbytes)
        freed, victims = 0, []
        with self._lock:
            for key, obj in list(self._objects.items()):
                if freed >= nbytes:
                    break
                if obj.get_ref_count() == 1 and not obj.is_pinned:
                    del self._objects[key]
                    victims.append(obj)
                    freed += obj.get_size()
        for obj in victims:
            obj.ref_count_down()
        return bool(victims)
'''

# A remote store written against the contracts and the remote kit only.
SCHEME_STORE = '''
import threading

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.kits.remote import RemoteBackend, RemoteOptions

STORES = {}
BUILT = []


class DictTransport(RemoteTransport):
    def __init__(self, url):
        self.description = url
        self.data = STORES.setdefault(url, {})
        self.lock = threading.Lock()

    def object_name(self, key_string):
        return key_string

    def put(self, name, parts):
        with self.lock:
            self.data[name] = b"".join(bytes(p) for p in parts)

    def get(self, name, max_bytes=None):
        return self.data.get(name)

    def exists(self, name):
        return name in self.data

    def delete(self, name):
        with self.lock:
            return self.data.pop(name, None) is not None


class AcmeBackend(RemoteBackend):
    class Options(RemoteOptions):
        pass

    @classmethod
    def from_options(cls, options, config, metadata, context):
        BUILT.append(options)
        return cls.from_transport(DictTransport(options.url), options, config, metadata,
                                  context)
'''

LAYERS, HEADS, HEAD = 2, 2, 16
CHUNK = 16


def _metadata() -> LMCacheEngineMetadata:
    return LMCacheEngineMetadata("acme/model", 1, 0, "vllm", torch.float32,
                                 (LAYERS, 2, CHUNK, HEADS, HEAD))


def _kv(tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens, HEADS, HEAD, generator=g) for _ in range(LAYERS)]


def _chunk_bytes() -> int:
    return 2 * LAYERS * CHUNK * HEADS * HEAD * 4


def test_a_third_party_hot_tier_gets_eviction_promotion_and_the_hot_name(
        make_distribution, tmp_path):
    make_distribution("acme-hot", {"lmcache.storage_backends": {"acme.hot": "acme_hot:HotDict"}},
                      {"acme_hot.py": HOT_TIER})
    import acme_hot

    region_chunks = 4  # the allocator holds 4 chunks; the prompt has 12
    config = LMCacheEngineConfig(
        chunk_size=CHUNK, max_local_cpu_size=(region_chunks * _chunk_bytes()) / 1024**3,
        allocator={"name": "host"}, gpu_connector={"name": "vllm_nested_tuple"},
        storage_backends=[{"name": "acme.hot"},
                          {"name": "local_disk", "path": str(tmp_path / "disk"),
                           "max_size_gb": 1}])
    engine = LMCacheEngineBuilder.get_or_create("acme-hot", config, _metadata(), None)
    try:
        manager = engine.storage_manager
        assert manager.hot_tier_name == "acme.hot"
        tokens = torch.arange(12 * CHUNK)
        kv = _kv(12 * CHUNK, 1)
        engine.store(tokens, kvcaches=kv)
        manager.flush()
        assert acme_hot.CALLS, "the storage manager never asked the hot tier to evict"
        disk = manager.tiers["local_disk"]
        assert len(disk.keys()) == 12  # every chunk got memory, thanks to evict_for
        hot = manager.tiers["acme.hot"]
        assert engine.lookup(tokens, ["Hot"]) < 12 * CHUNK  # "Hot" is acme.hot: evicted
        assert engine.lookup(tokens) == 12 * CHUNK

        out = [torch.zeros_like(layer) for layer in kv]
        assert bool(engine.retrieve(tokens, kvcaches=out).all())
        assert all(torch.equal(a, b) for a, b in zip(kv, out))
        last = [k for _, _, k in engine.token_database.process_tokens(tokens)][-1]
        assert hot.contains(last)  # hits from the disk tier were promoted into acme.hot
    finally:
        LMCacheEngineBuilder.destroy("acme-hot")


def test_a_third_party_store_serves_the_url_scheme_it_claims(make_distribution):
    make_distribution("acme-store", {
        "lmcache.storage_backends": {"acme.kv": "acme_store:AcmeBackend"},
        "lmcache.url_schemes": {"acmekv": "acme_store:AcmeBackend"},
    }, {"acme_store.py": SCHEME_STORE})
    import acme_store

    config = LMCacheEngineConfig(chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.01,
                                 remote_url="acmekv://bucket/x", remote_serde="zstd",
                                 allocator={"name": "host"},
                                 gpu_connector={"name": "vllm_nested_tuple"})
    tokens, kv = torch.arange(3 * CHUNK), _kv(3 * CHUNK, 2)
    writer = LMCacheEngineBuilder.get_or_create("acme-w", config, _metadata(), None)
    try:
        tier = writer.storage_manager.tiers["remote"]
        assert isinstance(tier, acme_store.AcmeBackend)
        [options] = acme_store.BUILT
        assert (options.url, options.serde) == ("acmekv://bucket/x", "zstd")
        writer.store(tokens, kvcaches=kv)
        writer.storage_manager.flush()
        assert len(acme_store.STORES["acmekv://bucket/x"]) == 3
    finally:
        LMCacheEngineBuilder.destroy("acme-w")
    reader = LMCacheEngineBuilder.get_or_create("acme-r", config, _metadata(), None)
    try:
        out = [torch.zeros_like(layer) for layer in kv]
        assert bool(reader.retrieve(tokens, kvcaches=out).all())
        assert all(torch.equal(a, b) for a, b in zip(kv, out))
    finally:
        LMCacheEngineBuilder.destroy("acme-r")


def test_two_claims_of_one_scheme_name_both(make_distribution):
    for dist in ("acme-one", "acme-two"):
        module = dist.replace("-", "_")
        make_distribution(dist, {
            "lmcache.storage_backends": {f"{module}.kv": f"{module}:AcmeBackend"},
            "lmcache.url_schemes": {"acmekv": f"{module}:AcmeBackend"},
        }, {f"{module}.py": SCHEME_STORE})
    config = LMCacheEngineConfig(chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.01,
                                 remote_url="acmekv://bucket", allocator={"name": "host"})
    with pytest.raises(DuplicatePluginError, match="acme-one.*acme-two|acme-two.*acme-one"):
        LMCacheEngineBuilder.get_or_create("acme-dup", config, _metadata(), None)
    assert LMCacheEngineBuilder.get("acme-dup") is None


def test_a_claim_for_a_class_that_is_no_storage_backend_is_refused(make_distribution):
    make_distribution("acme-typo", {"lmcache.url_schemes": {"acmekv": "acme_typo:Nope"}})
    config = LMCacheEngineConfig(chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.01,
                                 remote_url="acmekv://bucket", allocator={"name": "host"})
    with pytest.raises(PluginLoadError, match="acme-typo.*not a registered storage backend"):
        LMCacheEngineBuilder.get_or_create("acme-typo", config, _metadata(), None)
