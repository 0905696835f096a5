"""lmcache's GPU connectors (group ``lmcache.gpu_connectors``), one layout per module.

* ``vllm_nested_tuple`` (`nested_tuple`) -- one contiguous (K, V) pair per layer
  covering the whole sequence;
* ``vllm_paged`` and ``vllm_paged_v2`` (`paged`) -- vLLM's paged KV addressed by a slot
  mapping; v2 keeps an optional reusable staging buffer on the cache's device (the one
  vLLM's adapter uses on GPUs);
* ``vllm_cpu_blocks`` (`cpu_blocks`) -- vLLM's CPU backend layout, moved as whole blocks;
* ``vllm_mla_blocks`` (`cpu_blocks`) -- the latent cache of an MLA model, moved as whole
  blocks.

All of them are pure torch (plus the optional compiled CPU row kernels of `lmcache.ops`):
one vectorized copy per layer and K/V, on whatever device the tensors live on.
"""
