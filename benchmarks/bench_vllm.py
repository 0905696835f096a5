"""TTFT of an 8k-token cached document through vLLM: lmcache against vLLM's own connectors.

For each set-up, on the same model and prompts, in one run:

* ``cold``    — a fresh vLLM, empty storage: the document is computed (and stored);
* ``warm``    — the same document with another question, same process;
* ``restart`` — a new vLLM process on the same storage, a third question.

vLLM's own prefix cache is off in every set-up, so ``warm`` measures the connector.
Set-ups: no connector; vLLM's ``ExampleConnector`` (safetensors files per request);
``OffloadingConnector`` and ``SimpleCPUOffloadConnector`` (CPU offloading); lmcache
(``LMCacheConnectorV1``, embedded default: CPU tier + disk tier). A set-up that does not
start on this machine is reported as such.

The model is a random-weight Llama of about 0.6B parameters (bf16) made locally: the
KV it produces is as large as a real model's of that shape, and TTFT does not depend on
the weights' values.

Usage: ``python benchmarks/bench_vllm.py [--tokens 8192] [--only lmcache,none]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = {
    "none": None,
    "ExampleConnector": {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                         "kv_connector_extra_config": {"shared_storage_path": "{store}"}},
    "OffloadingConnector": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"cpu_bytes_to_use": 4 << 30}},
    "SimpleCPUOffloadConnector": {"kv_connector": "SimpleCPUOffloadConnector",
                                  "kv_role": "kv_both",
                                  "kv_connector_extra_config": {"cpu_bytes_to_use": 4 << 30}},
    "lmcache": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
}


def make_model(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=16384, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters",
          flush=True)
    model.save_pretrained(path)
    return path


def prompts(tokens: int) -> list[list[int]]:
    rng = random.Random(0)
    doc = [rng.randrange(10, 31000) for _ in range(tokens)]
    return [doc + [rng.randrange(10, 31000) for _ in range(24)] for _ in range(3)]


def run_phase(setup: str, model: str, tokens: int, store: str, phase: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    spec = SETUPS[setup]
    kwargs = {}
    if spec is not None:
        spec = json.loads(json.dumps(spec).replace("{store}", store))
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec)
    llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True,
              enable_prefix_caching=False, max_model_len=tokens + 256, seed=0, **kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    ps = prompts(tokens)
    out = {}
    order = [("cold", ps[0]), ("warm", ps[1])] if phase == "first" else [("restart", ps[2])]
    for name, prompt in order:
        started = time.perf_counter()
        result = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        out[name] = {"ttft": time.perf_counter() - started,
                     "cached": result.num_cached_tokens or 0}
    llm.llm_engine.engine_core.shutdown()
    return out


def _root_cause(stderr: str, returncode: int) -> str:
    """The most specific error line of a vLLM that failed (not the generic wrappers)."""
    lines = [ln.split("] ", 1)[-1].strip() for ln in stderr.splitlines()]
    for marker in ("Worker failed with error", "RuntimeError: shape", "Error:"):
        found = [ln for ln in lines if marker in ln and "Tokenizer not available" not in ln
                 and "EngineDeadError" not in ln]
        if found:
            return found[0][:200]
    return f"exit code {returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", default=",".join(SETUPS))
    parser.add_argument("--model", default=str(Path(tempfile.gettempdir()) /
                                               "lmcache-bench-llama-0.6b"))
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = run_phase(args.setup, args.model, args.tokens, args.store, args.phase)
        Path(args.out).write_text(json.dumps(result))
        return

    model = make_model(Path(args.model))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": "ERROR", "LMCACHE_LOG_LEVEL": "WARNING",
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    results: dict[str, dict] = {}
    for setup in args.only.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-vllm-{setup}-"))
        results[setup] = {}
        try:
            for phase in ("first", "restart"):
                if setup == "none" and phase == "restart":
                    break
                out = work / f"{phase}.json"
                proc = subprocess.run(
                    [sys.executable, __file__, "--phase", phase, "--setup", setup,
                     "--model", str(model), "--tokens", str(args.tokens),
                     "--store", str(work / "store"), "--out", str(out)],
                    cwd=work, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    results[setup]["error"] = _root_cause(proc.stderr, proc.returncode)
                    break
                results[setup].update(json.loads(out.read_text()))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(setup, json.dumps(results[setup]), flush=True)

    cold = results.get("none", {}).get("cold", {}).get("ttft")
    print(f"\nTTFT for a {args.tokens}-token document (ratio = recompute TTFT / TTFT)")
    print(f"{'set-up':28} {'cold':>16} {'warm':>22} {'restart':>22}")
    for setup, res in results.items():
        if "error" in res:
            print(f"{setup:28} does not run here: {res['error']}")
            continue
        cells = []
        for name in ("cold", "warm", "restart"):
            r = res.get(name)
            if r is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = f" {cold / r['ttft']:5.1f}x" if cold else ""
            cells.append(f"{r['ttft'] * 1000:8.0f} ms{ratio} ({r['cached']:>5})")
        print(f"{setup:28} " + " ".join(cells))
    print("(in parentheses: prompt tokens vLLM reported as cached; 0 on a warm or restart "
          "request means the set-up had no hit)")
    colds = sorted(r["cold"]["ttft"] for r in results.values() if "cold" in r)
    if colds:
        print(f"recompute TTFT over all set-ups' cold requests: min {colds[0] * 1000:.0f} ms, "
              f"max {colds[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
