"""LMCache Experimental: the seed's documented API at the seed's module paths.

Every module here is a face: it re-exports, under the seed's names, what lives where the
architecture puts it -- the contracts in `lmcache.abc`, the engine, storage manager and
configuration in `lmcache.kernel`, the building blocks in `lmcache.kits` and lmcache's
own components in `lmcache.builtin`. New code may import either path.
"""
