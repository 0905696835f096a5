"""One serving instance in its own process, for the "two instances, one cache" test.

    python -m tests.integration.remote_instance store|load CONFIG_JSON

``store`` stores the KV of a fixed prompt (made from fixed seeds) and flushes every tier;
``load`` builds a fresh engine on the same configuration, retrieves the prompt and checks
the KV bit for bit against what the seeds make. Prints one JSON line with the outcome.
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

NUM_TOKENS = 4 * CHUNK + 3
SEED = 21


def main(role: str, config_json: str) -> dict:
    g = Geometry()
    config = LMCacheEngineConfig(**json.loads(config_json))
    engine = LMCacheEngineBuilder.get_or_create(
        f"instance-{role}", config, metadata(g),
        VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
    toks = tokens(NUM_TOKENS, seed=SEED)
    src = paged_kwargs(g, NUM_TOKENS, seed=SEED)
    try:
        if role == "store":
            engine.store(toks, **src)
            engine.storage_manager.flush()
            stats = {n: vars(t.stats) for n, t in engine.storage_manager.tiers.items()
                     if hasattr(t, "stats")}
            return {"role": role, "stats": stats}
        hit = engine.lookup(toks)
        dst = paged_kwargs(g, NUM_TOKENS, seed=SEED, zero=True)
        mask = engine.retrieve(toks, **dst)
        slots = src["slot_mapping"]
        exact = all(torch.equal(slots_of(a, slots), slots_of(b, slots))
                    for a, b in zip(src["kvcaches"], dst["kvcaches"]))
        return {"role": role, "lookup": hit, "loaded": int(mask.sum()), "exact": exact}
    finally:
        LMCacheEngineBuilder.destroy(f"instance-{role}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
