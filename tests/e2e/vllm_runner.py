"""A vLLM process driven by the e2e tests: JSON commands on stdin, JSON results on stdout.

Usage: ``python vllm_runner.py MODEL_DIR {lmcache|none} {prefix|noprefix} [KV_ROLE]``
(``kv_both`` by default; ``kv_producer`` and ``kv_consumer`` for disaggregated
prefill). ``LMCACHE_E2E_MEMORY_FRACTION`` sets vLLM's ``gpu_memory_utilization`` (on the
CPU backend a fraction of host memory: lower it when two engines run at once);
``LMCACHE_E2E_LORA=1`` enables LoRA (rank <= 8, two adapters at once) and prompt
embeddings; ``LMCACHE_E2E_LLM_ARGS`` (JSON) adds keyword arguments of ``LLM`` (such as
``tensor_parallel_size``, ``num_gpu_blocks_override``, ``speculative_config``). Each
stdin line is a command; each result is one stdout line starting with `MARK` (vLLM
prints to stdout too):

* ``{"op": "generate", "prompts": [[ids], ...], "max_tokens": N}`` → ``{"outputs":
  [[ids], ...], "cached": [num_cached_tokens, ...], "seconds": s}`` (greedy, one batch);
  ``"lora": [name, id, path]`` runs the batch with that LoRA adapter;
  ``"embeds": [path, ...]`` prompts with the embeddings saved (``torch.save``) there
* ``{"op": "steps", "prompts": [[ids], ...], "max_tokens": N, "abort": {"i": k}}`` →
  ``{"outputs": [[ids] or null, ...], "aborted_at": {"i": [steps, num_output_tokens]}}``:
  the requests go through ``LLMEngine.step`` one engine step at a time, and request i is
  aborted after k steps (for a step-exact abort run vLLM with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``); an aborted request's output is null
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
    common = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                  max_model_len=4096, enable_prefix_caching=prefix_caching, seed=0, **memory)
    common.update(json.loads(os.environ.get("LMCACHE_E2E_LLM_ARGS", "{}")))
    if not lmcache:
        from vllm import LLM

        return LLM(model=model, **common)
    # --8<-- [start:llm]
    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=model, kv_transfer_config=KVTransferConfig(
        kv_connector="LMCacheConnectorV1",
        kv_role=kv_role),  # "kv_both"; "kv_producer" / "kv_consumer" to disaggregate
    # --8<-- [end:llm]
              **common)
    return llm


def main() -> None:
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model, connector, prefix = sys.argv[1:4]
    kv_role = sys.argv[4] if len(sys.argv) > 4 else "kv_both"
    llm = make_llm(model, connector == "lmcache", prefix == "prefix", kv_role)
    _reply({"ready": True,
            "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks})
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
        elif cmd["op"] == "steps":
            _reply(_steps(llm, cmd))
        elif cmd["op"] == "reset_prefix_cache":
            llm.reset_prefix_cache()
            _reply({"ok": True})
        elif cmd["op"] == "quit":
            _reply({"ok": True})
            break
    del llm


_batches = 0


def _steps(llm, cmd: dict) -> dict:
    from vllm import SamplingParams

    global _batches
    _batches += 1
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=cmd.get("max_tokens", 12), temperature=0.0,
                            detokenize=False, ignore_eos=True)
    ids = [f"steps{_batches}-{i}" for i in range(len(cmd["prompts"]))]
    for rid, prompt in zip(ids, cmd["prompts"]):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    abort = {int(i): int(k) for i, k in cmd.get("abort", {}).items()}
    outputs: dict[str, list[int]] = {}
    produced = {rid: 0 for rid in ids}
    aborted: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        for i, at in abort.items():
            if at == step and ids[i] not in outputs:
                engine.abort_request([ids[i]])
                aborted[str(i)] = [step, produced[ids[i]]]
    return {"outputs": [None if str(i) in aborted else outputs.get(rid)
                        for i, rid in enumerate(ids)], "aborted_at": aborted}


if __name__ == "__main__":
    main()
