"""The wire protocol of lmcache's network services: the cache server (``lm://``) and the
peer-to-peer chunk service speak it alike.

A connection carries frames, one request and then its reply at a time. Every frame is a
fixed header, then a key, then a payload::

    offset  size  field (little-endian)
         0     4  magic  b"LMCW"
         4     2  protocol version (u16), currently 1
         6     1  operation (u8): `Op`
         7     1  status (u8): `Status`; 0 in a request
         8     4  flags (u32): bit 0 `FLAG_REPLY` (set in every reply); the others zero
        12     4  request id (u32): chosen by the client, echoed by the reply
        16     4  key length (u32)
        20     4  reserved, zero
        24     8  payload length (u64)
        32     8  argument (u64): in a GET, the most payload bytes the client accepts; in
                  a TOO_LARGE reply, the length of the value that was not sent; else 0
        40     4  reserved, zero
        44     4  header checksum (u32): zlib.crc32 of bytes [0, 44)
        48     -  key (key length bytes; UTF-8 for the services of lmcache), then payload

`HEADER_SIZE` is 48. Every version of the protocol begins with the same 6 bytes (magic
and version), so a peer of another version is recognised from them before anything
else is read: it gets a reply of this version with status `Status.BAD_VERSION` and a
message saying which version this side speaks, and the connection is closed. A client
may also send `Op.HELLO` first: the reply's payload is a JSON object with the service's
name (``service``), its protocol version and its limits, so that a client notices it
reached the wrong kind of service and never sends a frame over the peer's limits.

Bounds
    Every length is checked against `Limits` before anything is allocated or read: the
    key against ``max_key``, the payload of a request against ``max_payload`` (``PUT``)
    or ``max_message`` (every other operation), the payload of a reply against what the
    client asked for (the ``argument`` of a GET; ``max_message`` otherwise). A GET
    names the most bytes the client accepts; a longer value is not sent (the reply is
    `Status.TOO_LARGE` without payload). A frame that breaks these rules, has a bad
    magic, checksum or reserved field, or arrives as a reply where a request was due is
    answered with `Status.BAD_FRAME` (`Status.OVER_LIMIT` for a length over a limit)
    and the connection is closed: after a bad frame nothing on it can be trusted. A
    well-formed frame of an operation the service does not know is answered with
    `Status.UNKNOWN_OP`, its key and payload skipped, and the connection goes on.
Integrity
    The header checksum covers the header; the payloads that lmcache stores are the
    self-describing objects of `lmcache.kits.object_format` (magic, key digest, payload
    checksum), which the reader verifies, so the protocol adds no payload checksum.
    Nothing received is unpickled or evaluated: keys are bytes, payloads are bytes or
    JSON (`Op.STATS`, `Op.HELLO`, error messages as UTF-8 text).
Time
    Every blocking helper takes a ``deadline`` (`time.monotonic`): it sets the socket's
    timeout to what is left before each system call and raises `TimeoutError` when the
    deadline passes, so one frame can never take longer than its deadline however the
    peer dribbles its bytes.

Blocking sockets, for threads: `send_frame` (a frame from several buffers, none of them
joined), `recv_exactly` (into a preallocated buffer), `recv_header`, `discard`, and
`WireClient`, one client connection (`WireClient.call`: one request, its reply, every
check; the payload of the reply received into a buffer, or by a ``sink`` into memory of
its choosing). For asyncio: `read_header`, `read_exactly` and `write_frame` over a
``StreamReader`` / ``StreamWriter``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import select
import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from lmcache.utils import Buffer

__all__ = [
    "CACHE_SERVER",
    "CLOSING",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "MAGIC",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "ConnectionClosed",
    "FrameHeader",
    "Limits",
    "Op",
    "PayloadReader",
    "ProtocolError",
    "Reply",
    "Status",
    "VersionMismatch",
    "WireClient",
    "check_prefix",
    "decode_header",
    "discard",
    "encode_header",
    "read_exactly",
    "read_header",
    "recv_exactly",
    "receive_buffer",
    "recv_header",
    "reply_header",
    "send_frame",
    "write_frame",
]

MAGIC = b"LMCW"
PROTOCOL_VERSION = 1
#: The ``service`` of lmcache's cache server in its HELLO reply (``lm://``).
CACHE_SERVER = "lmcache.cache_server"
#: Bit 0 of ``flags``: the frame is a reply.
FLAG_REPLY = 0x1
_FIELDS = struct.Struct("<4sHBBIIIIQQI")  # everything before the header checksum
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 48
#: The bytes that every version of the protocol begins with: magic and version.
PREFIX_SIZE = 6
_U32 = 0xFFFFFFFF


class Op(IntEnum):
    """Operations. A service answers the ones it does not know with UNKNOWN_OP."""

    #: Payload of the reply: JSON ``{"service", "protocol", "limits": {...}}``.
    HELLO = 1
    #: Nothing; the reply is OK.
    PING = 2
    #: Store the payload under the key (atomically: whole or not at all).
    PUT = 3
    #: The value of the key, if at most ``argument`` bytes long.
    GET = 4
    #: OK when the key is stored, NOT_FOUND when not.
    EXISTS = 5
    #: Delete the key: OK when it was stored, NOT_FOUND when not.
    DELETE = 6
    #: Payload of the reply: the service's counters as a JSON object.
    STATS = 7


class Status(IntEnum):
    """Outcome of a request, in its reply."""

    OK = 0
    NOT_FOUND = 1
    #: A GET's value is longer than the ``argument``: not sent; the argument of the
    #: reply is its length.
    TOO_LARGE = 2
    #: A PUT the service has no room for: not stored (its payload was read and dropped).
    NO_SPACE = 3
    #: A well-formed request the service refuses (a key it does not accept, an empty
    #: value); the payload is a message.
    BAD_REQUEST = 4
    #: A malformed frame; the connection is closed.
    BAD_FRAME = 5
    #: The peer speaks another protocol version; the connection is closed.
    BAD_VERSION = 6
    UNKNOWN_OP = 7
    #: The service serves as many connections as it may; this one is closed.
    BUSY = 8
    SERVER_ERROR = 9
    #: A frame's key or payload length is over the receiver's limit; the connection is
    #: closed (the bytes announced are not read).
    OVER_LIMIT = 10


#: Statuses after which the service closes the connection.
CLOSING = frozenset({Status.BAD_FRAME, Status.BAD_VERSION, Status.BUSY,
                     Status.OVER_LIMIT})


@dataclass(frozen=True)
class Limits:
    """The largest lengths a side accepts; everything longer is refused before it is
    read."""

    #: Bytes of a key.
    max_key: int = 1024
    #: Bytes of a PUT's payload (one value).
    max_payload: int = 1 << 30
    #: Bytes of any other payload: requests other than PUT, and replies other than a
    #: GET's value (STATS, HELLO, error messages).
    max_message: int = 1 << 20

    def request_payload(self, op: int) -> int:
        """The longest payload a request of ``op`` may carry."""
        return self.max_payload if op == Op.PUT else self.max_message

    def as_dict(self) -> dict[str, int]:
        return {"max_key": self.max_key, "max_payload": self.max_payload,
                "max_message": self.max_message}


class ProtocolError(ConnectionError):
    """A frame broke the protocol; the connection cannot be used any more.

    ``status`` is what a service answers with before it closes the connection.
    """

    status: Status = Status.BAD_FRAME

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol."""

    status = Status.BAD_VERSION


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (before or in the middle of a frame)."""


@dataclass(frozen=True)
class FrameHeader:
    """A decoded header (see the module documentation for the fields)."""

    op: int
    status: int
    flags: int
    request_id: int
    key_len: int
    payload_len: int
    arg: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def encode_header(op: int, *, status: int = 0, reply: bool = False, request_id: int = 0,
                  key_len: int = 0, payload_len: int = 0, arg: int = 0,
                  version: int = PROTOCOL_VERSION) -> bytes:
    """The 48 header bytes of a frame."""
    fields = _FIELDS.pack(MAGIC, version, op, status, FLAG_REPLY if reply else 0,
                          request_id & _U32, key_len, 0, payload_len, arg, 0)
    return fields + _CRC.pack(zlib.crc32(fields))


def check_prefix(prefix: Buffer) -> None:
    """Check the first `PREFIX_SIZE` bytes of a frame (magic and version): raises
    `ProtocolError` for anything that is not this protocol, `VersionMismatch` for
    another version of it."""
    view = memoryview(prefix)
    if bytes(view[:4]) != MAGIC:
        raise ProtocolError(f"not an lmcache wire frame: magic {bytes(view[:4])!r}, expected "
                            f"{MAGIC!r}")
    version = int.from_bytes(view[4:6], "little")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"the peer speaks lmcache wire protocol version {version}; this "
                              f"side speaks version {PROTOCOL_VERSION}")


def decode_header(data: Buffer, limits: Limits, *, max_payload: int | None = None
                  ) -> FrameHeader:
    """Decode and check a whole header: magic, version, checksum, reserved fields, and
    the key and payload lengths against ``limits`` (the payload against ``max_payload``
    when given, else against what a request of its operation may carry). Raises
    `ProtocolError` (``status`` OVER_LIMIT for a length over a limit)."""
    view = memoryview(data)
    if view.nbytes != HEADER_SIZE:
        raise ProtocolError(f"a header is {HEADER_SIZE} bytes, got {view.nbytes}")
    check_prefix(view[:PREFIX_SIZE])
    (_, _, op, status, flags, request_id, key_len, reserved1, payload_len, arg,
     reserved2) = _FIELDS.unpack(view[:_FIELDS.size])
    (crc,) = _CRC.unpack(view[_FIELDS.size:])
    if zlib.crc32(view[:_FIELDS.size]) != crc:
        raise ProtocolError("bad header checksum")
    if reserved1 or reserved2 or flags & ~FLAG_REPLY:
        raise ProtocolError("reserved header fields or flags are not zero")
    if key_len > limits.max_key:
        raise ProtocolError(f"key of {key_len} bytes, over the limit of {limits.max_key}",
                            Status.OVER_LIMIT)
    limit = limits.request_payload(op) if max_payload is None else max_payload
    if payload_len > limit:
        raise ProtocolError(f"payload of {payload_len} bytes, over the limit of {limit} for "
                            f"operation {op}", Status.OVER_LIMIT)
    return FrameHeader(op, status, flags, request_id, key_len, payload_len, arg)


# ---------------------------------------------------------------------------------------
# Blocking sockets
# ---------------------------------------------------------------------------------------


def _set_timeout(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the frame's deadline passed")
    sock.settimeout(remaining)


def _byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    views = []
    for b in buffers:
        v = b if isinstance(b, memoryview) else memoryview(b)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if v.nbytes:
            views.append(v)
    return views


def send_frame(sock: socket.socket, buffers: Sequence[Buffer],
               deadline: float | None = None) -> int:
    """Send ``buffers`` (a header, a key, the payload's pieces) one after the other, as
    one stream of bytes, without joining them (``sendmsg`` with all of them, resumed
    after a partial send). Returns the bytes sent."""
    views = _byte_views(buffers)
    total = sum(v.nbytes for v in views)
    while views:
        _set_timeout(sock, deadline)
        sent = sock.sendmsg(views)
        while sent:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0
    return total


def recv_exactly(sock: socket.socket, buffer: Buffer, deadline: float | None = None) -> None:
    """Fill ``buffer`` (preallocated, writable) from ``sock``; `ConnectionClosed` if the
    peer closes first, `TimeoutError` past the deadline."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    n = view.nbytes
    got = 0
    while got < n:
        _set_timeout(sock, deadline)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionClosed(f"the peer closed the connection after {got} of {n} "
                                   "bytes")
        got += k


def discard(sock: socket.socket, n: int, deadline: float | None = None,
            scratch: bytearray | None = None) -> None:
    """Read and drop ``n`` bytes (a payload that is not kept), 1 MiB at a time."""
    buf = scratch if scratch is not None else bytearray(min(n, 1 << 20))
    view = memoryview(buf)
    while n > 0:
        piece = min(n, view.nbytes)
        recv_exactly(sock, view[:piece], deadline)
        n -= piece


def recv_header(sock: socket.socket, limits: Limits, deadline: float | None = None, *,
                buffer: bytearray | None = None, max_payload: int | None = None
                ) -> FrameHeader:
    """Receive and check one header (see `decode_header`). The magic and version are
    checked on the first `PREFIX_SIZE` bytes, before the rest is waited for."""
    buf = buffer if buffer is not None else bytearray(HEADER_SIZE)
    view = memoryview(buf)
    recv_exactly(sock, view[:PREFIX_SIZE], deadline)
    check_prefix(view[:PREFIX_SIZE])
    recv_exactly(sock, view[PREFIX_SIZE:HEADER_SIZE], deadline)
    return decode_header(view[:HEADER_SIZE], limits, max_payload=max_payload)


def reply_header(request: FrameHeader | None, status: int, *, op: int | None = None,
                 payload_len: int = 0, arg: int = 0) -> bytes:
    """The header of the reply to ``request`` (``None``: to a frame that could not be
    decoded; request id 0)."""
    if op is None:
        op = request.op if request is not None else 0
    return encode_header(op, status=status, reply=True,
                         request_id=request.request_id if request is not None else 0,
                         payload_len=payload_len, arg=arg)


#: From this size on, `receive_buffer` gives numpy memory.
_BIG_BUFFER = 1 << 20


def receive_buffer(n: int) -> bytearray | memoryview:
    """Writable memory of ``n`` bytes to receive a payload into. A large one is a numpy
    array's (as a memoryview): it is not zero-filled first, and numpy asks the kernel
    for huge pages, so the memory costs a few page faults instead of thousands (a
    ``bytearray`` of 32 MiB costs about five times the copy into it)."""
    if n < _BIG_BUFFER:
        return bytearray(n)
    return memoryview(np.empty(n, dtype=np.uint8)).cast("B")


class PayloadReader:
    """The payload of a reply as it arrives, for a ``sink`` of `WireClient.call` that
    receives it into memory of its own choosing (a chunk's memory object, say) instead
    of a buffer: `read` small pieces (a header), `read_into` the rest. Never more than
    the payload's length; what the sink leaves is skipped."""

    def __init__(self, sock: socket.socket, length: int, deadline: float | None) -> None:
        self._sock = sock
        self._deadline = deadline
        self.remaining = length

    def read_into(self, buffer: Buffer) -> None:
        view = memoryview(buffer).cast("B")
        if view.nbytes > self.remaining:
            raise ValueError(f"{view.nbytes} bytes asked for, {self.remaining} left")
        recv_exactly(self._sock, view, self._deadline)
        self.remaining -= view.nbytes

    def read(self, n: int) -> bytearray:
        """The next ``n`` bytes (at most what is left)."""
        buf = bytearray(min(n, self.remaining))
        self.read_into(buf)
        return buf

    def skip_rest(self) -> None:
        if self.remaining:
            discard(self._sock, self.remaining, self._deadline)
            self.remaining = 0


@dataclass
class Reply:
    """A reply received by `WireClient.call`: its status, argument and payload (a
    ``bytearray``, or a memoryview of numpy memory when large: see `receive_buffer`), or
    what the call's ``sink`` made of the payload (``value``; the payload is then empty)."""

    status: Status
    arg: int
    payload: bytearray | memoryview
    value: Any = None

    def message(self) -> str:
        """The payload as text (the message of an error reply)."""
        return bytes(self.payload).decode("utf-8", "replace")


class WireClient:
    """One blocking client connection to a service of this protocol, for one thread at
    a time (a pool of them serves many threads).

    `connect` opens it and exchanges `Op.HELLO`: ``info`` is the service's answer, and
    ``expect_service`` (when given) must be its ``service``. Every call takes a
    ``deadline`` for the whole exchange. After any exception the connection is closed
    and must not be used again (`closed`).
    """

    def __init__(self, sock: socket.socket, limits: Limits | None = None) -> None:
        self.sock = sock
        self.limits = limits or Limits()
        self.info: dict[str, Any] = {}
        self.closed = False
        self._ids = itertools.count(1)
        self._header = bytearray(HEADER_SIZE)

    @classmethod
    def connect(cls, host: str, port: int, deadline: float, *,
                expect_service: str | None = None, limits: Limits | None = None,
                hello: bool = True) -> WireClient:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left to connect")
        sock = socket.create_connection((host, port), timeout=remaining)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client = cls(sock, limits)
        if hello:
            try:
                client.hello(deadline, expect_service)
            except BaseException:
                client.close()
                raise
        return client

    def hello(self, deadline: float, expect_service: str | None = None) -> dict[str, Any]:
        reply = self.call(Op.HELLO, deadline=deadline)
        if reply.status != Status.OK:
            self.close()
            raise ProtocolError(f"HELLO answered {reply.status.name}: {reply.message()}")
        try:
            info = json.loads(bytes(reply.payload))
        except ValueError:
            info = None
        if not isinstance(info, dict):
            self.close()
            raise ProtocolError("HELLO answered something that is not a JSON object")
        if expect_service is not None and info.get("service") != expect_service:
            self.close()
            raise ProtocolError(f"reached {info.get('service')!r}, not {expect_service!r}")
        self.info = info
        return info

    @property
    def peer_limits(self) -> Limits:
        """The service's limits, from its HELLO (the protocol's defaults without one)."""
        got = self.info.get("limits") if isinstance(self.info, dict) else None
        if not isinstance(got, dict):
            return Limits()
        try:
            return Limits(**{k: int(got[k]) for k in ("max_key", "max_payload",
                                                      "max_message") if k in got})
        except (TypeError, ValueError):
            return Limits()

    def call(self, op: int, key: bytes = b"", parts: Sequence[Buffer] = (), *, arg: int = 0,
             max_reply: int | None = None, deadline: float | None = None,
             sink: Callable[[PayloadReader], Any] | None = None) -> Reply:
        """Send one request and receive its reply. ``max_reply`` bounds the reply's
        payload (default ``limits.max_message``); a longer one is a `ProtocolError`,
        found on its header before anything is allocated. With ``sink``, the payload of
        an OK reply is not received into a buffer: ``sink(reader)`` reads it (see
        `PayloadReader`) and its result is the reply's ``value``. Replies that end the
        connection close it here too: BAD_VERSION raises `VersionMismatch`; BAD_FRAME,
        BUSY and OVER_LIMIT raise `ProtocolError`."""
        if self.closed:
            raise ConnectionClosed("the connection is closed")
        try:
            return self._call(op, key, parts, arg, max_reply, deadline, sink)
        except BaseException:
            self.close()
            raise

    def _call(self, op: int, key: bytes, parts: Sequence[Buffer], arg: int,
              max_reply: int | None, deadline: float | None,
              sink: Callable[[PayloadReader], Any] | None) -> Reply:
        request_id = next(self._ids) & _U32
        payload = _byte_views(parts)
        size = sum(v.nbytes for v in payload)
        header = encode_header(op, request_id=request_id, key_len=len(key), payload_len=size,
                               arg=arg)
        send_frame(self.sock, [header, key, *payload], deadline)
        limit = self.limits.max_message if max_reply is None else max_reply
        got = recv_header(self.sock, self.limits, deadline, buffer=self._header,
                          max_payload=max(limit, self.limits.max_message))
        try:
            status = Status(got.status)
        except ValueError:
            raise ProtocolError(f"unknown status {got.status}") from None
        # a service that ends the connection may answer before it could read the request
        # (BUSY, a frame it could not decode): request id 0, operation 0
        ending = status in CLOSING and got.request_id == 0 and got.op == 0
        if not got.is_reply or got.key_len or not ending and (
                got.op != op or got.request_id != request_id):
            raise ProtocolError(f"not the reply to request {request_id} (op {got.op}, id "
                                f"{got.request_id}, reply={got.is_reply})")
        allowed = limit if status == Status.OK else self.limits.max_message
        if got.payload_len > allowed:
            raise ProtocolError(f"a {status.name} reply of {got.payload_len} bytes, more than "
                                f"the {allowed} accepted")
        if sink is not None and status == Status.OK and got.payload_len:
            reader = PayloadReader(self.sock, got.payload_len, deadline)
            value = sink(reader)
            reader.skip_rest()
            return Reply(status, got.arg, bytearray(), value)
        body = receive_buffer(got.payload_len)
        if got.payload_len:
            recv_exactly(self.sock, body, deadline)
        reply = Reply(status, got.arg, body)
        if status == Status.BAD_VERSION:
            raise VersionMismatch(reply.message())
        if status in CLOSING:
            raise ProtocolError(f"{status.name}: {reply.message()}", status)
        return reply

    def stale(self) -> bool:
        """Whether the connection is unusable before a request is sent: closed, or
        readable (the peer closed it, or sent bytes nobody asked for)."""
        if self.closed:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        """Shut the socket down (from any thread): a call blocked on it ends now."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------------------


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    """``n`` bytes (check ``n`` against a limit first); `ConnectionClosed` at EOF."""
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed(f"the peer closed the connection after {len(exc.partial)} "
                               f"of {n} bytes") from None


async def read_header(reader: asyncio.StreamReader, limits: Limits, *,
                      max_payload: int | None = None) -> FrameHeader:
    """Read and check one header (see `decode_header`); wrap it in
    ``asyncio.wait_for`` to bound the time it may take."""
    prefix = await read_exactly(reader, PREFIX_SIZE)
    check_prefix(prefix)
    rest = await read_exactly(reader, HEADER_SIZE - PREFIX_SIZE)
    return decode_header(prefix + rest, limits, max_payload=max_payload)


async def write_frame(writer: asyncio.StreamWriter, buffers: Sequence[Buffer]) -> None:
    """Write a frame's buffers (header, key, payload pieces) without joining them, then
    wait until the transport has taken them."""
    writer.writelines(_byte_views(buffers))
    await writer.drain()
