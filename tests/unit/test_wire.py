"""The wire protocol's frames and helpers (`lmcache.kits.wire`), on socket pairs and an
in-process server: every header field is checked, every length is bounded before it is
read, a client checks every reply. The server process is exercised in
tests/integration/test_cache_server.py."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import zlib

import pytest

from lmcache.kits.wire import (
    FLAG_REPLY,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    ConnectionClosed,
    Limits,
    Op,
    ProtocolError,
    Status,
    VersionMismatch,
    WireClient,
    decode_header,
    discard,
    encode_header,
    read_exactly,
    read_header,
    recv_exactly,
    recv_header,
    send_frame,
    write_frame,
)
from lmcache.kits.wire_server import Frame, FrameServer

LIMITS = Limits(max_key=64, max_payload=1 << 20, max_message=4096)


def with_crc(fields: bytes) -> bytes:
    return fields + struct.pack("<I", zlib.crc32(fields))


def test_header_round_trip_and_layout():
    raw = encode_header(Op.GET, status=Status.NOT_FOUND, reply=True, request_id=7,
                        key_len=5, payload_len=9, arg=1234)
    assert len(raw) == HEADER_SIZE == 48
    assert raw[:4] == MAGIC and int.from_bytes(raw[4:6], "little") == PROTOCOL_VERSION
    assert raw[6] == Op.GET and raw[7] == Status.NOT_FOUND
    assert int.from_bytes(raw[44:48], "little") == zlib.crc32(raw[:44])
    h = decode_header(raw, LIMITS, max_payload=100)
    assert (h.op, h.status, h.request_id, h.key_len, h.payload_len, h.arg, h.is_reply) == \
        (Op.GET, Status.NOT_FOUND, 7, 5, 9, 1234, True)


@pytest.mark.parametrize(("mutate", "error", "match"), [
    (lambda b: b"XXXX" + b[4:], ProtocolError, "magic"),
    (lambda b: b[:4] + (2).to_bytes(2, "little") + b[6:], VersionMismatch, "version 2"),
    (lambda b: b[:20] + b"\x01" + b[21:], ProtocolError, "checksum"),
    (lambda b: with_crc(b[:20] + b"\x01" + b[21:44]), ProtocolError, "reserved"),
    (lambda b: with_crc(b[:8] + b"\x02" + b[9:44]), ProtocolError, "flags"),
    (lambda b: b[:30], ProtocolError, "48 bytes"),
])
def test_bad_headers_are_refused(mutate, error, match):
    raw = encode_header(Op.PUT, key_len=3, payload_len=10)
    with pytest.raises(error, match=match):
        decode_header(mutate(raw), LIMITS)


def test_lengths_over_the_limits_are_refused_before_anything_is_read():
    with pytest.raises(ProtocolError, match="key of 65 bytes") as e:
        decode_header(encode_header(Op.GET, key_len=65), LIMITS)
    assert e.value.status == Status.OVER_LIMIT
    # a PUT may carry max_payload; any other request max_message
    decode_header(encode_header(Op.PUT, payload_len=1 << 20), LIMITS)
    for op, n in [(Op.PUT, (1 << 20) + 1), (Op.GET, 4097), (Op.STATS, 1 << 40),
                  (Op.PUT, 2**64 - 1)]:
        with pytest.raises(ProtocolError, match="over the limit") as e:
            decode_header(encode_header(op, payload_len=n), LIMITS)
        assert e.value.status == Status.OVER_LIMIT


def test_send_frame_sends_pieces_without_joining_and_recv_exactly_fills_a_buffer():
    a, b = socket.socketpair()
    with a, b:
        payload = bytes(range(256)) * 8192  # 2 MiB: many partial sends
        pieces = [b"head", memoryview(payload)[:1000], memoryview(payload)[1000:]]
        sender = threading.Thread(target=send_frame, args=(a, pieces, time.monotonic() + 10))
        sender.start()
        got = bytearray(4 + len(payload))
        recv_exactly(b, got, time.monotonic() + 10)
        sender.join()
        assert bytes(got) == b"head" + payload


def test_recv_exactly_raises_on_eof_and_on_the_deadline():
    a, b = socket.socketpair()
    with b:
        a.sendall(b"abc")
        a.close()
        with pytest.raises(ConnectionClosed, match="after 3 of 10"):
            recv_exactly(b, bytearray(10), time.monotonic() + 5)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"ab")  # and then nothing: a dribbling peer
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_exactly(b, bytearray(10), time.monotonic() + 0.3)
        assert time.monotonic() - started < 1.0


def test_discard_and_recv_header():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 3000 + encode_header(Op.PING, request_id=3))
        discard(b, 3000, time.monotonic() + 5, bytearray(1024))
        assert recv_header(b, LIMITS, time.monotonic() + 5).request_id == 3
        a.sendall(b"LMCW" + (9).to_bytes(2, "little"))  # only the prefix of a v9 frame
        with pytest.raises(VersionMismatch):  # refused on the prefix, nothing more waited for
            recv_header(b, LIMITS, time.monotonic() + 5)


def test_asyncio_helpers_round_trip():
    async def main() -> None:
        async def serve(reader, writer):
            header = await read_header(reader, LIMITS)
            key = await read_exactly(reader, header.key_len)
            payload = await read_exactly(reader, header.payload_len)
            body = key + b"=" + payload
            await write_frame(writer, [encode_header(header.op, reply=True,
                                                     request_id=header.request_id,
                                                     payload_len=len(body)), body])
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(writer, [encode_header(Op.PUT, request_id=9, key_len=1,
                                                 payload_len=3), b"k", memoryview(b"abc")])
        header = await read_header(reader, LIMITS, max_payload=100)
        assert header.is_reply and header.request_id == 9
        assert await read_exactly(reader, header.payload_len) == b"k=abc"
        with pytest.raises(ConnectionClosed):
            await read_exactly(reader, 1)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# -- a client against servers that misbehave ---------------------------------------------


class _Scripted:
    """A one-connection server that answers each request with what ``reply`` returns."""

    def __init__(self, reply):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            try:
                while True:
                    h = recv_header(conn, Limits(), time.monotonic() + 10)
                    discard(conn, h.key_len + h.payload_len, time.monotonic() + 10)
                    out = self.reply(h)
                    if out is None:
                        return
                    conn.sendall(out)
            except (OSError, ProtocolError):
                return

    def close(self):
        self.listener.close()


def _hello_reply(h):
    body = json.dumps({"service": "test", "protocol": 1, "limits": {}}).encode()
    return encode_header(h.op, reply=True, request_id=h.request_id,
                         payload_len=len(body)) + body


@pytest.mark.parametrize(("answer", "match"), [
    # a value longer than the client asked for: refused on the header, nothing allocated
    (lambda h: encode_header(h.op, reply=True, request_id=h.request_id,
                             payload_len=1 << 40), "over the limit|more than"),
    (lambda h: encode_header(h.op, reply=True, request_id=h.request_id + 1),
     "not the reply"),
    (lambda h: encode_header(Op.EXISTS, reply=True, request_id=h.request_id),
     "not the reply"),
    (lambda h: encode_header(h.op, reply=False, request_id=h.request_id), "not the reply"),
    (lambda h: encode_header(h.op, status=200, reply=True, request_id=h.request_id),
     "unknown status"),
    (lambda h: encode_header(h.op, reply=True, request_id=h.request_id, version=3),
     "version 3"),
    (lambda h: b"HTTP/1.1 400 Bad Request\r\n\r\n" + b" " * 40, "not an lmcache"),
    (lambda h: None, "closed"),
])
def test_client_checks_every_reply(answer, match):
    replies = iter([_hello_reply, answer])
    server = _Scripted(lambda h: next(replies)(h))
    try:
        client = WireClient.connect("127.0.0.1", server.port, time.monotonic() + 5)
        assert client.info["service"] == "test"
        with pytest.raises((ProtocolError, ConnectionClosed), match=match):
            client.call(Op.GET, b"k", arg=1000, max_reply=1000,
                        deadline=time.monotonic() + 5)
        assert client.closed  # never reused after a bad reply
    finally:
        server.close()


def test_client_gives_up_at_its_deadline_when_the_server_never_answers():
    server = _Scripted(lambda h: b"" if h.op == Op.PING else _hello_reply(h))
    try:
        client = WireClient.connect("127.0.0.1", server.port, time.monotonic() + 5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.call(Op.PING, deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 1.0
    finally:
        server.close()


def test_client_expects_the_service_it_asked_for():
    server = _Scripted(_hello_reply)
    try:
        with pytest.raises(ProtocolError, match="reached 'test'"):
            WireClient.connect("127.0.0.1", server.port, time.monotonic() + 5,
                               expect_service="lmcache.cache_server")
    finally:
        server.close()


# -- the frame server, in process ----------------------------------------------------------


class _Echo(FrameServer):
    service = "test.echo"
    operations = frozenset({Op.PUT})

    def handle(self, frame: Frame) -> None:
        data = bytearray(frame.payload_len)
        frame.read_payload_into(data)
        frame.reply(Status.OK, [frame.key, data])


@pytest.fixture
def echo():
    server = _Echo("127.0.0.1", 0, limits=LIMITS, frame_timeout_s=0.5, max_clients=3).start()
    yield server
    server.stop()


def _raw(server) -> socket.socket:
    return socket.create_connection(server.address, timeout=5)


def _error_of(sock) -> tuple[int, str]:
    h = recv_header(sock, Limits(), time.monotonic() + 5)
    body = bytearray(h.payload_len)
    recv_exactly(sock, body, time.monotonic() + 5)
    return h.status, body.decode()


def test_frame_server_hello_ping_and_a_request(echo):
    client = WireClient.connect(*echo.address, time.monotonic() + 5, expect_service="test.echo")
    assert client.info["protocol"] == PROTOCOL_VERSION
    assert client.peer_limits == LIMITS
    assert client.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
    reply = client.call(Op.PUT, b"key", [b"val", b"ue"], max_reply=100,
                        deadline=time.monotonic() + 5)
    assert reply.status == Status.OK and bytes(reply.payload) == b"keyvalue"
    reply = client.call(Op.GET, b"k", deadline=time.monotonic() + 5)  # not served here
    assert reply.status == Status.UNKNOWN_OP and not client.closed
    client.close()


def test_frame_server_answers_bad_frames_and_closes_only_them(echo):
    good = WireClient.connect(*echo.address, time.monotonic() + 5)
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 30, Status.BAD_FRAME),
        (encode_header(Op.PUT, version=2), Status.BAD_VERSION),
        (encode_header(Op.PUT)[:-1] + b"\x00", Status.BAD_FRAME),  # header checksum
        (encode_header(Op.PUT, key_len=1000), Status.OVER_LIMIT),
        (encode_header(Op.PUT, payload_len=1 << 40), Status.OVER_LIMIT),
        (encode_header(Op.PING, reply=True), Status.BAD_FRAME),
    ]
    for data, status in cases:
        with _raw(echo) as s:
            s.sendall(data)
            got, message = _error_of(s)
            assert got == status, message
            assert s.recv(1) == b""  # and the connection is closed
        # the server frees the slot once it sees the close (soon, even on a loaded machine)
        deadline = time.monotonic() + 10
        while echo.num_clients > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert good.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
    assert echo.counters["bad_frames"] == len(cases)


def test_frame_server_drops_a_stalled_frame_and_serves_others(echo):
    with _raw(echo) as stalled:
        stalled.sendall(encode_header(Op.PUT, key_len=1, payload_len=1000) + b"k" + b"x" * 10)
        client = WireClient.connect(*echo.address, time.monotonic() + 5)
        assert client.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
        stalled.settimeout(5)
        started = time.monotonic()
        assert stalled.recv(1) == b""  # closed after frame_timeout_s
        assert time.monotonic() - started < 2.0
    assert echo.counters["timeouts"] >= 1
    assert client.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK


def test_frame_server_refuses_connections_beyond_max_clients(echo):
    held = [WireClient.connect(*echo.address, time.monotonic() + 5) for _ in range(3)]
    with pytest.raises(ProtocolError, match="BUSY"):
        WireClient.connect(*echo.address, time.monotonic() + 5)
    held.pop().close()
    time.sleep(0.2)
    WireClient.connect(*echo.address, time.monotonic() + 5).close()
    for c in held:
        c.close()


def test_reply_flag_constant():
    assert FLAG_REPLY == 1
