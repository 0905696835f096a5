"""``p2p``: chunks held by other instances, found through a Redis index and fetched from
the instance that holds them (``enable_p2p``, ``lookup_url``, ``distributed_url``).

Every instance with this tier

* serves the chunks of its own tiers above this one (its CPU tier, its disk) to its
  peers, at ``distributed_url`` (``host:port``), over the wire protocol of
  `lmcache.kits.wire` (service ``lmcache.p2p``; `lmcache.kits.wire_server`);
* records in the index (the Redis at ``lookup_url``) every chunk it stores: the key
  ``<namespace>:p2p:chunk:<chunk key>`` holds the address of its owner;
* proves it is alive with ``<namespace>:p2p:alive:<address>``, set every ``ttl_s / 3``
  to expire after ``ttl_s``: index entries of an instance that stopped (or died) are
  dead as soon as that key expires, and a lookup ignores them (one round trip checks
  both, in a Lua script).

A local miss asks the index which live peer holds the chunk and fetches it from that
peer, received straight into a memory object of this engine, with the checks of every
tier: the key it was stored under, this engine's kind of chunk, the payload checksum.
A peer that answers "not found" (it evicted the chunk) has its index entry removed; a
peer that does not answer, or answers too late, is a miss within ``timeout_s`` and is
not asked again for ``ttl_s``; the index itself going down is an outage of the tier
(`lmcache.kits.remote`: bounded waits, back-off). Keys carry the model, the worker and
the salt, so tenants and models stay apart across peers as in every other tier.

A put sends nothing over the network but one index entry: peers read the chunk from
this instance's own tiers when they need it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from lmcache.abc.remote_transport import RemoteTransport, RemoteUnavailable
from lmcache.abc.serde import Serde
from lmcache.abc.storage_backend import TierContext
from lmcache.kits.object_format import encode_header
from lmcache.kits.remote import RemoteBackend
from lmcache.kits.wire import Limits, Op, ProtocolError, Status
from lmcache.kits.wire_pool import ReceivingSerde, WirePool, chunk_sink
from lmcache.kits.wire_server import Frame, FrameServer
from lmcache.plugin.options import PluginOptions
from lmcache.plugin.registry import registry
from lmcache.utils import Buffer, CacheEngineKey, LogOnce

if TYPE_CHECKING:
    from collections.abc import Callable

    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = ["P2P_SERVICE", "P2PBackend", "PeerIndex", "PeerService", "P2PTransport",
           "parse_address"]

logger = logging.getLogger(__name__)

#: The peer chunk service's name in HELLO replies.
P2P_SERVICE = "lmcache.p2p"

#: Share of ``timeout_s`` that one call to the index or to a peer may take.
_INNER_SHARE = 0.75

# KEYS[1] = the chunk's index entry; ARGV[1] = the prefix of liveness keys. The owner,
# if it is alive; else nothing.
_LIVE_OWNER = """
local owner = redis.call('GET', KEYS[1])
if owner and redis.call('EXISTS', ARGV[1] .. owner) == 1 then return owner end
return false
"""
# KEYS[1] = the entry; ARGV[1] = the owner it must still name to be deleted.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def parse_address(address: str, what: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` (an optional ``scheme://`` is ignored)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {address!r}: expected host:port")
    return host, int(port)


class PeerIndex:
    """Which instance holds which chunk, in Redis (see the module documentation)."""

    def __init__(self, lookup_url: str, me: str, *, namespace: str, ttl_s: float,
                 timeout_s: float) -> None:
        try:
            import redis
        except ImportError as exc:
            raise ImportError("enable_p2p needs redis-py for its index: pip install -e "
                              "'.[p2p]' in the lmcache checkout (or pip install redis)"
                              ) from exc
        url = lookup_url if "://" in lookup_url else f"redis://{lookup_url}"
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False)
        self.me = me
        self.ttl_s = ttl_s
        self._chunk = f"{namespace}:p2p:chunk:"
        self._alive = f"{namespace}:p2p:alive:"
        self._live_owner = self.client.register_script(_LIVE_OWNER)
        self._delete_if = self.client.register_script(_DELETE_IF)

    def heartbeat(self) -> None:
        self.client.set(self._alive + self.me, b"1", px=max(1, int(self.ttl_s * 1000)))

    def leave(self) -> None:
        self.client.delete(self._alive + self.me)

    def register(self, name: str) -> None:
        self.client.set(self._chunk + name, self.me)

    def owner(self, name: str) -> str | None:
        """The live instance the index names for ``name``, or None."""
        got = self._live_owner(keys=[self._chunk + name], args=[self._alive])
        return None if got is None else bytes(got).decode()

    def forget(self, name: str, owner: str) -> bool:
        """Remove the entry of ``name`` if it still names ``owner``."""
        return bool(self._delete_if(keys=[self._chunk + name], args=[owner]))


class PeerService(FrameServer):
    """This instance's chunks for its peers: ``GET`` (the chunk's object, sent from the
    memory it lives in) and ``EXISTS``, read from the tiers above the ``p2p`` tier."""

    service = P2P_SERVICE
    operations = frozenset({Op.GET, Op.EXISTS})

    def __init__(self, host: str, port: int,
                 read_local: Callable[[CacheEngineKey], MemoryObj | None], *,
                 timeout_s: float, **options: Any) -> None:
        super().__init__(host, port, limits=Limits(max_payload=0), idle_timeout_s=300.0,
                         frame_timeout_s=max(timeout_s, 1.0), **options)
        self.read_local = read_local

    def handle(self, frame: Frame) -> None:
        try:
            key = CacheEngineKey.from_string(frame.key.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            frame.reply_message(Status.BAD_REQUEST, "not a chunk key")
            return
        obj = self.read_local(key)
        if obj is None:
            frame.reply(Status.NOT_FOUND)
            return
        try:
            if frame.header.op == Op.EXISTS:
                frame.reply(Status.OK)
                return
            # the value of the naive serde: the object header, then the chunk's own memory
            parts = [encode_header(obj, "sum64", key), obj.byte_array]
            size = sum(memoryview(p).nbytes for p in parts)
            if size > frame.header.arg:
                frame.reply(Status.TOO_LARGE, arg=size)
            else:
                frame.reply(Status.OK, parts)
        finally:
            obj.ref_count_down()


class _IndexOnly(Serde):
    """The serde of a put: nothing to send (peers read the chunk from this instance's
    own tiers); the transport's put only records the key in the index. Values fetched
    from peers are the ``naive`` serde's (``inner``)."""

    def __init__(self, inner: Serde) -> None:
        self.inner = inner

    def serialize(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None) -> bytes:
        return b""

    def serialize_parts(self, memory_obj: MemoryObj, key: CacheEngineKey | None = None
                        ) -> Sequence[Buffer]:
        return []

    def max_value_size(self, payload_bytes: int) -> int:
        return self.inner.max_value_size(payload_bytes)

    def deserialize(self, data: Any, allocator: MemoryAllocatorInterface,
                    key: CacheEngineKey | None = None, spec: ChunkSpec | None = None
                    ) -> MemoryObj | None:
        return self.inner.deserialize(data, allocator, key, spec)


class P2PTransport(RemoteTransport):
    """The index and one connection pool per peer: `get` asks the index for a live owner
    and fetches from it; `put` records this instance as the owner. A peer that fails is
    a miss (and left alone for ``ttl_s``), not an outage: only the index failing is."""

    def __init__(self, index: PeerIndex, *, timeout_s: float, connections: int = 2) -> None:
        self.index = index
        self.description = f"p2p index, this instance at {index.me}"
        self.timeout_s = timeout_s
        self.connections = connections
        self._lock = threading.Lock()
        self._pools: dict[str, WirePool] = {}
        self._shunned: dict[str, float] = {}  # peer -> monotonic time it may be asked again
        self._receive: tuple[MemoryAllocatorInterface, ChunkSpec | None] | None = None
        self._log = LogOnce(logger, "p2p: ")

    def receive_into(self, allocator: MemoryAllocatorInterface,
                     spec: ChunkSpec | None) -> None:
        self._receive = (allocator, spec)

    def _pool(self, peer: str) -> WirePool | None:
        with self._lock:
            if self._shunned.get(peer, 0.0) > time.monotonic():
                return None
            pool = self._pools.get(peer)
            if pool is None:
                host, port = parse_address(peer, "peer address")
                pool = self._pools[peer] = WirePool(
                    host, port, P2P_SERVICE, timeout_s=self.timeout_s,
                    connections=self.connections, description=f"peer {peer}")
            return pool

    def _shun(self, peer: str, exc: BaseException) -> None:
        with self._lock:
            self._shunned[peer] = time.monotonic() + self.index.ttl_s
            pool = self._pools.pop(peer, None)
        if pool is not None:
            pool.close()
        self._log(("peer", peer), "peer %s failed (%s: %s); its chunks are misses for "
                  "%.0f s", peer, type(exc).__name__, exc, self.index.ttl_s)

    def object_name(self, key_string: str) -> str:
        return key_string

    def put(self, name: str, parts: Sequence[Buffer]) -> None:
        self.index.register(name)

    def exists(self, name: str) -> bool:
        owner = self.index.owner(name)
        return owner is not None and owner != self.index.me and self._pool(owner) is not None

    def get(self, name: str, max_bytes: int | None = None) -> Any:
        owner = self.index.owner(name)
        if owner is None or owner == self.index.me:
            return None
        pool = self._pool(owner)
        if pool is None:
            return None
        sink = None
        if self._receive is not None:
            key = _key_of(name)
            sink = chunk_sink(key, *self._receive)
        most = max_bytes if max_bytes is not None else Limits().max_payload
        try:
            reply = pool.call(lambda conn, deadline: conn.call(
                Op.GET, name.encode(), arg=most, max_reply=most, deadline=deadline,
                sink=sink))
        except (RemoteUnavailable, TimeoutError, ProtocolError, OSError) as exc:
            self._shun(owner, exc)
            return None
        if reply.status == Status.OK:
            if sink is not None:
                return b"" if reply.value is None else reply.value  # b"": a bad value
            return reply.payload
        if reply.status == Status.NOT_FOUND:  # the owner evicted it: the entry is stale
            self.index.forget(name, owner)
            return None
        return b""  # TOO_LARGE or a refusal: not this engine's chunk

    def delete(self, name: str) -> bool:
        return self.index.forget(name, self.index.me)

    def reset(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.reset()

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def _key_of(name: str) -> CacheEngineKey | None:
    try:
        return CacheEngineKey.from_string(name)
    except ValueError:
        return None


class P2PBackend(RemoteBackend):
    """The ``p2p`` tier (see the module documentation)."""

    class Options(PluginOptions):
        lookup_url: str = Field(description="The Redis of the index: `redis://host:port` or "
                                "`host:port` (LMCache's spelling).")
        distributed_url: str = Field(description="`host:port` where this instance serves "
                                     "its chunks, and by which its peers reach it.")
        namespace: str = Field(default="lmcache", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                               description="Prefix of the index keys; instances that share "
                               "it (and a model) share chunks.")
        ttl_s: float = Field(default=10.0, gt=0, description="How long this instance's "
                             "index entries live after its last heartbeat (every ttl_s / 3); "
                             "also how long a peer that failed is left alone.")
        timeout_s: float = Field(default=2.0, gt=0, description="Longest wait for the index "
                                 "or for a peer; a slower one is a miss.")
        num_workers: int = Field(default=4, ge=1, description="Threads for index writes, "
                                 "and as many for lookups and fetches.")

    def __init__(self, transport: P2PTransport, service: PeerService, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(transport, *args, **kwargs)
        self.service = service
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._beat, daemon=True, name="lmcache-p2p-hb")
        self._heart.start()

    @classmethod
    def from_options(cls, options: P2PBackend.Options, config: Any, metadata: Any,
                     context: TierContext) -> P2PBackend:
        allocator = context.allocator_for(cls)
        if context.read_local is None:
            raise ValueError("the p2p tier serves this engine's chunks to its peers and "
                             "needs TierContext.read_local (an engine's storage manager)")
        host, port = parse_address(options.distributed_url, "distributed_url")
        # The index and the peers answer within most of timeout_s, so that a slow peer
        # is a miss of that peer before the tier's own bound makes it an outage of all.
        inner = _INNER_SHARE * options.timeout_s
        index = PeerIndex(options.lookup_url, f"{host}:{port}",
                          namespace=options.namespace, ttl_s=options.ttl_s, timeout_s=inner)
        service = PeerService(host, port, context.read_local,
                              timeout_s=options.timeout_s).start()
        transport = P2PTransport(index, timeout_s=inner)
        events = context.events
        try:
            naive = registry.create("serde", "naive", {}, config, metadata)
            backend = cls(transport, service, ReceivingSerde(_IndexOnly(naive)), allocator,
                          timeout_s=options.timeout_s, retry_interval_s=1.0,
                          max_retry_interval_s=options.ttl_s,
                          num_workers=options.num_workers, max_pending_puts=4096,
                          known_keys=0, tier_name=context.tier_name or "p2p",
                          on_error=events.error, on_dropped=events.dropped,
                          on_availability=events.availability,
                          chunk_spec=context.chunk_spec)
        except BaseException:
            service.stop()
            raise
        transport.receive_into(allocator, context.chunk_spec)
        return backend

    def _beat(self) -> None:
        interval = self.transport.index.ttl_s / 3  # type: ignore[attr-defined]
        while not self._stop.is_set():
            try:
                self.transport.index.heartbeat()  # type: ignore[attr-defined]
            except Exception as exc:
                logger.debug("p2p: heartbeat failed: %s", exc)
            self._stop.wait(interval)

    def close(self) -> None:
        self._stop.set()
        self.service.stop()
        try:
            self.transport.index.leave()  # type: ignore[attr-defined]
        except Exception as exc:
            logger.debug("p2p: could not leave the index: %s", exc)
        super().close()
