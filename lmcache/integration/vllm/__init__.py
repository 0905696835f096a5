"""lmcache inside vLLM.

vLLM's built-in ``LMCacheConnectorV1`` (``--kv-transfer-config
'{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'``) imports
`lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl` and calls it; nothing
in vLLM has to change.
"""
