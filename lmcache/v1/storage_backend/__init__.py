"""LMCache v1's ``lmcache.v1.storage_backend`` package: the same faces as
`lmcache.experimental.storage_backend`."""
