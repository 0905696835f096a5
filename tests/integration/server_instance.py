"""One serving instance in its own process, configured from ``LMCACHE_*`` variables as
vLLM's ``kv_cache_sharing_lmcache_v1.py`` example configures its two instances
(``LMCACHE_REMOTE_URL=lm://...``, ``LMCACHE_REMOTE_SERDE=naive``, ``LMCACHE_LOCAL_CPU=False``,
``LMCACHE_CHUNK_SIZE``):

    python -m tests.integration.server_instance store|load SEED

``store`` stores the KV of a prompt made from ``SEED`` and flushes; ``load`` builds a fresh
engine, looks the prompt up, retrieves it and checks the KV bit for bit. Prints one JSON
line with the outcome.
"""

from __future__ import annotations

import json
import sys

import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from tests.integration.test_engine import CHUNK, metadata, paged_kwargs, tokens
from tests.kvutil import Geometry, slots_of

NUM_TOKENS = 5 * CHUNK + 7


def main(role: str, seed: int) -> dict:
    g = Geometry()
    config = LMCacheEngineConfig.from_env()
    engine = LMCacheEngineBuilder.get_or_create(
        f"instance-{role}", config, metadata(g),
        VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
    toks = tokens(NUM_TOKENS, seed=seed)
    src = paged_kwargs(g, NUM_TOKENS, seed=seed)
    try:
        tiers = sorted(engine.storage_manager.tiers)
        if role == "store":
            engine.store(toks, **src)
            engine.storage_manager.flush()
            stats = {n: vars(t.stats) for n, t in engine.storage_manager.tiers.items()
                     if hasattr(t, "stats")}
            return {"role": role, "tiers": tiers, "stats": stats}
        hit = engine.lookup(toks)
        dst = paged_kwargs(g, NUM_TOKENS, seed=seed, zero=True)
        mask = engine.retrieve(toks, **dst)
        slots = src["slot_mapping"]
        exact = all(torch.equal(slots_of(a, slots), slots_of(b, slots))
                    for a, b in zip(src["kvcaches"], dst["kvcaches"]))
        return {"role": role, "tiers": tiers, "lookup": hit, "loaded": int(mask.sum()),
                "exact": exact}
    finally:
        LMCacheEngineBuilder.destroy(f"instance-{role}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
