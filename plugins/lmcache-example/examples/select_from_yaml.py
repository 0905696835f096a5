"""Select the backend by its entry-point name in YAML, then store and retrieve a prompt's
KV through a real engine. Run it after installing the package: ``python
examples/select_from_yaml.py``; it prints what it stored and found."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata

# --8<-- [start:yaml]
CONFIG = """
chunk_size: 16
local_cpu: false
max_local_cpu_size: 0.01        # GB: the memory allocator's region
allocator: {name: host}
gpu_connector: {name: vllm_nested_tuple}
storage_backends:
  - {name: example.inmemory, max_entries: 1000}
"""
# --8<-- [end:yaml]


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "lmcache.yaml"
    path.write_text(CONFIG)
    config = LMCacheEngineConfig.from_file(str(path))
    layers, heads, head_size, tokens = 2, 2, 8, 48
    meta = LMCacheEngineMetadata("org/model", 1, 0, "vllm", torch.float16,
                                 (layers, 2, config.chunk_size, heads, head_size))
    engine = LMCacheEngineBuilder.get_or_create("example", config, meta, None)
    try:
        prompt = torch.arange(tokens)
        kv = [torch.randn(2, tokens, heads, head_size).to(torch.float16) for _ in range(layers)]
        engine.store(prompt, kvcaches=kv)
        # tiers below the CPU write on their own threads: wait for them before looking
        # (a serving engine does not; a chunk becomes visible when its write is done)
        engine.storage_manager.flush()
        found = engine.lookup(prompt)
        out = [torch.zeros_like(layer) for layer in kv]
        hit = engine.retrieve(prompt, kvcaches=out)
        assert found == tokens and bool(hit.all()), (found, hit)
        assert all(torch.equal(a, b) for a, b in zip(kv, out)), "retrieved KV differs"
        print(f"stored and retrieved {tokens} tokens through "
              f"{config.storage_backend_specs()[0].name}")
    finally:
        LMCacheEngineBuilder.destroy("example")


if __name__ == "__main__":
    main()
