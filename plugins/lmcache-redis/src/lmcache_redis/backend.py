"""Redis as a remote tier: standalone, TLS (``rediss://``) and Redis Cluster.

This package only moves bytes (`RedisTransport`); lmcache's `RemoteBackend` does the
rest: asynchronous puts, timeouts, outages and reconnection, the serde and integrity
checks. Every value is one Redis string ``<namespace>:<chunk key>`` holding the serde's
self-describing object; one ``SET`` writes it, so it is visible completely or not at all.

URLs
    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``unix:///path/redis.sock``, and for a Redis Cluster
    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster://``
    with TLS), or ``redis://`` with several ``host:port`` or the ``cluster_nodes`` option.

Writes send the value without joining it: the serde's pieces (header, then a view of the
chunk's memory) go to the socket one after the other as one ``SET``. Reads take a value
from the socket straight into a buffer of its own (`_read_value`): redis-py's parsers,
hiredis included, copy a large value two or three times through fresh memory, which
halved the throughput of a 32 MiB ``GET``. Every other reply is redis-py's to parse
(hiredis, installed with this package). Connections speak RESP2, where the only bytes a
connection receives are the replies to the commands it sent.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
import redis
from pydantic import Field
from redis._parsers import BaseParser
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, InvalidResponse, ResponseError
from redis.retry import Retry

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.abc.storage_backend import TierContext
from lmcache.kits.remote import RemoteBackend, RemoteOptions, redact_url
from lmcache.utils import Buffer

__all__ = ["RedisBackend", "RedisTarget", "RedisTransport", "parse_redis_url"]
_SCHEMES = {"redis": (False, False), "rediss": (True, False),
            "redis+cluster": (False, True), "rediss+cluster": (True, True)}
DEFAULT_PORT = 6379
#: What `_read_value` receives with a reply's first line; the rest of a value goes
#: straight into the value's buffer.
_FIRST_READ = 1 << 16

T = TypeVar("T")


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis URL points."""

    tls: bool
    cluster: bool
    nodes: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    db: int = 0
    unix_path: str | None = None


def _host_port(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {redact_url(url)!r}; expected host[:port]")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port {port!r} in {redact_url(url)!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad port {number} in {redact_url(url)!r}")
    return host, number


def parse_redis_url(url: str, cluster_nodes: Sequence[str] = ()) -> RedisTarget:
    """Parse a Redis URL (see the module documentation); ``ValueError`` if it is not one.

    Several hosts, a ``+cluster`` scheme or ``cluster_nodes`` make it a cluster.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"not a URL: {redact_url(url)!r}")
    if scheme == "unix":
        parts = urlsplit(url)
        return RedisTarget(False, False, unix_path=parts.path,
                           username=unquote(parts.username) if parts.username else None,
                           password=unquote(parts.password) if parts.password else None)
    if scheme not in _SCHEMES:
        raise ValueError(f"not a Redis URL: {redact_url(url)!r}; expected redis://, "
                         "rediss://, redis+cluster://, rediss+cluster:// or unix://")
    tls, cluster = _SCHEMES[scheme]
    netloc, _, path = rest.partition("/")
    path = path.split("?", 1)[0].split("#", 1)[0]
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host means a password, as redis-cli reads it
            username, password = None, unquote(user) or None
    nodes = [_host_port(h, url) for h in hosts.split(",") if h.strip()]
    nodes += [_host_port(n, url) for n in cluster_nodes]
    if not nodes:
        raise ValueError(f"no host in {redact_url(url)!r}")
    db = 0
    if path:
        try:
            db = int(path)
        except ValueError:
            raise ValueError(f"bad database {path!r} in {redact_url(url)!r}; expected an "
                             "integer") from None
    cluster = cluster or len(nodes) > 1 or bool(cluster_nodes)
    if cluster and db:
        raise ValueError(f"a Redis Cluster has only database 0, got {db} in "
                         f"{redact_url(url)!r}")
    return RedisTarget(tls, cluster, nodes, username, password, db)


class RedisTransport(RemoteTransport):
    """Values as Redis strings, one ``SET`` each; standalone or cluster.

    No network I/O happens in the constructor: the client is created on first use, so
    that an engine starts while Redis is down. Every socket operation is bounded by
    ``timeout_s`` (``socket_connect_timeout``, and ``socket_timeout`` for each read and
    each whole ``sendall``), and no command is retried (``Retry(NoBackoff(), 0)``, for a
    cluster too): a call on a fresh connection makes at most a connect, the handshake
    and the command. `RemoteBackend` bounds the wait for the whole call by
    ``timeout_s``; `reset` after a failure shuts the sockets down, which also ends calls
    still blocked on them.

    Replies are parsed by redis-py (with hiredis, a dependency of this package), except
    the value of a ``GET``/``GETRANGE``, which `get` receives into its buffer itself
    (`_read_value`), and ``SET`` is framed here so that the value is not copied.
    """

    def __init__(self, url: str, *, namespace: str = "lmcache", timeout_s: float = 10.0,
                 cluster_nodes: Sequence[str] = (), tls_ca_file: str | None = None,
                 tls_verify: bool = True) -> None:
        self.target = parse_redis_url(url, cluster_nodes)
        self.description = redact_url(url)
        self.namespace = namespace
        self._lock = threading.Lock()
        self._client: Any = None
        common: dict[str, Any] = dict(
            username=self.target.username, password=self.target.password,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            socket_keepalive=True, health_check_interval=0,
            protocol=2)  # RESP2: nothing arrives unasked, as `_read_value` needs
        if self.target.tls:
            common.update(ssl=True, ssl_ca_certs=tls_ca_file,
                          ssl_cert_reqs="required" if tls_verify else "none",
                          ssl_check_hostname=tls_verify)
        self._common = common

    # -- clients -------------------------------------------------------------------------

    def _make_client(self) -> Any:
        t = self.target
        if t.cluster:
            # Discovers the slots: network I/O, hence lazily, on an I/O thread.
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.nodes],
                                retry=Retry(NoBackoff(), 0), **self._common)
        kwargs = dict(self._common, retry=Retry(NoBackoff(), 0))
        if t.unix_path is not None:
            for key in ("ssl", "ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname",
                        "socket_keepalive"):
                kwargs.pop(key, None)
            return redis.Redis(unix_socket_path=t.unix_path, **kwargs)
        (host, port), = t.nodes
        return redis.Redis(host=host, port=port, db=t.db, **kwargs)

    def client(self) -> Any:
        """The redis-py client (``redis.Redis`` or ``RedisCluster``), made on first use."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
                client = self._client
        return client

    # -- the transport -------------------------------------------------------------------

    def object_name(self, key_string: str) -> str:
        return f"{self.namespace}:{key_string}" if self.namespace else key_string

    def _on_node(self, name: str, command: Callable[[redis.Redis], T]) -> T:
        """``command`` with the client of the node that holds ``name``: the only one, or
        in a cluster the node of its slot (learning the slots again once if they moved)."""
        client = self.client()
        if not self.target.cluster:
            return command(client)
        try:
            return command(client.get_redis_connection(client.get_node_from_key(name)))
        except AskError:  # MOVED (a subclass) or ASK: the slots moved
            client.nodes_manager.initialize()
        return command(client.get_redis_connection(client.get_node_from_key(name)))

    def put(self, name: str, parts: Sequence[Buffer]) -> None:
        key = name.encode()
        self._on_node(name, lambda client: _send_set(client, key, parts))

    def get(self, name: str, max_bytes: int | None = None) -> Buffer | None:
        if max_bytes is None:
            return self._on_node(name, lambda client: _get(client, ("GET", name), None))
        # GETRANGE answers "" for a missing key; a stored value is never empty
        value = self._on_node(
            name, lambda client: _get(client, ("GETRANGE", name, 0, max_bytes), max_bytes))
        return value if value is not None and len(value) else None

    def exists(self, name: str) -> bool:
        return bool(self.client().exists(name))

    def delete(self, name: str) -> bool:
        return bool(self.client().delete(name))

    def reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)

    def close(self) -> None:
        self.reset()


@contextmanager
def _connection(client: redis.Redis) -> Any:
    """A connection of ``client``'s pool, given back after the block. A block that fails
    other than with an error reply disconnects it first: the stream may be in the middle
    of a reply."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        yield conn
    except ResponseError:
        raise
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _send_set(client: redis.Redis, key: bytes, parts: Sequence[Buffer]) -> None:
    # SET key value, with the value's pieces written to the socket one after the other:
    # RESP frames a bulk string by its total length, so the pieces need not be joined.
    views = [p if isinstance(p, memoryview) else memoryview(p) for p in parts]
    views = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views]
    total = sum(v.nbytes for v in views)
    head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(key), key, total)
    with _connection(client) as conn:
        conn.send_packed_command([head, *views, b"\r\n"], check_health=False)
        response = conn.read_response()
    if response not in (b"OK", "OK"):
        raise redis.RedisError(f"unexpected reply to SET: {response!r}")


def _get(client: redis.Redis, command: tuple[Any, ...], max_bytes: int | None
         ) -> memoryview | None:
    # GET or GETRANGE, its reply read by `_read_value`.
    with _connection(client) as conn:
        conn.send_command(*command, check_health=False)
        sock = getattr(conn, "_sock", None)
        if sock is None:  # not the redis-py connection we know: its parser reads
            value = conn.read_response()
            return None if value is None else memoryview(value)
        return _read_value(sock, max_bytes)


def _recv_into(sock: socket.socket, buf: memoryview) -> int:
    try:
        got = sock.recv_into(buf)
    except TimeoutError:
        raise redis.TimeoutError("Timeout reading from socket") from None
    except OSError as exc:
        raise redis.ConnectionError(f"Error while reading from socket: {exc}") from exc
    if not got:
        raise redis.ConnectionError("Connection closed by server.")
    return got


def _read_value(sock: socket.socket, max_bytes: int | None) -> memoryview | None:
    """The RESP2 reply on ``sock`` to a ``GET`` or ``GETRANGE``: the value, received into
    a buffer of its own (one copy, into memory that numpy backs with huge pages where the
    kernel allows), or ``None`` for nil. An error reply raises what redis-py raises for
    it; anything else, or a value longer than ``max_bytes + 1``, is `InvalidResponse`."""
    first = bytearray(_FIRST_READ)
    got = 0
    while (end := first.find(b"\r\n", 0, got)) < 0:
        if got == len(first):
            raise InvalidResponse("a reply line longer than 64 KiB")
        got += _recv_into(sock, memoryview(first)[got:])
    kind, line = first[:1], bytes(first[1:end])
    if kind == b"-":
        raise BaseParser.parse_error(line.decode("utf-8", "replace"))
    try:
        length = int(line) if kind == b"$" else None
    except ValueError:
        length = None
    if length is None:
        raise InvalidResponse(f"unexpected reply to a GET: {bytes(first[:min(end, 64)])!r}")
    if length < 0:
        return None
    if max_bytes is not None and length > max_bytes + 1:
        raise InvalidResponse(f"{length} bytes in answer to a GETRANGE of "
                              f"{max_bytes + 1}")
    have = got - end - 2
    if have > length + 2:  # RESP2 sends nothing unasked: the stream is out of step
        raise InvalidResponse("bytes after the reply to a GET")
    buf = memoryview(np.empty(length + 2, np.uint8))  # the value and its CRLF
    buf[:have] = first[end + 2 : got]
    while have < length + 2:
        have += _recv_into(sock, buf[have:])
    if buf[length:] != b"\r\n":
        raise InvalidResponse("a value not followed by CRLF")
    return buf[:length]


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass


class RedisBackend(RemoteBackend):
    """The ``redis`` tier: lmcache's remote kernel over `RedisTransport`.

    Selected as ``{name: redis, url: redis://host:6379}`` in ``storage_backends``, or
    through ``remote_url: redis://...`` (the ``remote`` tier hands Redis URLs here).
    """

    class Options(RemoteOptions):
        cluster_nodes: list[str] = Field(
            default_factory=list, description="More `host:port` start-up nodes of a Redis "
            "Cluster (any of them is enough to discover the rest); makes the tier a cluster.")
        tls_ca_file: str | None = Field(
            default=None, description="`rediss://`: CA bundle that signed the server's "
            "certificate (default: the system's).")
        tls_verify: bool = Field(
            default=True, description="`rediss://`: verify the server's certificate and "
            "host name.")

    @classmethod
    def from_options(cls, options: RedisBackend.Options, config: Any, metadata: Any,
                     context: TierContext) -> RedisBackend:
        context.allocator_for(cls)  # before a transport is made
        transport = RedisTransport(
            options.url, namespace=options.namespace, timeout_s=options.timeout_s,
            cluster_nodes=options.cluster_nodes, tls_ca_file=options.tls_ca_file,
            tls_verify=options.tls_verify)
        return cls.from_transport(transport, options, config, metadata, context)
