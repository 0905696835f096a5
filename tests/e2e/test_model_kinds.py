"""Models beyond one plain decoder: sliding-window attention, and hybrid state-space.

* A random Gemma-2 (one sliding-window layer of 256 tokens, one full-attention layer),
  prompts of 900 tokens: vLLM without a connector runs it with its hybrid KV cache
  manager (the sliding layer keeps only its window), vLLM with lmcache without it (every
  layer keeps full KV, which lmcache stores and loads). The outputs must be the same,
  before and after a load.
* A random DeepSeek-V2 (MLA: one latent tensor per layer): stored and loaded as whole
  blocks of the latent cache (outputs not compared: vLLM's CPU MLA is not
  deterministic, see the test).
* A random Jamba (one Mamba layer, one attention layer): vLLM with lmcache must refuse
  it at start, never run it. vLLM 0.32 does so itself, before it creates the connector:
  with its hybrid KV cache manager off (which it does for every connector that does not
  declare ``SupportsHMA``, vLLM's ``LMCacheConnectorV1`` wrapper among them) it cannot
  lay out the Mamba state. lmcache's own refusal, which names the layer kinds, is for a
  vLLM that would get further (see ``tests/unit/test_vllm_adapter.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import random_tokens

PROMPTS = [random_tokens(900, 500), random_tokens(900, 501)]


def make_gemma2(path: Path) -> Path:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
        sliding_window=256, initializer_range=0.2, final_logit_softcapping=None,
        attn_logit_softcapping=None)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # tied embeddings dominate a random Gemma: let the layers speak
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(10.0)
            layer.post_feedforward_layernorm.weight.fill_(10.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_jamba(path: Path) -> Path:
    import torch
    from transformers import JambaConfig, JambaForCausalLM

    config = JambaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=1, mamba_d_state=8,
        mamba_expand=2, mamba_dt_rank=8)
    torch.manual_seed(0)
    JambaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def make_deepseek_v2(path: Path) -> Path:
    """A random DeepSeek-V2 with MLA as vLLM's CPU MLA kernel takes it (latent 512 + rope
    64, value head 512), dense layers only."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=512, first_k_dense_replace=2,
        n_routed_experts=1, max_position_embeddings=4096, initializer_range=0.2,
        tie_word_embeddings=False, rope_scaling=None)
    torch.manual_seed(0)
    DeepseekV2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def gemma2(tiny_llama, tmp_path_factory) -> Path:  # tiny_llama: vLLM is there
    return make_gemma2(tmp_path_factory.mktemp("model") / "tiny-gemma2")


def test_a_sliding_window_model_gets_vllms_outputs(gemma2, vllm_factory, tmp_path):
    base = vllm_factory(gemma2, tmp_path / "base", lmcache=False, prefix_caching=False,
                        name="gemma2-baseline")
    expected = base.generate(PROMPTS)["outputs"]
    base.quit()
    assert expected[0] != expected[1] and len(set(expected[0])) > 1  # not degenerate
    proc = vllm_factory(gemma2, tmp_path / "lmcache", lmcache=True, prefix_caching=True,
                        name="gemma2-lmcache")
    assert proc.generate(PROMPTS)["outputs"] == expected
    proc.call(op="reset_prefix_cache")
    loads = len(proc.loaded_ranges())
    second = proc.generate(PROMPTS)
    proc.quit()
    assert second["outputs"] == expected
    assert second["cached"] == [len(p) - 1 for p in PROMPTS]
    assert len(proc.loaded_ranges()[loads:]) == len(PROMPTS)


def test_a_hybrid_state_space_model_is_refused_at_start(tiny_llama, vllm_factory, tmp_path):
    jamba = make_jamba(tmp_path / "tiny-jamba")
    with pytest.raises(AssertionError, match="vLLM exited during start"):
        vllm_factory(jamba, tmp_path / "run", lmcache=True, prefix_caching=True,
                     name="jamba-lmcache")
    log = (tmp_path / "run" / "jamba-lmcache.log").read_text(errors="replace")
    refusals = ("Failed to promote local KV cache specs to one unified type",  # vLLM's
                "lmcache's vLLM connector does not support")  # ours, if vLLM got further
    assert any(r in log for r in refusals), log[-3000:]


def test_an_mla_model_is_stored_and_loaded_as_its_latent_cache(tiny_llama, vllm_factory,
                                                               tmp_path):
    # Outputs are not compared: vLLM 0.32's CPU MLA is not deterministic (without any
    # connector, the same batch run twice in one process gives other greedy tokens, and
    # its prefix cache is off for MLA). What is checked: vLLM takes lmcache's loads of
    # the latent cache (the whole prompt but its last token cached), through the MLA
    # connector, named by the pipeline stage only.
    model = make_deepseek_v2(tmp_path / "tiny-deepseek-v2")
    proc = vllm_factory(model, tmp_path / "lmcache", lmcache=True, prefix_caching=True,
                        name="mla-lmcache")
    first = proc.generate(PROMPTS)
    assert first["cached"] == [0, 0]
    loads = len(proc.loaded_ranges())
    second = proc.generate(PROMPTS)
    log = proc.log()
    proc.quit()
    assert second["cached"] == [len(p) - 1 for p in PROMPTS]
    new = proc.loaded_ranges()[loads:]
    assert len(new) == len(PROMPTS) and all(start == 0 and end >= 896
                                            for start, end, _ in new), new
    # the latent cache [num_blocks, 16, 576] (vLLM's CPU backend adds a unit dimension)
    assert ", 16, 576) torch.float32, connector VLLMMLABlockConnector, worker 0 of 1" in log
    assert "Traceback" not in log
