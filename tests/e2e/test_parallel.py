"""lmcache under vLLM's tensor parallelism (two CPU workers).

With ``tensor_parallel_size=2`` each worker holds half of the KV heads of every layer.
vLLM without a connector and vLLM with lmcache run the same prompts; then the prefix
cache is reset and the prompts run again. Every output must be vLLM's own, both workers
must store and load their own part of every chunk (each names its chunks with its own
rank), and each worker's CPU tier must be half of the instance's budget.

Pipeline parallelism is not run here: vLLM 0.32's CPU backend fails its first step with
``pipeline_parallel_size=2`` even without a connector (``EngineDeadError``); the ranks
of a pipeline are covered by the unit tests of `parallel_rank`.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import random_tokens

PROMPTS = [random_tokens(900, 400), random_tokens(700, 401)]
LAYOUTS = {"tp": {"tensor_parallel_size": 2}}


def _env(layout: str) -> dict[str, str]:
    # one OpenMP thread per worker, on a core of its own
    return {"LMCACHE_E2E_LLM_ARGS": json.dumps(LAYOUTS[layout]),
            "VLLM_CPU_OMP_THREADS_BIND": "0|1", "LMCACHE_MAX_LOCAL_CPU_SIZE": "2",
            "LMCACHE_LOCAL_DISK": "None"}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, tiny_llama, vllm_factory, tmp_path_factory) -> dict:
    layout = request.param
    base = vllm_factory(tiny_llama, tmp_path_factory.mktemp(f"{layout}-baseline"),
                        lmcache=False, prefix_caching=False, name=f"{layout}-baseline",
                        env=_env(layout))
    expected = base.generate(PROMPTS)["outputs"]
    base.quit()
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp(f"{layout}-lmcache"),
                        lmcache=True, prefix_caching=True, name=f"{layout}-lmcache",
                        env=_env(layout))
    first = proc.generate(PROMPTS)
    proc.call(op="reset_prefix_cache")
    second = proc.generate(PROMPTS)
    proc.quit()
    return {"layout": layout, "expected": expected, "first": first, "second": second,
            "log": proc.log()}


def _by_worker(log: str, pattern: str) -> dict[str, list[str]]:
    """Lines matching ``pattern``, by the pid of the process that logged them."""
    found: dict[str, list[str]] = {}
    for line in log.splitlines():
        m = re.match(r"\(lmcache pid=(\d+)\)", line)
        if m and re.search(pattern, line):
            found.setdefault(m.group(1), []).append(line)
    return found


def test_outputs_are_vllms_own_before_and_after_loading(runs):
    assert runs["first"]["outputs"] == runs["expected"]
    assert runs["second"]["outputs"] == runs["expected"]
    assert runs["second"]["cached"] == [len(p) - 1 for p in PROMPTS]


def test_each_worker_stores_and_loads_its_own_part(runs):
    log = runs["log"]
    engines = _by_worker(log, r"lmcache engine vllm-\S+-rank\d: ")
    assert len(engines) == 2, engines  # two worker processes, one engine each
    ranks = sorted(re.search(r"worker (\d) of (\d)", lines[0]).groups()
                   for lines in engines.values())
    assert ranks == [("0", "2"), ("1", "2")], ranks
    for lines in engines.values():  # the instance's 2 GB, shared by its two workers
        assert "(CPU tier 1 GB" in lines[0], lines[0]
    stores = _by_worker(log, r"lmcache: request \S+ stored tokens \[0, ")
    loads = _by_worker(log, r"lmcache: request \S+ loaded tokens \[0, ")
    assert set(stores) == set(engines) and set(loads) == set(engines), (stores, loads)
    for pid in engines:
        assert len(loads[pid]) == len(PROMPTS), loads[pid]
    assert "Traceback" not in log
