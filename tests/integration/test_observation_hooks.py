"""The observation hooks that metrics are built on fire where the events happen: lookups
versus retrieves, a remote tier's own faults, its outages and its dropped puts."""

from __future__ import annotations

import threading

import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.remote_backend import RemoteBackend, RemoteTransport
from lmcache.experimental.storage_backend.serde import NaiveSerde
from lmcache.plugin import hookimpl
from lmcache.plugin.manager import get_plugin_manager
from lmcache.utils import CacheEngineKey
from tests.kvutil import Geometry, paged_cache, slot_mapping

CHUNK = 16


class _Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    @hookimpl
    def lmcache_lookup_finished(self, operation, num_tokens, hit_tokens):
        self.calls.append(("lookup_finished", operation, num_tokens, hit_tokens))

    @hookimpl
    def lmcache_storage_error(self, tier, operation, error):
        self.calls.append(("storage_error", tier, operation, type(error).__name__))

    @hookimpl
    def lmcache_puts_dropped(self, engine_id, tier, keys, num_bytes, reason):
        self.calls.append(("puts_dropped", engine_id, tier, len(keys), num_bytes, reason))

    @hookimpl
    def lmcache_tier_availability_changed(self, engine_id, tier, available, error):
        self.calls.append(("availability", engine_id, tier, available, error is None))


def test_engine_reports_lookups_retrieves_and_an_unreachable_remote():
    g = Geometry()
    chunk_bytes = 2 * g.num_layers * CHUNK * g.hidden * 2
    meta = LMCacheEngineMetadata("org/test-model", 1, 0, "vllm", g.dtype, g.kv_shape(CHUNK))
    config = LMCacheEngineConfig(
        chunk_size=CHUNK, allocator="host", gpu_connector="vllm_paged_v2",
        max_local_cpu_size=0.01,
        storage_backends=["local_cpu", {"name": "remote", "url": "lm://127.0.0.1:1",
                                        "retry_interval_s": 600}])
    recorder = _Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="test-observation-recorder")
    try:
        engine = LMCacheEngineBuilder.get_or_create("observed", config, meta, None)
        toks = torch.arange(2 * CHUNK)
        engine.store(toks, kvcaches=paged_cache(g), slot_mapping=slot_mapping(g, 2 * CHUNK))
        assert engine.lookup(toks) == 2 * CHUNK
        engine.retrieve(toks[:CHUNK], kvcaches=paged_cache(g, zero=True),
                        slot_mapping=slot_mapping(g, CHUNK))
    finally:
        LMCacheEngineBuilder.destroy("observed")
        pm.unregister(name="test-observation-recorder")
    calls = recorder.calls
    # The store never asks the remote whether it holds a chunk (a round trip per chunk):
    # the first write finds it down: one outage; each of the two chunks' puts either
    # failed as it was written or, once the outage was known, was dropped unsent.
    errors = [c for c in calls if c[0] == "storage_error"]
    dropped = [c for c in calls if c[0] == "puts_dropped"]
    assert errors and set(errors) == {("storage_error", "remote", "put", "RemoteUnavailable")}
    assert set(dropped) <= {("puts_dropped", "observed", "remote", 1, chunk_bytes,
                             "unavailable")}
    assert len(errors) + len(dropped) == 2
    assert [c for c in calls if c[0] == "availability"] == [
        ("availability", "observed", "remote", False, False)]
    assert [c for c in calls if c[0] == "lookup_finished"] == [
        ("lookup_finished", "lookup", 2 * CHUNK, 2 * CHUNK),
        ("lookup_finished", "retrieve", CHUNK, CHUNK)]


class _FlakyTransport(RemoteTransport):
    """A dict store that fails while ``down`` is set and blocks puts while ``hold`` is
    clear."""

    description = "flaky"

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.down = False
        self.hold = threading.Event()
        self.hold.set()

    def object_name(self, key_string):
        return key_string

    def _check(self):
        if self.down:
            raise ConnectionRefusedError("store down")

    def put(self, name, parts):
        self.hold.wait(10)
        self._check()
        self.data[name] = b"".join(bytes(p) for p in parts)

    def get(self, name):
        self._check()
        return self.data.get(name)

    def exists(self, name):
        self._check()
        return name in self.data

    def delete(self, name):
        self._check()
        return self.data.pop(name, None) is not None


def test_remote_backend_reports_faults_outages_and_drops_to_its_observers():
    allocator = HostMemoryAllocator(1 << 20)
    transport = _FlakyTransport()
    events: list[tuple] = []
    backend = RemoteBackend(
        transport, NaiveSerde(), allocator, retry_interval_s=0, max_pending_puts=1,
        on_error=lambda op, exc: events.append(("error", op, type(exc).__name__)),
        on_dropped=lambda keys, n, reason: events.append(("dropped", len(keys), n, reason)),
        on_availability=lambda up, exc: events.append(("available", up, exc is None)))
    keys = [CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}") for i in range(3)]
    obj = allocator.allocate((2, 2, 16, 2, 16), torch.bfloat16, MemoryFormat.KV_BLOB)
    try:
        transport.down = True
        assert backend.contains(keys[0]) is False
        assert backend.remove(keys[0]) is False
        transport.down = False
        assert backend.contains(keys[0]) is False  # answers again
        assert events == [("error", "contains", "ConnectionRefusedError"),
                          ("available", False, False),
                          ("error", "remove", "ConnectionRefusedError"),
                          ("available", True, True)]
        events.clear()
        transport.hold.clear()  # one write in flight fills max_pending_puts=1
        first = backend.submit_put_task(keys[1], obj)
        assert backend.submit_put_task(keys[2], obj) is None
        transport.hold.set()
        assert first.result(timeout=10) is True
        assert events == [("dropped", 1, obj.get_size(), "backlog")]
    finally:
        transport.hold.set()
        backend.close()
        obj.ref_count_down()
    assert allocator.num_active_allocations == 0
