"""The seed's ``abstract_backend``: see `lmcache.abc.storage_backend`."""

from lmcache.abc.storage_backend import (
    HotTier,
    StorageBackendInterface,
    SupportsPinning,
    TierContext,
    TierEvents,
)

__all__ = ["HotTier", "StorageBackendInterface", "SupportsPinning", "TierContext", "TierEvents"]
