"""A vLLM process driven by the e2e tests: JSON commands on stdin, JSON results on stdout.

Usage: ``python vllm_runner.py MODEL_DIR {lmcache|none} {prefix|noprefix} [KV_ROLE]``
(``kv_both`` by default; ``kv_producer`` and ``kv_consumer`` for disaggregated
prefill). ``LMCACHE_E2E_MEMORY_FRACTION`` sets vLLM's ``gpu_memory_utilization`` (on the
CPU backend a fraction of host memory: lower it when two engines run at once);
``LMCACHE_E2E_LORA=1`` enables LoRA (rank <= 8, two adapters at once) and prompt
embeddings. Each
stdin line is a command; each result is one stdout line starting with `MARK` (vLLM
prints to stdout too):

* ``{"op": "generate", "prompts": [[ids], ...], "max_tokens": N}`` → ``{"outputs":
  [[ids], ...], "cached": [num_cached_tokens, ...], "seconds": s}`` (greedy, one batch);
  ``"lora": [name, id, path]`` runs the batch with that LoRA adapter;
  ``"embeds": [path, ...]`` prompts with the embeddings saved (``torch.save``) there
* ``{"op": "reset_prefix_cache"}`` → ``{"ok": true}``
* ``{"op": "quit"}`` → ``{"ok": true}``, then a clean shutdown.
"""

from __future__ import annotations

import json
import os
import sys
import time

MARK = "@@lmcache-e2e@@ "


def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def make_llm(model: str, lmcache: bool, prefix_caching: bool, kv_role: str = "kv_both"):
    memory: dict = {}
    if os.environ.get("LMCACHE_E2E_MEMORY_FRACTION"):
        memory["gpu_memory_utilization"] = float(os.environ["LMCACHE_E2E_MEMORY_FRACTION"])
    if os.environ.get("LMCACHE_E2E_LORA") == "1":
        memory.update(enable_lora=True, max_lora_rank=8, max_loras=2,
                      enable_prompt_embeds=True)
    if not lmcache:
        from vllm import LLM

        return LLM(model=model, skip_tokenizer_init=True, enforce_eager=True,
                   dtype="float32", max_model_len=4096, enable_prefix_caching=prefix_caching,
                   seed=0, **memory)
    # --8<-- [start:llm]
    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=model, kv_transfer_config=KVTransferConfig(
        kv_connector="LMCacheConnectorV1",
        kv_role=kv_role),  # "kv_both"; "kv_producer" / "kv_consumer" to disaggregate
    # --8<-- [end:llm]
              skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=4096, enable_prefix_caching=prefix_caching, seed=0, **memory)
    return llm


def main() -> None:
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model, connector, prefix = sys.argv[1:4]
    kv_role = sys.argv[4] if len(sys.argv) > 4 else "kv_both"
    llm = make_llm(model, connector == "lmcache", prefix == "prefix", kv_role)
    _reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "generate":
            params = SamplingParams(max_tokens=cmd.get("max_tokens", 12), temperature=0.0,
                                    detokenize=False, ignore_eos=True)
            lora = LoRARequest(*cmd["lora"]) if cmd.get("lora") else None
            started = time.perf_counter()
            prompts = [{"prompt_token_ids": p} for p in cmd.get("prompts", [])]
            prompts += [{"prompt_embeds": torch.load(path)} for path in cmd.get("embeds", [])]
            outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
            _reply({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                    "cached": [o.num_cached_tokens for o in outs],
                    "seconds": time.perf_counter() - started})
        elif cmd["op"] == "reset_prefix_cache":
            llm.reset_prefix_cache()
            _reply({"ok": True})
        elif cmd["op"] == "quit":
            _reply({"ok": True})
            break
    del llm


if __name__ == "__main__":
    main()
