"""Faces of the remote tiers: the transport contract (`lmcache.abc.remote_transport`),
the remote kit (`lmcache.kits.remote`), the ``remote`` tier
(`lmcache.builtin.tiers.remote`) and the cache server's ``lm`` tier
(`lmcache.builtin.tiers.lm`)."""

from lmcache.abc.remote_transport import RemoteTransport, RemoteUnavailable
from lmcache.builtin.tiers.lm import LMServerBackend, LMServerTransport
from lmcache.builtin.tiers.remote import FsspecTransport, RemoteStorageBackend
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
    "LMServerBackend",
    "LMServerTransport",
    "RemoteBackend",
    "RemoteOptions",
    "RemoteStats",
    "RemoteStorageBackend",
    "RemoteTransport",
    "RemoteUnavailable",
    "redact_url",
]
