"""LMCacheEngine end to end: real tiers, real files, real threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from lmcache.experimental.cache_engine import LMCacheEngine, LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import (
    VLLMNestedTupleGPUConnector,
    VLLMPagedMemGPUConnector,
    VLLMPagedMemGPUConnectorV2,
)
from lmcache.experimental.storage_backend.storage_manager import StorageFault
from lmcache.plugin import hookimpl
from lmcache.plugin.manager import get_plugin_manager
from tests.kvutil import Geometry, nested_cache, paged_cache, slot_mapping, slots_of

CHUNK = 16
REPO = Path(__file__).resolve().parents[2]


def metadata(g: Geometry, model: str = "org/test-model") -> LMCacheEngineMetadata:
    return LMCacheEngineMetadata(model, 1, 0, "vllm", g.dtype, g.kv_shape(CHUNK))


def make_config(**fields) -> LMCacheEngineConfig:
    base = dict(chunk_size=CHUNK, max_local_cpu_size=0.01, allocator="host")
    base.update(fields)
    return LMCacheEngineConfig(**base)


_ids = iter(range(10**6))


@pytest.fixture
def build():
    """Build engines through the builder; destroy them after the test and check that
    every memory object went back to its allocator."""
    made: list[tuple[str, LMCacheEngine]] = []

    def make(config, meta, connector, instance_id=None):
        instance_id = instance_id or f"test-{next(_ids)}"
        engine = LMCacheEngineBuilder.get_or_create(instance_id, config, meta, connector)
        made.append((instance_id, engine))
        return engine

    yield make
    for instance_id, engine in made:
        LMCacheEngineBuilder.destroy(instance_id)
        assert engine.memory_allocator.num_active_allocations == 0, instance_id
        assert engine.memory_allocator.allocated_bytes == 0, instance_id


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def paged_kwargs(g, n, seed=0, stacked=True, zero=False):
    return {"kvcaches": paged_cache(g, seed=seed, stacked=stacked, zero=zero),
            "slot_mapping": slot_mapping(g, n, seed=seed)}


def assert_paged_equal(src, dst, slots):
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        assert torch.equal(slots_of(a, slots), slots_of(b, slots))


CONNECTORS = {
    "nested": lambda g: VLLMNestedTupleGPUConnector(g.hidden, g.num_layers),
    "paged_v1_pairs": lambda g: VLLMPagedMemGPUConnector(g.hidden, g.num_layers),
    "paged_v2_stacked": lambda g: VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers),
    "paged_v2_pairs": lambda g: VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers),
}


def kv_for(name, g, n, seed=0, zero=False):
    if name == "nested":
        return {"kvcaches": nested_cache(g, n, seed=seed, zero=zero)}
    return paged_kwargs(g, n, seed=seed, stacked=name != "paged_v1_pairs" and
                        name != "paged_v2_pairs", zero=zero)


def assert_kv_equal(name, src, dst, n):
    if name == "nested":
        for (k1, v1), (k2, v2) in zip(src["kvcaches"], dst["kvcaches"]):
            assert torch.equal(k1[:n], k2[:n]) and torch.equal(v1[:n], v2[:n])
    else:
        assert_paged_equal(src, dst, src["slot_mapping"][:n])


def disk_config(path, **fields):
    return make_config(local_cpu=False, local_disk=str(path), max_local_disk_size=0.01,
                       **fields)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_store_retrieve_bit_exact(build, tmp_path, connector, dtype, tier):
    g = Geometry(dtype=dtype)
    n = 3 * CHUNK + 5  # the last chunk is partial
    config = make_config() if tier == "cpu" else disk_config(tmp_path / "disk")
    engine = build(config, metadata(g), CONNECTORS[connector](g))
    toks = tokens(n)
    src = kv_for(connector, g, n, seed=1)
    engine.store(toks, **src)
    if tier == "disk":  # a new engine on the same directory: only the disk can serve it
        LMCacheEngineBuilder.destroy(engine.engine_id)
        engine = build(config, metadata(g), CONNECTORS[connector](g))
    assert engine.lookup(toks) == n
    dst = kv_for(connector, g, n, seed=1, zero=True)
    if connector != "nested":
        dst["slot_mapping"] = src["slot_mapping"]
    ret = engine.retrieve(toks, **dst)
    assert ret.dtype == torch.bool and ret.device.type == "cpu" and bool(ret.all())
    assert_kv_equal(connector, src, dst, n)


def test_cpu_and_disk_tiers_promote_and_search_range(build, tmp_path):
    g = Geometry()
    config = make_config(local_disk=str(tmp_path / "d"), max_local_disk_size=0.01)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(4 * CHUNK)
    src = paged_kwargs(g, 4 * CHUNK, seed=3)
    engine.store(toks, **src)
    manager = engine.storage_manager
    assert list(manager.tiers) == ["local_cpu", "local_disk"]
    manager.flush()
    keys = [k for _, _, k in engine.token_database.process_tokens(toks)]
    assert all(manager.tiers["local_disk"].contains(k) for k in keys)
    # drop chunk 1 from the CPU tier: lookup in "Hot" stops there, in all tiers it does not
    manager.tiers["local_cpu"].remove(keys[1])
    assert engine.lookup(toks, search_range=["Hot"]) == CHUNK
    assert engine.lookup(toks, search_range=["local_cpu", "LocalDiskBackend"]) == 4 * CHUNK
    with pytest.raises(ValueError, match="unknown tiers"):
        engine.lookup(toks, search_range=["nowhere"])


def test_disk_hit_is_promoted_and_prefetch_moves_chunks_up(build, tmp_path):
    g = Geometry()
    path = tmp_path / "d"
    writer = build(disk_config(path), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(3 * CHUNK)
    src = paged_kwargs(g, 3 * CHUNK, seed=4)
    writer.store(toks, **src)
    LMCacheEngineBuilder.destroy(writer.engine_id)

    config = make_config(local_disk=str(path), max_local_disk_size=0.01)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    assert engine.lookup(toks, search_range=["local_cpu"]) == 0
    engine.prefetch(toks)
    engine.storage_manager.wait_for_prefetches(10)
    assert engine.lookup(toks, search_range=["local_cpu"]) == 3 * CHUNK
    dst = paged_kwargs(g, 3 * CHUNK, seed=4, zero=True)
    assert bool(engine.retrieve(toks, **dst).all())
    assert_paged_equal(src, dst, src["slot_mapping"])


def test_partial_prefix_hits_and_masks(build):
    g = Geometry()
    engine = build(make_config(), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    long = tokens(5 * CHUNK)
    src = paged_kwargs(g, 5 * CHUNK, seed=5)
    engine.store(long[: 3 * CHUNK], **src)
    assert engine.lookup(long) == 3 * CHUNK
    assert engine.lookup(long[: 2 * CHUNK + 3]) == 2 * CHUNK  # partial last chunk differs
    dst = paged_kwargs(g, 5 * CHUNK, seed=5, zero=True)
    ret = engine.retrieve(long, **dst)
    assert ret.tolist() == [True] * (3 * CHUNK) + [False] * (2 * CHUNK)
    assert_paged_equal(src, dst, src["slot_mapping"][: 3 * CHUNK])
    # the untouched slots stay zero
    rest = src["slot_mapping"][3 * CHUNK:]
    assert all(not slots_of(layer, rest).any() for layer in dst["kvcaches"])

    # store the rest with a mask: the first 3 chunks are already there
    mask = torch.ones(5 * CHUNK, dtype=torch.bool)
    mask[: 3 * CHUNK] = False
    engine.store(long, mask, **src)
    assert engine.lookup(long) == 5 * CHUNK
    dst = paged_kwargs(g, 5 * CHUNK, seed=5, zero=True)
    ret = engine.retrieve(long, mask, **dst)
    assert ret.tolist() == [False] * (3 * CHUNK) + [True] * (2 * CHUNK)
    first = src["slot_mapping"][: 3 * CHUNK]
    assert all(not slots_of(layer, first).any() for layer in dst["kvcaches"])


def test_bad_input_is_a_value_error(build):
    g = Geometry()
    engine = build(make_config(), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(2 * CHUNK)
    src = paged_kwargs(g, 2 * CHUNK)
    mask = torch.ones(2 * CHUNK, dtype=torch.bool)
    mask[:3] = False
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        engine.store(toks, mask, **src)
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        engine.retrieve(toks, mask, **src)
    with pytest.raises(ValueError, match="kvcaches"):
        engine.store(toks, slot_mapping=src["slot_mapping"])
    assert engine.lookup(toks) == 0  # nothing half-stored
    other = tokens(CHUNK, seed=99)
    engine.store(other, **src)
    with pytest.raises(ValueError, match="slot_mapping"):
        engine.retrieve(other, kvcaches=src["kvcaches"])
    with pytest.raises(ValueError, match="1-D"):
        engine.lookup(toks.view(2, -1))
    bad_mask = torch.tensor([True] * CHUNK + [False] * CHUNK)
    with pytest.raises(ValueError, match="FFF...TTT"):
        engine.store(toks, bad_mask, **src)
    assert engine.lookup(toks) == 0  # nothing half-stored


def test_lru_eviction_keeps_pinned_and_in_use_chunks(build):
    g = Geometry()
    chunk_bytes = 2 * g.num_layers * CHUNK * g.hidden * 2
    # room for 4 chunks in the CPU tier
    config = make_config(max_local_cpu_size=4 * chunk_bytes / 1024**3)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    cpu = engine.storage_manager.tiers["local_cpu"]
    prompts = [tokens(CHUNK, seed=100 + i) for i in range(6)]
    src = paged_kwargs(g, CHUNK, seed=6)
    engine.store(prompts[0], **src)
    [(_, _, key0)] = engine.token_database.process_tokens(prompts[0])
    assert cpu.pin(key0)
    for p in prompts[1:]:
        engine.store(p, **src)
    # chunk 0 is pinned: it stays although it is the least recently used; 1 and 2 went
    assert engine.lookup(prompts[0]) == CHUNK
    assert [engine.lookup(p) for p in prompts[1:]] == [0, 0, CHUNK, CHUNK, CHUNK]
    assert cpu.unpin(key0)
    engine.store(prompts[1], **src)
    assert engine.lookup(prompts[0]) == 0  # unpinned, it is the first to go


def test_second_process_loads_what_the_first_stored(tmp_path, build):
    g = Geometry()
    path = tmp_path / "shared-disk"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tests.integration.test_engine import *
        from tests.kvutil import *
        g = Geometry()
        engine = LMCacheEngineBuilder.get_or_create(
            "child", disk_config({str(path)!r}), metadata(g),
            VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
        engine.store(tokens(4 * CHUNK, seed=9), **paged_kwargs(g, 4 * CHUNK, seed=9))
        LMCacheEngineBuilder.destroy("child")
        print("stored")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONHASHSEED": "77"})
    assert out.returncode == 0 and "stored" in out.stdout, out.stderr
    engine = build(disk_config(path), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(4 * CHUNK, seed=9)
    assert engine.lookup(toks) == 4 * CHUNK
    src = paged_kwargs(g, 4 * CHUNK, seed=9)
    dst = paged_kwargs(g, 4 * CHUNK, seed=9, zero=True)
    assert bool(engine.retrieve(toks, **dst).all())
    assert_paged_equal(src, dst, src["slot_mapping"])


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "zero-length", "delete"])
def test_damaged_disk_chunk_is_a_miss_and_the_rest_loads(build, tmp_path, damage):
    g = Geometry()
    path = tmp_path / "d"
    config = disk_config(path)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks, other = tokens(4 * CHUNK, seed=10), tokens(2 * CHUNK, seed=11)
    src = paged_kwargs(g, 4 * CHUNK, seed=10)
    engine.store(toks, **src)
    engine.store(other, **src)
    LMCacheEngineBuilder.destroy(engine.engine_id)

    keys = [k for _, _, k in engine.token_database.process_tokens(toks)]
    [victim] = [f for f in path.iterdir() if f.name.startswith(keys[2].to_string())]
    data = victim.read_bytes()
    if damage == "corrupt":
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 0x40]) + data[-99:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "zero-length":
        victim.write_bytes(b"")
    else:
        victim.unlink()

    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    dst = paged_kwargs(g, 4 * CHUNK, seed=10, zero=True)
    ret = engine.retrieve(toks, **dst)
    assert ret.tolist() == [True] * (2 * CHUNK) + [False] * (2 * CHUNK)
    assert_paged_equal(src, dst, src["slot_mapping"][: 2 * CHUNK])
    third = src["slot_mapping"][2 * CHUNK: 3 * CHUNK]
    assert all(not slots_of(layer, third).any() for layer in dst["kvcaches"])
    assert engine.lookup(toks) == 2 * CHUNK  # the bad chunk is forgotten
    dst = paged_kwargs(g, 2 * CHUNK, seed=10, zero=True)
    assert bool(engine.retrieve(other, **dst).all())


def test_concurrent_store_retrieve_lookup(build, tmp_path):
    g = Geometry(num_blocks=64)
    config = make_config(local_disk=str(tmp_path / "d"), max_local_disk_size=0.01)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(8):
                toks = tokens(3 * CHUNK, seed=1000 * i + j % 3)
                src = paged_kwargs(g, 3 * CHUNK, seed=i)
                engine.store(toks, **src)
                assert engine.lookup(toks) in (0, CHUNK, 2 * CHUNK, 3 * CHUNK)
                dst = paged_kwargs(g, 3 * CHUNK, seed=i, zero=True)
                ret = engine.retrieve(toks, **dst)
                n = int(ret.sum())
                assert_paged_equal(src, dst, src["slot_mapping"][:n])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def lmcache_chunks_stored(self, tier, keys, num_bytes):
        self.calls.append(("stored", {"tier": tier, "n": len(keys), "bytes": num_bytes}))

    @hookimpl
    def lmcache_chunks_retrieved(self, tier, keys):
        self.calls.append(("retrieved", {"tier": tier, "n": len(keys)}))

    @hookimpl
    def lmcache_chunks_evicted(self, tier, keys):
        self.calls.append(("evicted", {"tier": tier, "n": len(keys)}))

    @hookimpl
    def lmcache_lookup_finished(self, num_tokens, hit_tokens):
        self.calls.append(("lookup", {"tokens": num_tokens, "hit": hit_tokens}))

    @hookimpl
    def lmcache_engine_started(self, engine_id):
        self.calls.append(("started", {"id": engine_id}))

    @hookimpl
    def lmcache_engine_closing(self, engine_id):
        self.calls.append(("closing", {"id": engine_id}))


def test_hooks_observe_the_engine(build, tmp_path):
    recorder = _Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="test-recorder")
    try:
        g = Geometry()
        chunk_bytes = 2 * g.num_layers * CHUNK * g.hidden * 2
        config = make_config(max_local_cpu_size=2 * chunk_bytes / 1024**3,
                             local_disk=str(tmp_path / "d"), max_local_disk_size=0.01)
        engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g), "hooked")
        toks = tokens(3 * CHUNK)
        engine.store(toks, **paged_kwargs(g, 3 * CHUNK))
        engine.storage_manager.flush()
        # the CPU tier kept the prompt's first chunk and made room with its second, which
        # the disk tier holds too (issue 11: a prompt never evicts its own prefix)
        second = torch.arange(2 * CHUNK) >= CHUNK
        engine.retrieve(toks[:2 * CHUNK], second, **paged_kwargs(g, 2 * CHUNK, zero=True))
        LMCacheEngineBuilder.destroy("hooked")
    finally:
        pm.unregister(name="test-recorder")
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "started" and kinds[-1] == "closing"
    stored = [c[1] for c in recorder.calls if c[0] == "stored"]
    assert {"tier": "local_cpu", "n": 3, "bytes": 3 * chunk_bytes} in stored
    assert sum(s["n"] for s in stored if s["tier"] == "local_cpu") == 3  # reported once
    assert sum(s["n"] for s in stored if s["tier"] == "local_disk") == 3
    assert ("evicted", {"tier": "local_cpu", "n": 1}) in recorder.calls
    assert ("retrieved", {"tier": "local_disk", "n": 1}) in recorder.calls
    assert ("lookup", {"tokens": CHUNK, "hit": CHUNK}) in recorder.calls


class _FailingDisk:
    """Wraps a tier so that reads fail like a dying disk."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_blocking(self, key):
        raise OSError(5, "Input/output error")

    def submit_prefetch_task(self, key):  # reads ahead fail the same way
        from concurrent.futures import Future

        future = Future()
        future.set_exception(OSError(5, "Input/output error"))
        return future


@pytest.mark.parametrize("error_handling", [True, False])
def test_error_handling(build, tmp_path, error_handling, caplog):
    g = Geometry()
    config = disk_config(tmp_path / "d", error_handling=error_handling)
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(2 * CHUNK)
    engine.store(toks, **paged_kwargs(g, 2 * CHUNK))
    manager = engine.storage_manager
    manager.flush()
    manager.tiers["local_disk"] = _FailingDisk(manager.tiers["local_disk"])
    dst = paged_kwargs(g, 2 * CHUNK, zero=True)
    if error_handling:
        assert not engine.retrieve(toks, **dst).any()
        assert not engine.retrieve(toks, **dst).any()
        assert sum("failed to get" in r.message for r in caplog.records) == 1  # once
    else:
        with pytest.raises(StorageFault, match="Input/output error"):
            engine.retrieve(toks, **dst)
    manager.tiers["local_disk"] = manager.tiers["local_disk"].inner


def test_builder_reuses_and_refuses_changed_config(build):
    g = Geometry()
    config, meta = make_config(), metadata(g)
    a = build(config, meta, CONNECTORS["paged_v2_stacked"](g), "same")
    assert LMCacheEngineBuilder.get("same") is a
    assert LMCacheEngineBuilder.get_or_create("same", make_config(), meta, None) is a
    with pytest.raises(ValueError, match="different configuration"):
        LMCacheEngineBuilder.get_or_create("same", make_config(chunk_size=32), meta, None)
    with pytest.raises(ValueError, match="different metadata"):
        LMCacheEngineBuilder.get_or_create("same", config, metadata(g, "other"), None)
    assert LMCacheEngineBuilder.get("missing") is None


def test_engine_from_the_seed_defaults_is_a_local_cache(build):
    g = Geometry()
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.01)
    engine = build(config, metadata(g), None)
    assert config.remote_url == "lm://localhost:65432"
    assert "local_cpu" in engine.storage_manager.tiers
    engine.gpu_connector = VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers)
    toks = tokens(2 * CHUNK)
    engine.store(toks, **paged_kwargs(g, 2 * CHUNK))
    assert engine.lookup(toks) == 2 * CHUNK


def test_components_come_from_the_configuration(build):
    g = Geometry()
    config = make_config(gpu_connector="vllm_paged_v2",
                         token_database={"name": "chunked", "salt": "tenant-a"})
    engine = build(config, metadata(g), None)
    assert isinstance(engine.gpu_connector, VLLMPagedMemGPUConnectorV2)
    other = build(make_config(gpu_connector="vllm_paged_v2"), metadata(g), None)
    toks = tokens(CHUNK)
    engine.store(toks, **paged_kwargs(g, CHUNK))
    assert engine.lookup(toks) == CHUNK
    keys_a = [k for _, _, k in engine.token_database.process_tokens(toks)]
    keys_b = [k for _, _, k in other.token_database.process_tokens(toks)]
    assert keys_a != keys_b  # tenants never share chunks


def test_per_request_salt(build):
    g = Geometry()
    engine = build(make_config(), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(CHUNK)
    engine.store(toks, cache_salt="alice", **paged_kwargs(g, CHUNK))
    assert engine.lookup(toks) == 0
    assert engine.lookup(toks, cache_salt="bob") == 0
    assert engine.lookup(toks, cache_salt="alice") == CHUNK
    dst = paged_kwargs(g, CHUNK, zero=True)
    assert not engine.retrieve(toks, cache_salt="bob", **dst).any()
    assert engine.retrieve(toks, cache_salt="alice", **dst).all()


@pytest.mark.parametrize("stacked", [True, False])
def test_whole_page_chunks_round_trip(build, stacked):
    """vLLM's usual case: chunks of whole pages (in any page order) take the page path."""
    from lmcache.builtin.connectors._cpu_moves import whole_blocks as _whole_blocks

    g = Geometry()
    n = 4 * CHUNK  # CHUNK == block_size: every chunk is one whole page
    pages = torch.randperm(g.num_blocks, generator=torch.Generator().manual_seed(3))[: n // 16]
    slots = pages.repeat_interleave(16) * 16 + torch.arange(16).repeat(len(pages))
    assert _whole_blocks(slots[:CHUNK], g.block_size) is not None
    assert _whole_blocks(slots[1:CHUNK + 1], g.block_size) is None
    engine = build(make_config(), metadata(g), CONNECTORS["paged_v2_stacked"](g))
    toks = tokens(n)
    src = {"kvcaches": paged_cache(g, seed=12, stacked=stacked), "slot_mapping": slots}
    engine.store(toks, **src)
    dst = {"kvcaches": paged_cache(g, seed=12, stacked=stacked, zero=True),
           "slot_mapping": slots}
    assert bool(engine.retrieve(toks, **dst).all())
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        a_kv = a if isinstance(a, torch.Tensor) else torch.stack(a)
        b_kv = b if isinstance(b, torch.Tensor) else torch.stack(b)
        assert torch.equal(a_kv[:, pages], b_kv[:, pages])  # the pages, bit-exact
        others = torch.ones(g.num_blocks, dtype=torch.bool)
        others[pages] = False
        assert not b_kv[:, others].any()  # nothing else written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("allocator", ["pinned", "mixed"])
def test_cuda_paged_cache_through_pinned_memory(build, tmp_path, allocator):
    g = Geometry()
    config = make_config(allocator=allocator, local_disk=str(tmp_path / "d"),
                         max_local_disk_size=0.01, gpu_connector={"name": "vllm_paged_v2",
                                                                  "use_gpu": True})
    engine = build(config, metadata(g), None)
    n = 3 * CHUNK + 7
    toks = tokens(n)
    src = paged_kwargs(g, n, seed=21)
    src = {"kvcaches": [t.cuda() for t in src["kvcaches"]],
           "slot_mapping": src["slot_mapping"].cuda()}
    engine.store(toks, **src)
    engine.storage_manager.flush()
    dst = {"kvcaches": [torch.zeros_like(t) for t in src["kvcaches"]],
           "slot_mapping": src["slot_mapping"]}
    assert bool(engine.retrieve(toks, **dst).all())
    for a, b in zip(src["kvcaches"], dst["kvcaches"]):
        assert torch.equal(slots_of(a, src["slot_mapping"]), slots_of(b, src["slot_mapping"]))


@pytest.mark.parametrize("where", ["file-in-the-way", "under-a-file"])
def test_unusable_disk_path_is_a_clear_error(tmp_path, where):
    g = Geometry()
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    path = blocker if where == "file-in-the-way" else blocker / "cache"
    config = disk_config(path)
    with pytest.raises(ValueError, match=r"cannot start storage tier 'local_disk' \(path="):
        LMCacheEngineBuilder.get_or_create(f"bad-{where}", config, metadata(g), None)
    assert LMCacheEngineBuilder.get(f"bad-{where}") is None
