"""lmcache: a KV-cache engine for LLM serving engines.

The documented API lives under `lmcache.experimental` (the seed's paths). The code is
layered: contracts in `lmcache.abc`, the engine in `lmcache.kernel`, building blocks in
`lmcache.kits`, lmcache's own components in `lmcache.builtin`; plugins are found through
the entry-point groups listed in `lmcache.plugin.registry`.
"""

__version__ = "0.1.0"
