"""A third-party plugin installed with pip, selected by name from YAML, used for real."""

from __future__ import annotations

import importlib.metadata as md

import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.token_database import ChunkedTokenDatabase


def test_example_plugin_is_installed_as_its_own_distribution(plugin_registry):
    dist = md.distribution("lmcache-example")
    assert any(ep.name == "example.inmemory" and ep.group == "lmcache.storage_backends"
               for ep in dist.entry_points)
    entry = plugin_registry.entry("storage_backend", "example.inmemory")
    assert entry.dist_name == "lmcache-example" and not entry.first_party


def test_select_example_backend_from_yaml_and_round_trip(tmp_path, plugin_registry):
    path = tmp_path / "config.yaml"
    path.write_text("chunk_size: 16\nstorage_backends:\n  - {name: example.inmemory, "
                    "max_entries: 2}\n")
    config = LMCacheEngineConfig.from_file(str(path))
    meta = LMCacheEngineMetadata("org/model", 1, 0, "vllm", torch.float16, (2, 2, 16, 2, 8))
    allocator = HostMemoryAllocator(1 << 20)
    [spec] = config.storage_backend_specs()
    backend = plugin_registry.create("storage_backend", spec.name, spec.options, config, meta,
                                     TierContext(tier_name=spec.name, memory_allocator=allocator))
    keys = [k for _, _, k in ChunkedTokenDatabase(config, meta).process_tokens(torch.arange(48))]

    for i, key in enumerate(keys):
        obj = allocator.allocate((2, 2, 16, 16), torch.float16, MemoryFormat.KV_BLOB)
        obj.tensor.copy_(torch.full((2, 2, 16, 16), float(i)))
        backend.submit_put_task(key, obj).result()
        obj.ref_count_down()
    # max_entries: 2 came from YAML: the oldest chunk was evicted
    assert [backend.contains(k) for k in keys] == [False, True, True]
    got = backend.get_blocking(keys[2])
    assert got.get_memory_format() == MemoryFormat.KV_BLOB
    assert torch.equal(got.tensor, torch.full((2, 2, 16, 16), 2.0, dtype=torch.float16))
    got.ref_count_down()
    backend.close()
    assert allocator.num_active_allocations == 0
