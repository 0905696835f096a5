"""lmcache: a KV-cache engine for LLM serving engines.

The documented API lives under `lmcache.experimental`; plugins are found through
the entry-point groups listed in `lmcache.plugin.registry`.
"""

__version__ = "0.1.0"
