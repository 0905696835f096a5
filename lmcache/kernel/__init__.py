"""The kernel: the engine, the storage manager, the configuration and the metadata.

It calls components only through the contracts of `lmcache.abc` and finds them by name
through `lmcache.plugin.registry`; it imports `lmcache.abc`, `lmcache.plugin` and
`lmcache.utils` and nothing else of lmcache (the import rule is a test:
``tests/unit/test_layout.py``).
"""
