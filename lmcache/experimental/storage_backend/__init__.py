"""The seed's ``lmcache.experimental.storage_backend`` package: faces of the storage
contract (`lmcache.abc.storage_backend`), the storage manager (`lmcache.kernel`) and the
tiers (`lmcache.builtin.tiers`)."""
