"""Unit tests of the vLLM integration's configuration and scheduler lookup channel."""

from __future__ import annotations

import os
import socket
import struct
import uuid

import pytest
import torch

from lmcache.experimental.config import ConfigError, LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMCPUBlockConnector
from lmcache.experimental.memory_management import HostMemoryAllocator
from lmcache.experimental.token_database import ChunkedTokenDatabase
from lmcache.integration.vllm import lookup
from lmcache.integration.vllm.vllm_v1_adapter import DEFAULT_DISK_DIR, load_config


def test_embedded_default_is_cpu_plus_disk_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config({})
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu", "local_disk"]
    assert config.local_disk == str(tmp_path / DEFAULT_DISK_DIR)
    assert config.remote_url is None


def test_environment_overrides_the_default(tmp_path):
    config = load_config({"LMCACHE_CHUNK_SIZE": "512", "LMCACHE_LOCAL_DISK": "None"})
    assert config.chunk_size == 512 and config.local_disk is None
    config = load_config({"LMCACHE_STORAGE_BACKENDS": "[{name: local_cpu}]"})
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu"]


def test_variables_alone_add_no_disk_tier(tmp_path, monkeypatch):
    # the published examples set a few LMCACHE_* variables: they get from_env's
    # semantics, not the embedded default's disk tier (issue 12)
    monkeypatch.chdir(tmp_path)
    config = load_config({"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_CPU": "True",
                          "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",
                          "LMCACHE_USE_EXPERIMENTAL": "True"})
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu"]
    assert config.local_disk is None and not (tmp_path / DEFAULT_DISK_DIR).exists()


def test_config_file(tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text(f"chunk_size: 128\nlocal_disk: {tmp_path / 'd'}\nmax_local_disk_size: 1\n")
    config = load_config({"LMCACHE_CONFIG_FILE": str(path), "LMCACHE_CHUNK_SIZE": "384"})
    assert config.chunk_size == 384 and config.local_disk == str(tmp_path / "d")
    assert "LMCACHE_CONFIG_FILE" not in os.environ  # the caller's environment is kept


def test_bad_environment_names_the_variable():
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SIZE"):
        load_config({"LMCACHE_CHUNK_SIZE": "many"})


@pytest.fixture
def engine(tmp_path):
    from lmcache.experimental.cache_engine import LMCacheEngine

    config = LMCacheEngineConfig(chunk_size=16, local_cpu=True, max_local_cpu_size=0.01)
    metadata = LMCacheEngineMetadata("m", 1, 0, "vllm", torch.float32, (1, 2, 16, 1, 4))
    allocator = HostMemoryAllocator(4 << 20)
    connector = VLLMCPUBlockConnector(1, 1, 4, block_size=16)
    eng = LMCacheEngine(config, metadata, allocator, ChunkedTokenDatabase(config, metadata),
                        connector)
    cache = torch.randn(8, 1, 16, 8)
    tokens = torch.arange(40)
    eng.store(tokens, kvcaches=[cache], slot_mapping=torch.arange(40))
    eng.store(tokens, kvcaches=[cache], slot_mapping=torch.arange(40), cache_salt="t1")
    yield eng
    eng.close()


def test_lookup_over_the_socket_and_in_process(engine):
    instance = f"test-{uuid.uuid4().hex[:8]}"
    server = lookup.LookupServer(instance, engine)
    client = lookup.LookupClient(instance, timeout_s=5)
    try:
        assert client.lookup(list(range(40)), None) == 40  # in process
        with lookup._local_lock:
            del lookup._local_engines[instance]  # as seen from another process
        assert client.lookup(list(range(40)), None) == 40
        assert client.lookup(list(range(33)) + [99] * 7, None) == 32
        assert client.lookup(list(range(40)), "t1") == 40
        assert client.lookup(list(range(40)), "t2") == 0  # another tenant
        # a malformed request costs a miss, not the server
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(lookup.socket_path(instance))
            raw.sendall(struct.pack("<Q", 3) + b"bad")
            assert struct.unpack("<q", lookup._recv(raw)) == (0,)
        assert client.lookup(list(range(16)), None) == 16
    finally:
        client.close()
        server.close()
    assert not os.path.exists(lookup.socket_path(instance))
    # nobody listening: a miss, at once
    assert lookup.LookupClient(instance, timeout_s=1).lookup(list(range(40)), None) == 0


# --- the connector without a vLLM process: both KV layouts, scheduler and worker ---------

from types import SimpleNamespace  # noqa: E402

from lmcache.experimental.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import (  # noqa: E402
    LMCacheConnectorMetadata,
    LMCacheConnectorV1Impl,
    LoadSpec,
    RequestMeta,
)

BLOCK = 16


def _vllm_config(block_size: int) -> SimpleNamespace:
    return SimpleNamespace(
        instance_id=f"unit-{uuid.uuid4().hex[:8]}",
        cache_config=SimpleNamespace(block_size=block_size),
        model_config=SimpleNamespace(model="unit/model"),
        kv_transfer_config=SimpleNamespace(kv_role="kv_both", kv_load_failure_policy="fail",
                                           kv_connector_extra_config={}))


def _caches(layout: str, seed: int, zero: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (12, 2, BLOCK, 16) if layout == "cpu" else (2, 12, BLOCK, 2, 8)
    make = (lambda: torch.zeros(shape)) if zero else (lambda: torch.randn(shape, generator=gen))
    device = "cuda" if layout == "flash-cuda" else "cpu"
    return {f"model.layers.{i}.self_attn": make().to(device) for i in range(3)}


def _block_equal(a: dict, b: dict, layout: str, block_a: int, block_b: int) -> bool:
    for x, y in zip(a.values(), b.values()):
        xa = x[block_a] if layout == "cpu" else x[:, block_a]
        yb = y[block_b] if layout == "cpu" else y[:, block_b]
        if not torch.equal(xa, yb):
            return False
    return True


@pytest.mark.parametrize("layout", [
    "cpu", "flash",
    pytest.param("flash-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_worker_stores_and_loads_both_layouts(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "32")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", str(tmp_path / "disk"))
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "1")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.05")
    vcfg = _vllm_config(BLOCK)
    worker = LMCacheConnectorV1Impl(vcfg, SimpleNamespace(name="WORKER"), parent=None)
    scheduler = LMCacheConnectorV1Impl(vcfg, SimpleNamespace(name="SCHEDULER"), None)
    try:
        assert vcfg.kv_transfer_config.kv_load_failure_policy == "recompute"
        src = _caches(layout, 1)
        worker.register_kv_caches(src)
        expected = "VLLMCPUBlockConnector" if layout == "cpu" else "VLLMPagedMemGPUConnectorV2"
        assert type(worker.engine.gpu_connector).__name__ == expected
        tokens = list(range(100, 170))  # 70 tokens: 2 chunks of 32 and 6 more
        blocks = [3, 7, 1, 9, 0]
        worker.bind_connector_metadata(LMCacheConnectorMetadata([RequestMeta(
            "r1", tokens, blocks, None, save_skip=0, save_end=70)]))
        worker.wait_for_save()
        request = SimpleNamespace(request_id="r2", prompt_token_ids=tokens, cache_salt=None)
        assert scheduler.get_num_new_matched_tokens(request, 0) == 69  # never all of it
        # a longer prompt: the partial last chunk [64, 70) is a different chunk there
        request.prompt_token_ids = tokens + [1, 2, 3]
        assert scheduler.get_num_new_matched_tokens(request, 0) == 64
        assert scheduler.get_num_new_matched_tokens(request, 32) == 32
        assert scheduler.get_num_new_matched_tokens(request, 64) == 0

        # load into another cache, vLLM holding the first block (16 tokens) itself
        dst = _caches(layout, 2, zero=True)
        worker._kvcaches = list(dst.values())
        target = [5, 2, 11, 4, 6]
        worker.bind_connector_metadata(LMCacheConnectorMetadata([RequestMeta(
            "r2", tokens, target, None, load=LoadSpec(16, 70, 54))]))
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == set()
        assert not any(t.any() for t in (c[5] if layout == "cpu" else c[:, 5]
                                         for c in dst.values()))  # vLLM's block: untouched
        for src_block, dst_block in list(zip(blocks, target))[1:4]:
            assert _block_equal(src, dst, layout, src_block, dst_block)

        # a chunk that is gone: its blocks are reported, nothing raises
        key = [k for _, _, k in worker.engine.token_database.process_tokens(
            torch.tensor(tokens))][1]
        for tier in worker.engine.storage_manager.tiers.values():
            tier.remove(key)
        worker.bind_connector_metadata(LMCacheConnectorMetadata([RequestMeta(
            "r3", tokens, target, None, load=LoadSpec(0, 70, 69), save_end=70)]))
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == {11, 4, 6}
        worker.wait_for_save()  # the failed request is not stored in that step
        assert not worker.engine.storage_manager.contains(key)
        # the published examples' clean-up names the engine by ENGINE_NAME
        from lmcache.integration.vllm.utils import ENGINE_NAME

        assert LMCacheEngineBuilder.get(ENGINE_NAME) is worker.engine
    finally:
        scheduler.shutdown()
        worker.shutdown()
    assert LMCacheEngineBuilder.get(f"vllm-{vcfg.instance_id}-rank0") is None
    assert LMCacheEngineBuilder.get(ENGINE_NAME) is None


def test_a_connector_that_misreads_the_live_cache_stops_vllm_at_start(monkeypatch, tmp_path):
    # every shape check passes (chunk 32 is a multiple of 8); only the round trip through
    # the live cache shows that this connector's pages are not vLLM's blocks
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "32")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", "None")
    monkeypatch.setenv("LMCACHE_GPU_CONNECTOR",
                       "{name: vllm_cpu_blocks, block_size: 8}")
    vcfg = _vllm_config(BLOCK)
    worker = LMCacheConnectorV1Impl(vcfg, SimpleNamespace(name="WORKER"), parent=None)
    caches = _caches("cpu", 3)
    before = {k: v.clone() for k, v in caches.items()}
    try:
        from lmcache.integration.vllm.layout_check import LayoutMismatch

        with pytest.raises(LayoutMismatch,
                           match="refuses vLLM.*could not read block 11.*block_size 16"):
            worker.register_kv_caches(caches)
        assert worker.engine is None
        assert all(torch.equal(caches[k], before[k]) for k in caches)
        # the escape hatch for a connector that cannot take part
        vcfg.kv_transfer_config.kv_connector_extra_config = {"layout_check": False}
        worker.register_kv_caches(caches)
        assert worker.engine is not None
    finally:
        worker.shutdown()


# -- what makes a request's KV other than its tokens (issue 13) --------------------------------


def _request(**fields) -> SimpleNamespace:
    base = dict(request_id="r", prompt_token_ids=list(range(64)), cache_salt=None,
                lora_request=None, mm_features=[], prompt_embeds=None)
    return SimpleNamespace(**{**base, **fields})


def _adapter(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return SimpleNamespace(lora_name="tenant-a", lora_int_id=1, lora_path=str(path))


def test_a_plain_request_keeps_its_cache_salt():
    from lmcache.integration.vllm.vllm_v1_adapter import request_salt

    assert request_salt(_request()) is None
    assert request_salt(_request(cache_salt="alice")) == "alice"


def test_every_input_that_changes_the_kv_changes_the_salt(tmp_path):
    import os

    from lmcache.integration.vllm.vllm_v1_adapter import request_salt

    a = _adapter(tmp_path / "a", b"weights-1")
    b = _adapter(tmp_path / "b", b"weights-2")
    feature = SimpleNamespace(identifier="img-1", mm_position=SimpleNamespace(offset=3,
                                                                             length=16))
    salts = {
        "plain": request_salt(_request()),
        "lora a": request_salt(_request(lora_request=a)),
        "lora b (same name, other weights)": request_salt(_request(lora_request=b)),
        "image": request_salt(_request(mm_features=[feature])),
        "image elsewhere": request_salt(_request(mm_features=[SimpleNamespace(
            identifier="img-1", mm_position=SimpleNamespace(offset=9, length=16))])),
        "embeds": request_salt(_request(prompt_embeds=torch.ones(64, 8))),
        "other embeds": request_salt(_request(prompt_embeds=torch.zeros(64, 8))),
        "salted lora a": request_salt(_request(lora_request=a, cache_salt="alice")),
    }
    assert len(set(salts.values())) == len(salts), salts
    assert request_salt(_request(lora_request=a)) == salts["lora a"]  # stable
    # the adapter reloaded in place with other weights: another salt
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"weights-3")
    os.utime(tmp_path / "a" / "adapter_model.safetensors", ns=(1, 1))
    assert request_salt(_request(lora_request=a)) != salts["lora a"]


# -- tensor and pipeline parallelism (issue 13) ------------------------------------------------


def test_the_budgets_are_the_instances_shared_by_its_workers():
    from lmcache.integration.vllm.vllm_v1_adapter import parallel_rank, per_worker_budget

    config = LMCacheEngineConfig(local_cpu=True, max_local_cpu_size=4.0,
                                 local_disk="/tmp/x", max_local_disk_size=10.0)
    share = per_worker_budget(config, 4)
    assert (share.max_local_cpu_size, share.max_local_disk_size) == (1.0, 2.5)
    assert [s.options.get("max_size_gb") for s in share.storage_backend_specs()] == [1.0, 2.5]
    assert (config.max_local_cpu_size, config.max_local_disk_size) == (4.0, 10.0)  # kept
    explicit = LMCacheEngineConfig(storage_backends=[
        {"name": "local_cpu", "max_size_gb": 3}, {"name": "local_disk", "path": "/tmp/y",
                                                  "max_size_gb": 9},
        {"name": "redis", "url": "redis://127.0.0.1:1"}])
    share = per_worker_budget(explicit, 3)
    assert [(s.name, s.options.get("max_size_gb")) for s in share.storage_backends] == [
        ("local_cpu", 1.0), ("local_disk", 3.0), ("redis", None)]
    assert share.storage_backends[1].options["path"] == "/tmp/y"
    assert parallel_rank() == (0, 1)  # no vLLM parallel state here: one worker


def test_each_worker_of_a_pipeline_and_tensor_parallel_instance_has_its_own_rank(monkeypatch):
    pytest.importorskip("vllm")
    import vllm.distributed.parallel_state as ps

    from lmcache.integration.vllm.vllm_v1_adapter import parallel_rank

    seen = set()
    for pp_rank in range(2):
        for tp_rank in range(3):
            monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda r=tp_rank: r)
            monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 3)
            monkeypatch.setattr(ps, "get_pp_group", lambda r=pp_rank: SimpleNamespace(
                rank_in_group=r, world_size=2))
            rank, world = parallel_rank()
            assert world == 6
            seen.add(rank)
            # MLA: the ranks of one stage hold the same latent KV and name it alike
            assert parallel_rank(across_tensor_parallel=False) == (pp_rank, 2)
    assert seen == set(range(6))  # no two workers name their chunks alike


# -- which models the connector serves (issue 13) ---------------------------------------------


def test_models_with_state_other_than_attention_kv_are_refused_naming_their_layers():
    transformers = pytest.importorskip("transformers")
    from lmcache.integration.vllm.vllm_v1_adapter import check_model_kind, model_layer_kinds

    jamba = transformers.JambaConfig(num_hidden_layers=4, attn_layer_period=2,
                                     attn_layer_offset=1, num_experts=1)
    model = SimpleNamespace(model="tiny/jamba", hf_config=jamba, hf_text_config=jamba,
                            is_hybrid=True)
    # (this transformers names Jamba's Mamba layers linear_attention in layer_types)
    kinds = model_layer_kinds(model)
    assert set(kinds) in ({"mamba", "attention"}, {"linear_attention", "full_attention"})
    assert sorted(kinds.values()) == [2, 2]
    with pytest.raises(ValueError, match="tiny/jamba: its layers are 2 .*, 2 "):
        check_model_kind(model)
    qwen3_next = SimpleNamespace(layer_types=["linear_attention"] * 3 + ["full_attention"])
    with pytest.raises(ValueError, match="3 linear_attention, 1 full_attention"):
        check_model_kind(SimpleNamespace(model="q", hf_text_config=qwen3_next))
    with pytest.raises(ValueError, match="its layers are not listed"):
        check_model_kind(SimpleNamespace(model="h", hf_text_config=None, is_hybrid=True))
    # attention of every kind is served (sliding windows keep full KV under the connector)
    gemma = transformers.Gemma2Config(num_hidden_layers=4)
    check_model_kind(SimpleNamespace(model="g", hf_config=gemma, hf_text_config=gemma,
                                     is_hybrid=False))
    check_model_kind(SimpleNamespace(model="plain"))


# -- KV events (issue 13) --------------------------------------------------------------------


def test_stored_chunks_become_kv_events_once_each(monkeypatch):
    from lmcache.integration.vllm.vllm_v1_adapter import external_block_hash

    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "32")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", "None")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.05")
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "0")  # vLLM: 1 by default
    vcfg = _vllm_config(BLOCK)
    vcfg.kv_events_config = SimpleNamespace(enable_kv_cache_events=True)
    worker = LMCacheConnectorV1Impl(vcfg, SimpleNamespace(name="WORKER"), parent=None)
    try:
        worker.register_kv_caches(_caches("cpu", 5))
        tokens = list(range(300, 370))  # two whole chunks and 6 tokens

        def store(req_id, save_skip=0, salt=None, lora=None):
            worker.bind_connector_metadata(LMCacheConnectorMetadata([RequestMeta(
                req_id, tokens, [3, 7, 1, 9, 0], salt, save_skip=save_skip, save_end=70,
                lora=lora)]))
            worker.wait_for_save()
            return worker.get_kv_events()

        events = store("r1")
        keys = [k for _, _, k in worker.engine.token_database.process_tokens(
            torch.tensor(tokens))]
        hashes = [external_block_hash(k.chunk_hash) for k in keys]
        assert [e.block_hashes for e in events] == [[hashes[0]], [hashes[1]]]
        assert [e.parent_block_hash for e in events] == [None, hashes[0]]
        assert [e.token_ids for e in events] == [tokens[:32], tokens[32:64]]
        assert {(e.block_size, e.medium, e.lora_name) for e in events} == {
            (32, "local_cpu", None)}
        assert isinstance(hashes[0], bytes) and len(hashes[0]) == 32
        assert store("r2") == []  # already stored: no new event
        assert worker.get_kv_events() == []
        lora = store("r3", salt="lmcache-request/v1[\"x\"]", lora=("alpha", 1))
        assert [(e.lora_name, e.lora_id) for e in lora] == [("alpha", 1)] * 2
        assert lora[0].block_hashes != events[0].block_hashes  # another chunk, another hash
        monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
        as_int = external_block_hash(keys[0].chunk_hash)
        assert isinstance(as_int, int) and 0 <= as_int < 1 << 64
    finally:
        worker.shutdown()


def test_no_kv_events_unless_vllm_asks_for_them(monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "32")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", "None")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.05")
    worker = LMCacheConnectorV1Impl(_vllm_config(BLOCK), SimpleNamespace(name="WORKER"), None)
    try:
        worker.register_kv_caches(_caches("cpu", 6))
        worker.bind_connector_metadata(LMCacheConnectorMetadata([RequestMeta(
            "r", list(range(64)), [1, 2, 3, 4], None, save_end=64)]))
        worker.wait_for_save()
        assert worker.engine.lookup(torch.arange(64)) == 64 and worker.get_kv_events() == []
    finally:
        worker.shutdown()
