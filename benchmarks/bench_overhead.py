"""What lmcache costs when it cannot help: TTFT on a full miss, against no connector.

Every request is a new 8k-token document (nothing to load, everything to store). Each
set-up runs in fresh vLLM processes, so the first request after start-up is measured as
users meet it, then more requests in the same process:

* ``none``           -- vLLM without a connector (the baseline);
* ``lmcache``        -- ``LMCacheConnectorV1`` with the embedded default (CPU tier and a
  disk tier in the working directory): the headline figure;
* ``remote-refused`` -- the default plus a Redis tier whose port refuses connections;
* ``remote-frozen``  -- the default plus a Redis tier on a redis-server that is stopped
  (SIGSTOP): every call to it waits until the tier's timeout.

Set-ups alternate round by round (the machine's speed drifts; a set-up measured in one
block would carry the drift into its ratio). The ratios are of medians over all rounds;
the target on a full miss is at most 1.03x.

On a machine with few cores, vLLM's default multiprocess engine without a connector can
be much slower than with one (on our 2-core machine 7.3 s against 3.8 s for 1k tokens,
while both take 3.9 s with the engine core in the process); ``--inproc`` compares the
set-ups without that effect.

Usage: ``python benchmarks/bench_overhead.py [--tokens 8192] [--rounds 3] [--requests 2]
[--inproc]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_vllm import _root_cause, make_model

SETUPS = ("none", "lmcache", "remote-refused", "remote-frozen")


def documents(tokens: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 31000) for _ in range(tokens)] for _ in range(count)]


def run_child(setup: str, model: str, tokens: int, requests: int, seed: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = {}
    if setup != "none":
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="LMCacheConnectorV1",
                                                        kv_role="kv_both")
    started = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=tokens + 256, seed=0, **kwargs)
    start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    ttfts = []
    for doc in documents(tokens, requests, seed):
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": doc}], params, use_tqdm=False)[0]
        ttfts.append(time.perf_counter() - t0)
        assert not out.num_cached_tokens, "a full miss was expected"
    llm.llm_engine.engine_core.shutdown()
    return {"start_s": start_s, "ttft": ttfts}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_with_remote(work: Path, url: str) -> Path:
    """The embedded default (CPU tier, disk tier in ./.lmcache) plus a Redis tier."""
    path = work / "lmcache.yaml"
    path.write_text(f"local_cpu: true\nmax_local_cpu_size: 5.0\n"
                    f"local_disk: {work / '.lmcache'}\nmax_local_disk_size: 20.0\n"
                    f"remote_url: {url}\nblocking_timeout_secs: 1.0\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2,
                        help="full-miss requests per vLLM process (the first included)")
    parser.add_argument("--only", default=",".join(SETUPS))
    parser.add_argument("--inproc", action="store_true",
                        help="run vLLM's engine core in the process "
                        "(VLLM_ENABLE_V1_MULTIPROCESSING=0) in every set-up")
    parser.add_argument("--model", default=str(Path(tempfile.gettempdir()) /
                                               "lmcache-bench-llama-0.6b"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(args.child, args.model, args.tokens, args.requests, args.seed)
        Path(args.out).write_text(json.dumps(result))
        return

    setups = args.only.split(",")
    model = make_model(Path(args.model))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    base_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "VLLM_LOGGING_LEVEL": "ERROR", "LMCACHE_LOG_LEVEL": "WARNING",
                     "VLLM_CPU_KVCACHE_SPACE": "4"})
    if args.inproc:
        base_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    frozen = None
    if "remote-frozen" in setups:
        from lmcache.testing.servers import RedisServer

        frozen = RedisServer()
        frozen.start()
        frozen.pause()
    results: dict[str, list[dict]] = {s: [] for s in setups}
    errors: dict[str, str] = {}
    try:
        for round_ in range(args.rounds):
            for setup in setups:
                if setup in errors:
                    continue
                work = Path(tempfile.mkdtemp(prefix=f"bench-overhead-{setup}-"))
                env = dict(base_env)
                if setup == "remote-refused":
                    env["LMCACHE_CONFIG_FILE"] = str(config_with_remote(
                        work, f"redis://127.0.0.1:{closed_port()}"))
                elif setup == "remote-frozen":
                    assert frozen is not None
                    env["LMCACHE_CONFIG_FILE"] = str(config_with_remote(work, frozen.url))
                out = work / "out.json"
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--child", setup, "--model", str(model),
                         "--tokens", str(args.tokens), "--requests", str(args.requests),
                         "--seed", str(1000 * round_ + 1), "--out", str(out)],
                        cwd=work, env=env, capture_output=True, text=True, timeout=1800)
                    if proc.returncode != 0:
                        errors[setup] = _root_cause(proc.stderr, proc.returncode)
                        continue
                    res = json.loads(out.read_text())
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                results[setup].append(res)
                print(f"round {round_ + 1} {setup:15} start {res['start_s']:6.1f} s  TTFT "
                      + " ".join(f"{t:6.2f}" for t in res["ttft"]) + " s", flush=True)
    finally:
        if frozen is not None:
            frozen.resume()
            frozen.stop()

    def med(setup: str, first: bool) -> float | None:
        values = [t for r in results.get(setup, [])
                  for t in (r["ttft"][:1] if first else r["ttft"][1:])]
        return statistics.median(values) if values else None

    mode = "engine core in the process" if args.inproc else "vLLM's default processes"
    print(f"\nTTFT on a full miss, {args.tokens}-token documents, median of {args.rounds} "
          f"rounds, {mode} (ratio to no connector; target <= 1.03x)")
    print(f"{'set-up':16} {'first request':>22} {'later requests':>22} {'start-up':>10}")
    base_first, base_later = med("none", True), med("none", False)
    for setup in setups:
        if setup in errors:
            print(f"{setup:16} does not run here: {errors[setup]}")
            continue
        cells = []
        for first, base in ((True, base_first), (False, base_later)):
            m = med(setup, first)
            if m is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = f"{m / base:6.3f}x" if base else ""
            cells.append(f"{m:9.2f} s {ratio:>10}")
        start = statistics.median(r["start_s"] for r in results[setup])
        print(f"{setup:16} " + " ".join(cells) + f" {start:8.1f} s")


if __name__ == "__main__":
    main()
