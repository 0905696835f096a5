"""Getting started: store, look up and load KV through the engine (run by the tests)."""

import tempfile

import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata

cache_dir = tempfile.mkdtemp()
# a small model's geometry: 4 layers, 2 KV heads of 64, vLLM's GPU layout, 16-token blocks
layers, heads, head_size, block_size, num_blocks = 4, 2, 64, 16, 64
tokens = torch.randint(0, 32000, (600,))
slot_mapping = torch.randperm(num_blocks)[:38].repeat_interleave(block_size) * block_size \
    + torch.arange(block_size).repeat(38)
slot_mapping = slot_mapping[:600]
kvcaches = [torch.randn(2, num_blocks, block_size, heads, head_size, dtype=torch.bfloat16)
            for _ in range(layers)]

# --8<-- [start:engine]
config = LMCacheEngineConfig(chunk_size=256, max_local_cpu_size=0.5,
                             local_disk=f"file://{cache_dir}", max_local_disk_size=1,
                             gpu_connector="vllm_paged_v2")
metadata = LMCacheEngineMetadata("my-model", 1, 0, "vllm", torch.bfloat16,
                                 (layers, 2, 256, heads, head_size))
engine = LMCacheEngineBuilder.get_or_create("worker-0", config, metadata, None)

# kvcaches: per layer [2, num_blocks, block_size, heads, head_size]; one slot per token
engine.store(tokens, kvcaches=kvcaches, slot_mapping=slot_mapping)
assert engine.lookup(tokens) == 600              # tokens of the cached prefix

fresh = [torch.zeros_like(layer) for layer in kvcaches]
loaded = engine.retrieve(tokens, kvcaches=fresh, slot_mapping=slot_mapping)  # bool mask
assert loaded.all()
LMCacheEngineBuilder.destroy("worker-0")         # waits for disk writes, frees memory
# --8<-- [end:engine]

for a, b in zip(kvcaches, fresh):
    k, v = a.flatten(1, 2), b.flatten(1, 2)
    assert torch.equal(k[:, slot_mapping], v[:, slot_mapping])

# a new engine (think: a new process) on the same directory finds the chunks on disk
engine = LMCacheEngineBuilder.get_or_create("worker-0", config, metadata, None)
assert engine.lookup(tokens) == 600
LMCacheEngineBuilder.destroy("worker-0")
