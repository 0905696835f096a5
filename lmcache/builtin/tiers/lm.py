"""``lm``: lmcache's cache server as a remote tier (``remote_url: lm://host:port``).

This module only moves bytes (`LMServerTransport`, over the wire protocol of
`lmcache.kits.wire`); `lmcache.kits.remote.RemoteBackend` does the rest: asynchronous
puts, bounded waits, outages and reconnection, the serde and its integrity checks. The
server is ``python -m lmcache.server HOST PORT`` (`lmcache.server`).

Connections
    A small pool of connections (``connections`` idle ones are kept), each used by one
    thread at a time; a connection is opened when none is idle, with a HELLO that checks
    that the peer is an lmcache cache server of this protocol version. No I/O happens in
    the constructor. Every call has one deadline, ``timeout_s`` from its start, for the
    connect, the HELLO, sending the request and receiving the reply: the socket's timeout
    is what is left of it before each system call. A connection that failed is closed,
    never reused; one that the server closed while it was idle (a restart, the server's
    idle timeout) is noticed before it is used, and replaced. After a failure `reset`
    closes the idle ones, so that the next call after an outage connects afresh.
Values
    A put sends the serde's pieces (header, then a view of the chunk's memory) in one
    frame, without joining them. A get tells the server the most bytes it accepts
    (``max_bytes``, the largest value this engine's chunks can make); a longer value is
    not sent, and the get returns an empty buffer, which no serde decodes (a bad value).
    A put the server has no room for, or that is over its limit, is not stored and is
    not an error: like a value the server evicted at once, it is a miss later.
Loads straight into the chunk's memory
    With the ``naive`` serde (the default), whose value is the object of
    `lmcache.kits.object_format` as it is, a get does not receive the value into a
    buffer to copy it from: it receives the 128-byte object header, makes every check
    the serde makes (header checksum, length, the key it was stored under, the engine's
    kind of chunk) before anything is allocated, then receives the payload straight into
    a memory object of the engine's allocator and verifies its checksum. Anything that
    fails a check is a bad value, as with the serde. The tier's serde is wrapped
    (`ReceivingSerde`) so that the remote kit takes the object as the decoded chunk.
Names
    ``<namespace>/<chunk key string>``; the server keeps namespaces apart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import Field

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.abc.storage_backend import TierContext
from lmcache.kits.remote import RemoteBackend, RemoteOptions, redact_url
from lmcache.kits.wire import CACHE_SERVER, Op, ProtocolError, Reply, Status, WireClient
from lmcache.kits.wire_pool import ReceivedChunk, ReceivingSerde, WirePool, chunk_sink
from lmcache.utils import Buffer, CacheEngineKey, LogOnce

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = ["LMServerBackend", "LMServerTransport", "ReceivedChunk", "ReceivingSerde",
           "parse_lm_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def parse_lm_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``lm://host:port`` (``lm://[::1]:port`` for IPv6);
    `ValueError` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad lm:// URL {redact_url(url)!r}: {exc}; expected "
                         "lm://host:port") from None
    if parts.scheme.lower() != "lm" or not parts.hostname or port is None \
            or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ValueError(f"bad lm:// URL {redact_url(url)!r}; expected lm://host:port")
    return parts.hostname, port


class LMServerTransport(RemoteTransport):
    """Values in an lmcache cache server (see the module documentation).

    Thread-safe; every method ends within ``timeout_s``. Connection failures are raised
    as `RemoteUnavailable` (``TimeoutError`` for a timeout, `ProtocolError` for a peer
    that breaks the protocol): the remote tier turns each into an outage.
    """

    def __init__(self, url: str, *, namespace: str = "lmcache", timeout_s: float = 10.0,
                 connections: int = 8) -> None:
        self.host, self.port = host, port = parse_lm_url(url)
        self.description = redact_url(url)
        self.pool = WirePool(host, port, CACHE_SERVER, timeout_s=timeout_s,
                             connections=connections, description=self.description)
        self.namespace = namespace
        self.timeout_s = float(timeout_s)
        self._log_once = LogOnce(logger, f"{self.description}: ")
        self._receive: tuple[MemoryAllocatorInterface, ChunkSpec | None] | None = None

    def receive_into(self, allocator: MemoryAllocatorInterface,
                     spec: ChunkSpec | None) -> None:
        """From now on, `get` receives values (objects of `lmcache.kits.object_format`)
        straight into memory objects from ``allocator`` and returns `ReceivedChunk`: for
        a tier whose serde is ``naive`` and wrapped in `ReceivingSerde`."""
        self._receive = (allocator, spec)

    def _call(self, op: Op, name: str, *, arg: int = 0) -> Reply:
        return self.pool.call(
            lambda conn, deadline: conn.call(op, name.encode(), arg=arg, deadline=deadline))

    # -- the transport ---------------------------------------------------------------------

    def object_name(self, key_string: str) -> str:
        return f"{self.namespace}/{key_string}"

    def put(self, name: str, parts: Sequence[Buffer]) -> None:
        size = sum(memoryview(p).nbytes for p in parts)

        def put(conn: WireClient, deadline: float) -> Reply | None:
            if size > conn.peer_limits.max_payload:
                return None
            return conn.call(Op.PUT, name.encode(), parts, deadline=deadline)

        reply = self.pool.call(put)
        if reply is None:
            self._log_once("over-limit", "a value of %d bytes is over the server's limit "
                           "(--max-value-mb); not stored", size)
        elif reply.status == Status.NO_SPACE:
            self._log_once("no-space", "the server has no room for a value of %d bytes "
                           "(--cpu-gb); not stored", size)
        elif reply.status != Status.OK:
            raise ProtocolError(f"PUT answered {reply.status.name}: {reply.message()}")

    def get(self, name: str, max_bytes: int | None = None) -> Any:
        receive = self._receive
        sink = None if receive is None else chunk_sink(_key_of(name), *receive)

        def get(conn: WireClient, deadline: float) -> Reply:
            most = conn.peer_limits.max_payload if max_bytes is None else max_bytes
            return conn.call(Op.GET, name.encode(), arg=most, max_reply=most,
                             deadline=deadline, sink=sink)

        reply = self.pool.call(get)
        if reply.status == Status.OK:
            if sink is not None:
                return b"" if reply.value is None else reply.value  # b"": a bad value
            return reply.payload
        if reply.status == Status.NOT_FOUND:
            return None
        if reply.status == Status.TOO_LARGE:
            return b""  # longer than any chunk of this engine: a bad value, not sent
        raise ProtocolError(f"GET answered {reply.status.name}: {reply.message()}")

    def exists(self, name: str) -> bool:
        return self._found(Op.EXISTS, name)

    def delete(self, name: str) -> bool:
        return self._found(Op.DELETE, name)

    def _found(self, op: Op, name: str) -> bool:
        reply = self._call(op, name)
        if reply.status in (Status.OK, Status.NOT_FOUND):
            return reply.status == Status.OK
        raise ProtocolError(f"{op.name} answered {reply.status.name}: {reply.message()}")

    def server_stats(self) -> dict[str, Any]:
        """The server's counters (its ``STATS`` reply)."""
        reply = self._call(Op.STATS, "")
        if reply.status != Status.OK:
            raise ProtocolError(f"STATS answered {reply.status.name}: {reply.message()}")
        return json.loads(bytes(reply.payload))

    def reset(self) -> None:
        self.pool.reset()

    def close(self) -> None:
        self.pool.close()


def _key_of(name: str) -> CacheEngineKey | None:
    try:
        return CacheEngineKey.from_string(name.partition("/")[2])
    except ValueError:
        return None


class LMServerBackend(RemoteBackend):
    """The ``lm`` tier: lmcache's remote kit over `LMServerTransport`.

    Selected by ``remote_url: lm://host:port`` (the ``remote`` tier hands ``lm://`` URLs
    here) or as ``{name: lm, url: lm://host:port}`` in ``storage_backends``.
    """

    class Options(RemoteOptions):
        connections: int = Field(
            default=8, ge=0, description="Idle connections to the server kept for reuse "
            "(more are opened while more calls run at once).")

    @classmethod
    def from_options(cls, options: LMServerBackend.Options, config: Any, metadata: Any,
                     context: TierContext) -> LMServerBackend:
        context.allocator_for(cls)  # before a transport is made
        transport = LMServerTransport(options.url, namespace=options.namespace,
                                      timeout_s=options.timeout_s,
                                      connections=options.connections)
        backend = cls.from_transport(transport, options, config, metadata, context)
        if options.serde == "naive":  # its value is the object itself: receive it in place
            backend.serde = ReceivingSerde(backend.serde)
            transport.receive_into(backend.memory_allocator, backend.chunk_spec)
        return backend
