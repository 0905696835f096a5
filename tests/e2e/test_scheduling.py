"""What vLLM's scheduler does to requests, with lmcache: preemption, aborts, speculation.

Two vLLM processes with a KV cache of 16 blocks (2048 tokens), chunked prefill of 512
tokens per step and ngram speculative decoding: one without a connector (the baseline),
one with lmcache. Four prompts of 600 tokens decoding 400 tokens each do not fit at once,
so vLLM preempts and resumes requests; every output must still be vLLM's own, and what
lmcache stored meanwhile must be the right KV (a second run loads it and must give the
same outputs). Requests aborted mid-prefill and mid-decode (through the engine, one step
at a time: the engine core runs in the process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
must leave nothing behind: no request tracked by the scheduler side, no memory object
held beyond the chunks the CPU tier keeps, and the prefix stored before the abort loads
as the right KV.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import random_tokens

SMALL_CACHE = {"num_gpu_blocks_override": 16, "max_model_len": 1536,
               "max_num_batched_tokens": 512,
               "speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2}}
ENV = {"LMCACHE_E2E_LLM_ARGS": json.dumps(SMALL_CACHE),
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CROWD = [random_tokens(600, 300 + i) for i in range(4)]  # 4 x (600 + 400) > 2048 tokens
CROWD_TOKENS = 400
LONG = random_tokens(1400, 310)  # three prefill steps of 512
MID = random_tokens(700, 311)
LAST = random_tokens(500, 312)
ABORT_TOKENS = 50


@pytest.fixture(scope="module")
def baseline(tiny_llama, vllm_factory, tmp_path_factory) -> dict:
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("sched-baseline"), lmcache=False,
                        prefix_caching=False, name="sched-baseline", env=ENV)
    result = {"crowd": proc.generate(CROWD, CROWD_TOKENS)["outputs"],
              "abort": proc.generate([LONG, MID, LAST], ABORT_TOKENS)["outputs"]}
    proc.quit()
    return result


@pytest.fixture(scope="module")
def proc(tiny_llama, vllm_factory, tmp_path_factory):
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("sched-lmcache"), lmcache=True,
                        prefix_caching=True, name="sched-lmcache", env=ENV)
    yield proc
    proc.quit()


def _since(proc, marker: int) -> str:
    return proc.log()[marker:]


def test_preempted_requests_get_vllms_outputs_and_store_the_right_kv(proc, baseline):
    marker = len(proc.log())
    assert proc.generate(CROWD, CROWD_TOKENS)["outputs"] == baseline["crowd"]
    log = _since(proc, marker)
    assert "lmcache: vLLM preempted" in log, "the cache was not small enough to preempt"
    assert "resumed after preemption" in log
    # what was stored through the preemptions is the KV of those prompts
    proc.call(op="reset_prefix_cache")
    loads = len(proc.loaded_ranges())
    assert proc.generate(CROWD, CROWD_TOKENS)["outputs"] == baseline["crowd"]
    new = proc.loaded_ranges()[loads:]
    assert len(new) >= len(CROWD) and all(end >= 512 for _, end, _ in new), new


def test_aborted_requests_leave_nothing_behind(proc, baseline):
    marker = len(proc.log())
    reply = proc.call(op="steps", prompts=[LONG, MID, LAST], max_tokens=ABORT_TOKENS,
                      abort={"0": 2, "1": 8})
    log = _since(proc, marker)
    aborted = reply["aborted_at"]
    assert aborted["0"][1] == 0, aborted  # LONG: still in its prefill
    assert 0 < aborted["1"][1] < ABORT_TOKENS, aborted  # MID: decoding
    assert reply["outputs"][:2] == [None, None]
    assert reply["outputs"][2] == baseline["abort"][2]
    assert log.count("finished (FINISHED_ABORTED)") == 2, log[-3000:]
    tracked = [int(n) for n in re.findall(r"; (\d+) request\(s\) tracked", log)]
    assert tracked and tracked[-1] == 0, tracked
    # no memory object outlives its request: what is allocated is what the CPU tier holds
    state = re.findall(r"hot tier: (\d+) chunks, (\d+) bytes; (-?\d+) bytes allocated", log)
    assert state, log[-3000:]
    chunks, held, allocated = map(int, state[-1])
    assert chunks > 0 and allocated == held, state[-1]
    # the prefix LONG stored before its abort is its KV: loaded, and vLLM's output again
    proc.call(op="reset_prefix_cache")
    loads = len(proc.loaded_ranges())
    assert proc.generate([LONG, MID, LAST], ABORT_TOKENS)["outputs"] == baseline["abort"]
    new = proc.loaded_ranges()[loads:]
    assert new and max(end for _, end, _ in new) >= 1024, new
