"""The seed's ``storage_manager``: see `lmcache.kernel.storage_manager`."""

from lmcache.kernel.storage_manager import StorageFault, StorageManager

__all__ = ["StorageFault", "StorageManager"]
