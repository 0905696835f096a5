"""The contracts: one module per component kind, and nothing else.

=========================  ==========================================================
module                     contracts
=========================  ==========================================================
`lmcache.abc.memory`          `MemoryFormat`, `MemoryObj`, `MemoryObjMetadata`,
                           `MemoryAllocatorInterface`
`lmcache.abc.gpu_connector`   `GPUConnectorInterface`, `ConnectorContext`
`lmcache.abc.token_database`  `TokenDatabase`, `SupportsCacheSalt`
`lmcache.abc.storage_backend` `StorageBackendInterface`, `TierContext`, `TierEvents`,
                           `HotTier`, `SupportsPinning`
`lmcache.abc.serde`           `Serde`
`lmcache.abc.remote_transport` `RemoteTransport`, `RemoteUnavailable`
=========================  ==========================================================

A component (lmcache's own in `lmcache.builtin`, or a third party's package) subclasses
one of these, may build on the kits in `lmcache.kits`, and imports nothing of another
component. The kernel (`lmcache.kernel`) calls components only through these contracts.
"""

from lmcache.abc.gpu_connector import ConnectorContext, GPUConnectorInterface
from lmcache.abc.memory import (
    DoubleFreeError,
    InvalidMemoryObjError,
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
    MemoryObjError,
    MemoryObjMetadata,
)
from lmcache.abc.remote_transport import RemoteTransport, RemoteUnavailable
from lmcache.abc.serde import Serde
from lmcache.abc.storage_backend import (
    HotTier,
    StorageBackendInterface,
    SupportsPinning,
    TierContext,
    TierEvents,
)
from lmcache.abc.token_database import SupportsCacheSalt, TokenDatabase, supports_cache_salt

__all__ = [
    "ConnectorContext",
    "DoubleFreeError",
    "GPUConnectorInterface",
    "HotTier",
    "InvalidMemoryObjError",
    "MemoryAllocatorInterface",
    "MemoryFormat",
    "MemoryObj",
    "MemoryObjError",
    "MemoryObjMetadata",
    "RemoteTransport",
    "RemoteUnavailable",
    "Serde",
    "StorageBackendInterface",
    "SupportsCacheSalt",
    "SupportsPinning",
    "TierContext",
    "TierEvents",
    "TokenDatabase",
    "supports_cache_salt",
]
