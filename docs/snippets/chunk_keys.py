"""Getting started: the chunks and keys of a prompt (run by tests/unit/test_docs.py)."""

import torch

from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.token_database import ChunkedTokenDatabase

# --8<-- [start:keys]
config = LMCacheEngineConfig(chunk_size=256)   # or from_file("lmcache.yaml"), from_env()
metadata = LMCacheEngineMetadata("meta-llama/Llama-3.1-8B", 1, 0, "vllm",
                                 torch.bfloat16, (32, 2, 256, 8, 128))
for start, end, key in ChunkedTokenDatabase(config, metadata).process_tokens(torch.arange(600)):
    print(start, end, key.to_string())  # 0 256 vllm@meta-llama%2FLlama-3%2E1-8B@1@0@<sha256 hex>
# --8<-- [end:keys]

assert [(s, e) for s, e, _ in ChunkedTokenDatabase(config, metadata).process_tokens(
    torch.arange(600))] == [(0, 256), (256, 512), (512, 600)]
