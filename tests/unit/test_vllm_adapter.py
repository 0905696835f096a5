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
