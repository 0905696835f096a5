"""The seed's ``local_disk_backend``: see `lmcache.builtin.tiers.disk`."""

from lmcache.builtin.tiers.disk.tier import OBJECT_SUFFIX, TEMP_SUFFIX, LocalDiskBackend

__all__ = ["OBJECT_SUFFIX", "TEMP_SUFFIX", "LocalDiskBackend"]
