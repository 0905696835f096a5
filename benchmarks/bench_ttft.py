"""TTFT of a cached long prompt through vLLM: an lmcache hit against vLLM's own
prefix-cache hit (the KV already in place) and against recompute.

Per model, in fresh vLLM processes (engine core in the process), prefix caching on,
lmcache's embedded default (``LMCacheConnectorV1``: CPU tier + disk tier):

* ``recompute``         -- a new document: everything computed (and stored);
* ``vLLM prefix hit``   -- the same document with another question, same process:
  vLLM's own prefix cache holds it, nothing to load (the limit); the same hit in a vLLM
  without a connector is shown below it (on our 2-core machine it is slower: vLLM's
  own warm-up, which the connector's layout check at start-up happens to do);
* ``lmcache CPU hit``   -- vLLM's prefix cache reset, another question: the KV comes
  from lmcache's CPU tier;
* ``lmcache disk hit``  -- a new vLLM process on the same disk tier (a restart), another
  question: the KV comes from the disk tier (files in the page cache).

Hits are the median over ``--questions`` questions; the first request of each process is
reported too (``first``), as users meet it. Models: the demo's SmolLM2-135M at 8k tokens
(its context limit) and a random-weight Llama of the same shape with a 32k context.

Usage: ``python benchmarks/bench_ttft.py [--only smollm2-8k,llama-32k] [--questions 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vllm import _root_cause

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".demo" / "smollm2-135m-instruct"
CASES = {"smollm2-8k": 8000, "llama-32k": 32000}


def make_long_llama(path: Path, context: int) -> Path:
    """SmolLM2-135M's shape (30 layers, 3 KV heads of 64), random weights, long context."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, max_position_embeddings=context,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def requests(tokens: int, seed: int, count: int) -> list[list[int]]:
    """``count`` prompts: one document of ``tokens`` tokens, each with its own question."""
    rng = random.Random(seed)
    doc = [rng.randrange(10, 30000) for _ in range(tokens)]
    return [doc + [rng.randrange(10, 30000) for _ in range(16)] for _ in range(count)]


def run_child(phase: str, model: str, tokens: int, questions: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    connector = {} if phase == "none" else {"kv_transfer_config": KVTransferConfig(
        kv_connector="LMCacheConnectorV1", kv_role="kv_both")}
    llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True,
              enable_prefix_caching=True, max_model_len=tokens + 64, seed=0, **connector)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        return time.perf_counter() - t0, out.num_cached_tokens or 0

    prompts = requests(tokens, 0, 2 * questions + 2)
    out: dict[str, list] = {}
    if phase == "none":  # vLLM alone: recompute, then its own prefix-cache hits
        out["none_recompute"] = [ttft(prompts[0])]
        out["none_prefix"] = [ttft(p) for p in prompts[1:1 + questions]]
    elif phase == "first":
        out["recompute"] = [ttft(prompts[0])]
        out["prefix"] = [ttft(p) for p in prompts[1:1 + questions]]
        out["cpu"] = []
        for p in prompts[1 + questions:1 + 2 * questions]:
            llm.reset_prefix_cache()
            out["cpu"].append(ttft(p))
        # a second new document: recompute after warm-up (the first one paid start-up)
        llm.reset_prefix_cache()
        out["recompute"].append(ttft(requests(tokens, 1, 1)[0]))
    else:
        out["disk"] = [ttft(prompts[-1])]
    llm.llm_engine.engine_core.shutdown()
    return out


def run_case(name: str, model: Path, tokens: int, questions: int, restarts: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_LOGGING_LEVEL": "ERROR", "LMCACHE_LOG_LEVEL": "WARNING",
                "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    work = Path(tempfile.mkdtemp(prefix=f"bench-ttft-{name}-"))
    result: dict[str, list] = {}
    try:
        for phase in ["none", "first"] + ["restart"] * restarts:
            out = work / "out.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", phase, "--model", str(model),
                 "--tokens", str(tokens), "--questions", str(questions), "--out", str(out)],
                cwd=work, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                return {"error": _root_cause(proc.stderr, proc.returncode)}
            for k, v in json.loads(out.read_text()).items():
                result.setdefault(k, []).extend(v)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=2,
                        help="restarted processes (one disk hit each)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(args.child, args.model, args.tokens, args.questions)
        Path(args.out).write_text(json.dumps(result))
        return

    rows = []
    for name in args.only.split(","):
        tokens = CASES[name]
        if name.startswith("smollm2"):
            if not (SMOLLM2 / "config.json").exists():
                sys.exit(f"{SMOLLM2} is missing: run `make demo` (or demo/prepare_model.py)")
            model = SMOLLM2
        else:
            model = make_long_llama(Path(tempfile.gettempdir()) / "lmcache-bench-llama-32k",
                                    tokens + 64)
        res = run_case(name, model, tokens, args.questions, args.restarts)
        print(name, json.dumps(res), flush=True)
        rows.append((name, tokens, res))

    print("\nTTFT, ms (median; 'first' = the first request of its process). Targets: "
          "lmcache CPU hit <= 1.25x vLLM's prefix hit, disk hit after a restart <= 2x, "
          "both >= 10x faster than recompute")
    print(f"{'case':12} {'recompute':>10} {'vLLM prefix hit':>16} {'lmcache CPU hit':>22} "
          f"{'lmcache disk hit':>22} {'CPU vs recompute':>17}")
    for name, tokens, res in rows:
        if "error" in res:
            print(f"{name:12} does not run here: {res['error']}")
            continue
        hit_ok = all(c >= tokens - 256 for key in ("none_prefix", "prefix", "cpu", "disk")
                     for _, c in res.get(key, []))
        med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
        recompute = res["recompute"][-1][0]
        prefix = med["prefix"]
        print(f"{name:12} {recompute * 1e3:10.0f} {prefix * 1e3:16.1f} "
              f"{med['cpu'] * 1e3:9.1f} ({med['cpu'] / prefix:4.2f}x) "
              f"{med['disk'] * 1e3:11.1f} ({med['disk'] / prefix:4.2f}x) "
              f"{recompute / med['cpu']:16.0f}x"
              + ("" if hit_ok else "   (a hit was not reported as cached!)"))
        print(f"{'':12} without a connector: vLLM prefix hit {med['none_prefix'] * 1e3:.1f} ms "
              f"(first {res['none_prefix'][0][0] * 1e3:.0f} ms), recompute "
              f"{res['none_recompute'][0][0] * 1e3:.0f} ms")
        print(f"{'':12} first request recompute {res['recompute'][0][0] * 1e3:.0f} ms; "
              f"disk hits " + ", ".join(f"{t * 1e3:.0f}" for t, _ in res["disk"]) + " ms; "
              f"disk vs recompute {recompute / med['disk']:.0f}x")


if __name__ == "__main__":
    main()
