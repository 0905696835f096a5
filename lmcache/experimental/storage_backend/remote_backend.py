"""Faces of the remote tiers: the transport contract (`lmcache.abc.remote_transport`),
the remote kit (`lmcache.kits.remote`) and the ``remote`` tier
(`lmcache.builtin.tiers.remote`)."""

from lmcache.abc.remote_transport import RemoteTransport, RemoteUnavailable
from lmcache.builtin.tiers.remote import (
    FsspecTransport,
    RemoteStorageBackend,
    UnreachableTransport,
)
from lmcache.kits.remote import (
    BAD_KEYS,
    RemoteBackend,
    RemoteOptions,
    RemoteStats,
    redact_url,
)

__all__ = [
    "BAD_KEYS",
    "FsspecTransport",
    "RemoteBackend",
    "RemoteOptions",
    "RemoteStats",
    "RemoteStorageBackend",
    "RemoteTransport",
    "RemoteUnavailable",
    "UnreachableTransport",
    "redact_url",
]
