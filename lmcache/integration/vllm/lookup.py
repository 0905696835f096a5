"""How vLLM's scheduler asks the workers' cache engine what it holds.

The scheduler decides how many prompt tokens to load (``get_num_new_matched_tokens``),
but the chunks live in the cache engine of the workers. When the scheduler and worker 0
share a process (vLLM's single-worker executor), the scheduler calls that engine
directly. Otherwise worker 0 answers over a Unix socket named after vLLM's instance id:
a request is a small JSON header and the prompt as little-endian int32; the answer is the
number of cached prefix tokens. Nothing is unpickled. A worker that does not answer
within `LOOKUP_TIMEOUT_S` counts as "nothing cached": vLLM computes the prompt.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from lmcache.kernel.cache_engine import LMCacheEngine

logger = logging.getLogger(__name__)

#: Longest the scheduler waits for worker 0 to answer a lookup.
LOOKUP_TIMEOUT_S = 5.0
_MAX_MESSAGE = 64 << 20

# engines of worker 0 in this process, by vLLM instance id
_local_engines: dict[str, LMCacheEngine] = {}
_local_lock = threading.Lock()


def socket_path(instance_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in instance_id)[:64]
    return os.path.join(tempfile.gettempdir(), f"lmcache-lookup-{os.getuid()}-{safe}.sock")


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise ConnectionError("lookup peer closed the connection")
        buf += piece
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exactly(sock, 8))
    if n > _MAX_MESSAGE:
        raise ValueError(f"lookup message of {n} bytes; expected at most {_MAX_MESSAGE}")
    return _recv_exactly(sock, n)


def _encode(tokens: Sequence[int], cache_salt: str | None) -> bytes:
    header = json.dumps({"cache_salt": cache_salt, "n": len(tokens)}).encode()
    return struct.pack("<I", len(header)) + header + np.asarray(tokens, "<i4").tobytes()


def _decode(data: bytes) -> tuple[torch.Tensor, str | None]:
    (hlen,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + hlen])
    tokens = np.frombuffer(data, "<i4", offset=4 + hlen)
    if tokens.size != int(header["n"]):
        raise ValueError(f"lookup request announces {header['n']} tokens, carries "
                         f"{tokens.size}")
    salt = header.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ValueError("cache_salt must be a string or null")
    return torch.from_numpy(tokens.astype(np.int64)), salt


class LookupServer:
    """Worker 0's side: answers lookups against its engine, on a daemon thread."""

    def __init__(self, instance_id: str, engine: LMCacheEngine) -> None:
        self.path = socket_path(instance_id)
        self.engine = engine
        with _local_lock:
            _local_engines[instance_id] = engine
        self.instance_id = instance_id
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while True:
                    try:
                        data = _recv(self.request)
                    except (ConnectionError, OSError):
                        return
                    try:
                        tokens, salt = _decode(data)
                        hit = owner.engine.lookup(tokens, cache_salt=salt)
                    except Exception as exc:  # a bad request costs a miss, not the worker
                        logger.warning("lmcache lookup failed: %s: %s", type(exc).__name__, exc)
                        hit = 0
                    _send(self.request, struct.pack("<q", hit))

        if os.path.exists(self.path):
            os.unlink(self.path)  # left by a process that died
        self._server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self._server.daemon_threads = True
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="lmcache-lookup", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with _local_lock:
            if _local_engines.get(self.instance_id) is self.engine:
                del _local_engines[self.instance_id]
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class LookupClient:
    """The scheduler's side: the in-process engine when there is one, else the socket."""

    def __init__(self, instance_id: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> None:
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def lookup(self, tokens: Sequence[int], cache_salt: str | None) -> int:
        """Cached prefix tokens of ``tokens``; 0 when worker 0 cannot be asked."""
        with _local_lock:
            engine = _local_engines.get(self.instance_id)
        if engine is not None:
            return engine.lookup(torch.tensor(tokens, dtype=torch.int64), cache_salt=cache_salt)
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout_s)
                    sock.connect(socket_path(self.instance_id))
                    self._sock = sock
                _send(self._sock, _encode(tokens, cache_salt))
                (hit,) = struct.unpack("<q", _recv(self._sock))
                return int(hit)
            except (OSError, ValueError, struct.error) as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if not self._warned:
                    self._warned = True
                    logger.warning("lmcache: worker 0 did not answer a lookup (%s: %s); "
                                   "treating prompts as not cached until it does (logged "
                                   "once)", type(exc).__name__, exc)
                return 0

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
