"""Adapters between lmcache and serving engines (vLLM, Hugging Face transformers)."""
