"""The remote transport contract: bytes by name in one remote store.

Who calls what
    `lmcache.kits.remote.RemoteBackend` is the only caller. It calls every method from
    its own writer and I/O threads, several at once, and abandons a call that takes
    longer than its ``timeout_s`` (the thread comes back when the transport's own timeout
    fires). A transport never sees memory objects: the backend serializes them first.

A store-specific remote tier is a transport plus a few lines of ``from_options`` (see
`lmcache.kits.remote`); lmcache's own are the fsspec transport of the ``remote`` tier
(`lmcache.builtin.tiers.remote`) and Redis (the ``lmcache-redis`` distribution).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from lmcache.utils import Buffer

__all__ = ["RemoteTransport", "RemoteUnavailable"]


class RemoteUnavailable(ConnectionError):
    """The remote store is down, unreachable or slower than the timeout."""



class RemoteTransport(ABC):
    """Bytes by name in one remote store: the store-specific half of a remote tier.

    Implementations keep these promises; `RemoteBackend` builds everything else (threads,
    timeouts, outages, serde, integrity) on top:

    - **Atomic puts.** After `put` returns, `get` of that name returns the whole
      value; before, it returns the old value or ``None`` — never a part of the new one.
    - **Misses are ``None``.** `get` returns ``None`` and `exists` ``False`` for a
      name that is not stored; they raise only when the store cannot answer
      (connection refused, timeout, protocol error). Any exception counts as an outage.
    - **Own timeouts.** Every network operation is bounded (socket, connect and read
      timeouts of about the backend's ``timeout_s``) so that threads come back.
    - **Reconnect by itself.** After a failure, the next call opens fresh connections;
      `reset` is a hint to drop the current ones now.
    - **Thread-safe.** Calls come from several threads at once.
    - **No I/O in the constructor**, so that an engine starts while its store is down.
    """

    #: A short description of the store for log messages (no credentials).
    description: str = "remote store"

    @abstractmethod
    def object_name(self, key_string: str) -> str:
        """The name in the store of the chunk whose key string is ``key_string``."""

    @abstractmethod
    def put(self, name: str, parts: Sequence[Buffer]) -> None:
        """Store the concatenation of ``parts`` under ``name``, atomically."""

    @abstractmethod
    def get(self, name: str, max_bytes: int | None = None) -> Buffer | None:
        """The value stored under ``name``, or ``None``.

        With ``max_bytes``, reads no more than ``max_bytes + 1`` bytes of the value: a
        longer value comes back cut at that length, which tells the caller it is too long
        for any chunk, without moving (or holding in memory) the rest of it.
        """

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a value is stored under ``name``."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Delete ``name``; returns whether it was there (``True`` if unknown)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Drop current connections after a failure (the next call reconnects)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release every resource."""

