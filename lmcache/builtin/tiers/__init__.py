"""lmcache's storage tiers (group ``lmcache.storage_backends``), one package or module each.

* ``local_cpu`` (`cpu`) -- the hot tier, chunks in the engine's allocator;
* ``local_disk`` (`disk`) -- self-describing chunk files in a directory of any fsspec URL;
* ``remote`` (`remote`) -- the tier of ``remote_url``: the store its URL scheme names.
"""
