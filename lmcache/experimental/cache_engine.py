"""The seed's ``lmcache.experimental.cache_engine``: see `lmcache.kernel.cache_engine`."""

from lmcache.kernel.cache_engine import LMCacheEngine, LMCacheEngineBuilder

__all__ = ["LMCacheEngine", "LMCacheEngineBuilder"]
