"""The client side of the wire protocol for remote tiers: a pool of connections to one
service, and loads received straight into a chunk's memory.

`WirePool` keeps a few idle `lmcache.kits.wire.WireClient` connections to one
``host:port``, each used by one thread at a time; a connection is opened (with a HELLO
that checks the service's name and protocol version) when none is idle. Every call has
one deadline for the connect, the HELLO, the request and the reply. A connection that
failed is closed, never reused; one the service closed while it was idle is noticed
before use and replaced. `WirePool.reset` closes the idle connections and shuts down the
busy ones, so that calls blocked on a dead service end now and the next call connects
afresh. Used by the ``lm`` tier (one pool: the cache server) and the ``p2p`` tier (one
pool per peer).

`receive_chunk` receives a value that is an object of `lmcache.kits.object_format` (the
``naive`` serde's value) straight into a memory object: it reads the 128-byte header,
makes every check the serde makes -- header checksum, length, the key it was stored
under, the engine's kind of chunk -- before anything is allocated, then receives the
payload into the object and verifies its checksum. A transport returns the result as a
`ReceivedChunk`, and a tier whose serde is wrapped in `ReceivingSerde` takes it as the
decoded chunk, so a load costs no copy out of a buffer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from lmcache.abc.remote_transport import RemoteUnavailable
from lmcache.abc.serde import Serde
from lmcache.kits.object_format import HEADER_SIZE, decode_header, fill_object
from lmcache.kits.wire import PayloadReader, ProtocolError, WireClient
from lmcache.utils import Buffer, CacheEngineKey

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = ["ReceivedChunk", "ReceivingSerde", "WirePool", "receive_chunk"]

T = TypeVar("T")


class WirePool:
    """Connections to the service at ``host:port`` whose HELLO names ``service`` (see
    the module documentation). Thread-safe. `call` raises `RemoteUnavailable` for a
    refused or broken connection, ``TimeoutError`` when the deadline passes and
    `ProtocolError` for a peer that breaks the protocol."""

    def __init__(self, host: str, port: int, service: str, *, timeout_s: float,
                 connections: int = 8, description: str = "") -> None:
        if not timeout_s > 0 or connections < 0:
            raise ValueError(f"timeout_s must be > 0 and connections >= 0, got {timeout_s}, "
                             f"{connections}")
        self.host, self.port, self.service = host, port, service
        self.timeout_s = float(timeout_s)
        self.max_idle = connections
        self.description = description or f"{host}:{port}"
        self._lock = threading.Lock()
        self._idle: list[WireClient] = []
        self._busy: set[WireClient] = set()
        self._generation = 0
        self._closed = False

    def _acquire(self, deadline: float) -> tuple[WireClient, int]:
        while True:
            with self._lock:
                if self._closed:
                    raise RemoteUnavailable("the connection pool is closed")
                generation = self._generation
                conn = self._idle.pop() if self._idle else None
                if conn is not None:
                    self._busy.add(conn)
            if conn is None:
                break
            if not conn.stale():
                return conn, generation
            self._drop(conn)
        try:
            conn = WireClient.connect(self.host, self.port, deadline,
                                      expect_service=self.service)
        except (TimeoutError, ProtocolError):
            raise
        except OSError as exc:
            raise RemoteUnavailable(f"{self.description}: {exc}") from exc
        with self._lock:
            self._busy.add(conn)
        return conn, generation

    def _release(self, conn: WireClient, generation: int) -> None:
        with self._lock:
            self._busy.discard(conn)
            keep = (not self._closed and not conn.closed and generation == self._generation
                    and len(self._idle) < self.max_idle)
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()

    def _drop(self, conn: WireClient) -> None:
        with self._lock:
            self._busy.discard(conn)
        conn.close()

    def call(self, fn: Callable[[WireClient, float], T]) -> T:
        """``fn(connection, deadline)`` on a pooled connection, within ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        conn, generation = self._acquire(deadline)
        try:
            result = fn(conn, deadline)
        except (TimeoutError, ProtocolError):
            self._drop(conn)
            raise
        except OSError as exc:
            self._drop(conn)
            raise RemoteUnavailable(f"{self.description}: {type(exc).__name__}: {exc}") \
                from exc
        except BaseException:
            self._drop(conn)
            raise
        self._release(conn, generation)
        return result

    def reset(self) -> None:
        """Close the idle connections; the ones in use are closed when they come back,
        and calls blocked on them end now (their sockets are shut down)."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for conn in idle:
            conn.close()
        for conn in busy:
            conn.shutdown()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.reset()


class ReceivedChunk:
    """A value that a get received straight into a memory object: what a transport
    returns instead of bytes (see the module documentation). ``len()`` is the value's
    length. `take` hands the object over; if nobody takes it, it is released when this
    is dropped (a get that its caller gave up on)."""

    __slots__ = ("_obj", "_nbytes")

    def __init__(self, obj: MemoryObj, nbytes: int) -> None:
        self._obj: MemoryObj | None = obj
        self._nbytes = nbytes

    def __len__(self) -> int:
        return self._nbytes

    def take(self) -> MemoryObj | None:
        obj, self._obj = self._obj, None
        return obj

    def __del__(self) -> None:
        obj, self._obj = self._obj, None
        if obj is not None:
            obj.ref_count_down()


def receive_chunk(reader: PayloadReader, key: CacheEngineKey | None,
                  allocator: MemoryAllocatorInterface, spec: ChunkSpec | None
                  ) -> MemoryObj | None:
    """The chunk of ``key`` whose object (header, payload) ``reader`` delivers, received
    straight into a memory object from ``allocator``; ``None`` when it is not that
    chunk, not this engine's kind of chunk, damaged, or there is no memory (the checks of
    the ``naive`` serde, made on the header before anything is allocated)."""
    nbytes = reader.remaining
    if nbytes < HEADER_SIZE:
        return None
    header = decode_header(reader.read(HEADER_SIZE))
    if header is None or header.total_size != nbytes or header.problem(key, spec):
        return None

    def receive(payload: memoryview) -> bool:
        reader.read_into(payload)
        return True

    return fill_object(header, allocator, receive)


def chunk_sink(key: CacheEngineKey | None, allocator: MemoryAllocatorInterface,
               spec: ChunkSpec | None) -> Callable[[PayloadReader], ReceivedChunk | None]:
    """The ``sink`` of a `WireClient.call` that receives the chunk of ``key``."""
    def sink(reader: PayloadReader) -> ReceivedChunk | None:
        nbytes = reader.remaining
        obj = receive_chunk(reader, key, allocator, spec)
        return None if obj is None else ReceivedChunk(obj, nbytes)
    return sink


class ReceivingSerde(Serde):
    """A serde that takes a `ReceivedChunk` as the decoded chunk and hands everything
    else to ``inner`` (the ``naive`` serde it wraps)."""

    def __init__(self, inner: Serde) -> None:
        self.inner = inner

    def serialize(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None) -> Any:
        return self.inner.serialize(memory_obj, key)

    def serialize_parts(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                        ) -> Sequence[Buffer]:
        return self.inner.serialize_parts(memory_obj, key)

    def max_value_size(self, payload_bytes: int) -> int:
        return self.inner.max_value_size(payload_bytes)

    def deserialize(self, data: Any, allocator: MemoryAllocatorInterface,
                    key: CacheEngineKey | None = None, spec: ChunkSpec | None = None
                    ) -> MemoryObj | None:
        if isinstance(data, ReceivedChunk):
            return data.take()
        return self.inner.deserialize(data, allocator, key, spec)
