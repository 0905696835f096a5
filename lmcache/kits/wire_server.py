"""A threaded server of the wire protocol (`lmcache.kits.wire`): the part that the cache
server (`lmcache.server`) and the peer-to-peer chunk service (the ``p2p`` tier) share.

One thread accepts connections; each connection is served by a thread of its own, up to
``max_clients`` at once (one more is answered BUSY and closed). A connection waits at most
``idle_timeout_s`` for the first byte of a request; from then on the whole request
(header, key and payload) must arrive within ``frame_timeout_s``, and the reply is sent
within the same deadline, so a client that stalls or dribbles mid-frame holds its thread
for a bounded time and then loses its connection. Lengths are checked against the
`Limits` before anything is allocated or read (`lmcache.kits.wire.recv_header`). A bad
frame is answered (`Status.BAD_FRAME`, `Status.BAD_VERSION`, `Status.OVER_LIMIT`) and
its connection closed; an unknown operation is answered `Status.UNKNOWN_OP` and the
connection goes on. Nothing a client sends can stop the server or another connection.

A service subclasses `FrameServer`, names its ``service`` and ``operations`` and
implements `FrameServer.handle`, which reads the request's payload through the `Frame`
it is given (into memory of its choice) and sends exactly one reply.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from lmcache.kits.wire import (
    HEADER_SIZE,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    ConnectionClosed,
    FrameHeader,
    Limits,
    Op,
    ProtocolError,
    Status,
    check_prefix,
    decode_header,
    discard,
    recv_exactly,
    reply_header,
    send_frame,
)
from lmcache.utils import Buffer

__all__ = ["Frame", "FrameServer"]

logger = logging.getLogger(__name__)

#: How long a BUSY or error reply may take to send before the connection is dropped.
_ERROR_REPLY_S = 1.0
#: Connections answered BUSY at once; beyond that, one over the limit is just closed.
_MAX_REFUSING = 16


class Frame:
    """The request being served: its header and key, the payload still to be read, and
    the connection's deadline for both the rest of the request and the reply."""

    __slots__ = ("header", "key", "deadline", "_sock", "_scratch", "_payload_left",
                 "replied", "sent_bytes")

    def __init__(self, sock: socket.socket, header: FrameHeader, key: bytes, deadline: float,
                 scratch: bytearray | None = None) -> None:
        self.header = header
        self.key = key
        self.deadline = deadline
        self._sock = sock
        self._scratch = scratch
        self._payload_left = header.payload_len
        self.replied = False
        self.sent_bytes = 0

    @property
    def payload_len(self) -> int:
        return self.header.payload_len

    def read_payload_into(self, buffer: Buffer) -> None:
        """Receive the whole payload into ``buffer`` (exactly `payload_len` bytes)."""
        view = memoryview(buffer).cast("B")
        if view.nbytes != self._payload_left:
            raise ValueError(f"the payload has {self._payload_left} bytes left, the buffer "
                             f"is {view.nbytes}")
        recv_exactly(self._sock, view, self.deadline)
        self._payload_left = 0

    def skip_payload(self) -> None:
        """Read and drop what is left of the payload."""
        if self._payload_left:
            discard(self._sock, self._payload_left, self.deadline, self._scratch)
            self._payload_left = 0

    def reply(self, status: Status, parts: Sequence[Buffer] = (), *, arg: int = 0) -> None:
        """Send the reply (the payload's pieces not joined); skips what is left of the
        request's payload first."""
        self.skip_payload()
        views = [memoryview(p).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        self.sent_bytes += send_frame(
            self._sock, [reply_header(self.header, status, payload_len=size, arg=arg), *views],
            self.deadline)
        self.replied = True

    def reply_message(self, status: Status, message: str) -> None:
        self.reply(status, [message.encode("utf-8")[:4096]])

    def reply_json(self, obj: Any) -> None:
        self.reply(Status.OK, [json.dumps(obj, sort_keys=True).encode()])


class FrameServer:
    """Serves the wire protocol on ``host:port`` (see the module documentation).

    `start` binds and starts the accept thread (``port`` 0 picks a free port: read
    `address`); `stop` closes the listening socket and every connection. Subclasses set
    ``service`` and ``operations`` and implement `handle`; `Op.HELLO` and `Op.PING` are
    answered here.
    """

    #: The service's name in HELLO replies.
    service = "lmcache.frame_server"
    #: The operations `handle` serves, besides HELLO and PING.
    operations: frozenset[int] = frozenset()

    def __init__(self, host: str, port: int, *, limits: Limits | None = None,
                 max_clients: int = 256, idle_timeout_s: float = 300.0,
                 frame_timeout_s: float = 60.0, backlog: int = 128) -> None:
        if max_clients < 1 or not idle_timeout_s > 0 or not frame_timeout_s > 0:
            raise ValueError("max_clients must be >= 1 and the timeouts > 0, got "
                             f"{max_clients}, {idle_timeout_s}, {frame_timeout_s}")
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.max_clients = max_clients
        self.idle_timeout_s = float(idle_timeout_s)
        self.frame_timeout_s = float(frame_timeout_s)
        self.backlog = backlog
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._refusing = 0  # threads answering BUSY now
        self.started_at = time.time()
        self.counters = {"connections": 0, "refused_busy": 0, "bad_frames": 0,
                         "unknown_ops": 0, "timeouts": 0, "server_errors": 0, "requests": 0,
                         "bytes_in": 0, "bytes_out": 0}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The address listened on (the real port when ``port`` was 0)."""
        if self._listener is None:
            return self.host, self.port
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> FrameServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
            listener.listen(self.backlog)
        except BaseException:
            listener.close()
            raise
        listener.settimeout(0.25)  # the accept loop looks at the stop flag this often
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"{self.service}-accept")
        self._accept_thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop` (or ``timeout``); returns whether it stopped."""
        return self._stopped.wait(timeout)

    @property
    def num_clients(self) -> int:
        """Connections being served now (each holds one of ``max_clients``)."""
        with self._lock:
            return len(self._clients)

    def stop(self) -> None:
        """Stop accepting, close every connection (threads in a call end with it)."""
        self._stopped.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accept_thread is not None and \
                self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def info(self) -> dict[str, Any]:
        """The HELLO reply."""
        return {"service": self.service, "protocol": PROTOCOL_VERSION,
                "limits": self.limits.as_dict(),
                "operations": sorted(int(op) for op in {Op.HELLO, Op.PING, *self.operations})}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- connections -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.05)  # out of file descriptors, say: do not spin
                continue
            with self._lock:
                busy = len(self._clients) >= self.max_clients
                if not busy:
                    self._clients.add(sock)
                    self.counters["connections"] += 1
                else:
                    self.counters["refused_busy"] += 1
                    answer = self._refusing < _MAX_REFUSING
                    self._refusing += answer
            if busy:
                if answer:  # say why, on a thread of its own (a bounded number of them)
                    threading.Thread(target=self._refuse, args=(sock,), daemon=True,
                                     name=f"{self.service}-busy").start()
                else:
                    sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True,
                             name=f"{self.service}-conn").start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            self._send_error(sock, Status.BUSY, f"{self.service} serves {self.max_clients} "
                             "connections at most")
        finally:
            sock.close()
            with self._lock:
                self._refusing -= 1

    def _serve(self, sock: socket.socket) -> None:
        header_buf = bytearray(HEADER_SIZE)
        scratch = None  # for payloads that are skipped: made when first needed
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stopped.is_set():
                # idle: wait for the first byte of the next request
                sock.settimeout(self.idle_timeout_s)
                try:
                    if sock.recv_into(memoryview(header_buf)[:1]) == 0:
                        return  # closed between requests: the normal end
                except TimeoutError:
                    return  # idle for too long
                deadline = time.monotonic() + self.frame_timeout_s
                if not self._serve_one(sock, header_buf, scratch, deadline):
                    return
        except (ConnectionClosed, ConnectionError):
            pass  # the client went away mid-frame
        except TimeoutError:
            self._count("timeouts")  # it stalled mid-frame or did not read its reply
        except OSError as exc:
            logger.debug("%s: connection error: %s", self.service, exc)
        except Exception:
            self._count("server_errors")
            logger.exception("%s: a request failed; its connection is closed", self.service)
        finally:
            with self._lock:
                self._clients.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _serve_one(self, sock: socket.socket, header_buf: bytearray,
                   scratch: bytearray | None, deadline: float) -> bool:
        """One request whose first byte is in ``header_buf``; returns whether the
        connection goes on."""
        view = memoryview(header_buf)
        try:
            recv_exactly(sock, view[1:PREFIX_SIZE], deadline)
            check_prefix(view[:PREFIX_SIZE])  # another version: answered before more is read
            recv_exactly(sock, view[PREFIX_SIZE:], deadline)
            header = decode_header(view, self.limits)
            if header.is_reply:
                raise ProtocolError("a reply where a request was due")
        except ProtocolError as exc:
            self._count("bad_frames")
            logger.debug("%s: bad frame: %s", self.service, exc)
            self._send_error(sock, exc.status, str(exc))
            return False
        self._count("requests")
        key = bytearray(header.key_len)
        if header.key_len:
            recv_exactly(sock, key, deadline)
        frame = Frame(sock, header, bytes(key), deadline, scratch)
        op = header.op
        if op == Op.HELLO:
            frame.reply_json(self.info())
        elif op == Op.PING:
            frame.reply(Status.OK)
        elif op in self.operations:
            try:
                self.handle(frame)
            except (ConnectionError, TimeoutError, OSError):
                raise
            except Exception:
                self._count("server_errors")
                logger.exception("%s: operation %s failed", self.service, op)
                if frame.replied:
                    return False
                frame.reply_message(Status.SERVER_ERROR, "the server failed on this request")
            if not frame.replied:
                raise RuntimeError(f"{type(self).__name__}.handle did not reply to {op}")
        else:
            self._count("unknown_ops")
            frame.reply_message(Status.UNKNOWN_OP, f"unknown operation {op}")
        self._count("bytes_in", HEADER_SIZE + header.key_len + header.payload_len)
        self._count("bytes_out", frame.sent_bytes)
        return True

    def _send_error(self, sock: socket.socket, status: Status, message: str) -> None:
        """Answer a frame that ends its connection. The connection is half-closed and
        what the client still sends is read (briefly, and bounded) before it is closed:
        closing with unread bytes would reset it, and the client lose the answer."""
        body = message.encode("utf-8")[:4096]
        deadline = time.monotonic() + _ERROR_REPLY_S
        try:
            send_frame(sock, [reply_header(None, status, payload_len=len(body)), body],
                       deadline)
            sock.shutdown(socket.SHUT_WR)
            scratch = bytearray(65536)
            for _ in range(16):
                sock.settimeout(max(min(deadline - time.monotonic(), 0.2), 0.001))
                if sock.recv_into(scratch) == 0:
                    break
        except OSError:
            pass

    # -- what a service implements -----------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        """Serve one request of `operations`: read (or skip) its payload and send exactly
        one reply through ``frame``. An exception other than a connection's is logged
        and answered SERVER_ERROR."""
        raise NotImplementedError

