"""How vLLM's scheduler asks the workers' cache engine what it holds.

The scheduler decides how many prompt tokens to load (``get_num_new_matched_tokens``),
but the chunks live in the cache engine of the workers. When the scheduler and worker 0
share a process (vLLM's single-worker executor), the scheduler calls that engine
directly. Otherwise worker 0 answers over a Unix socket named after vLLM's instance id:
a request is a small JSON header and the prompt as little-endian int32; the answer is the
number of cached prefix tokens. Nothing is unpickled. A worker that does not answer
within `LOOKUP_TIMEOUT_S` counts as "nothing cached": vLLM computes the prompt.

Only the user who runs vLLM can take part (a socket at a predictable name in the shared
temporary directory could be bound first by anyone, who would then answer the lookups):

* the socket lives in a private directory of ours (`socket_dir`): a real directory, not a
  symlink, owned by our uid, with no access for group or others. It is created with mode
  0700; one that exists and is not like that is refused, never repaired or deleted;
* both ends check the peer's credentials (``SO_PEERCRED``): the server answers only
  clients of our uid, the client believes only a server of our uid;
* the client believes only a plausible answer: a count in ``[0, len(tokens)]``.

When anything of this does not hold, the worker does not crash: its server logs an error
and serves nothing (the in-process path still works), and the scheduler gets misses, so
vLLM computes every prompt. A broken lookup channel costs speed, never correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from lmcache.kernel.cache_engine import LMCacheEngine

logger = logging.getLogger(__name__)

#: Longest the scheduler waits for worker 0 to answer a lookup.
LOOKUP_TIMEOUT_S = 5.0
#: Longest worker 0 waits for the next byte of a client; an idle or slow connection is
#: then dropped and its thread freed (the scheduler reconnects at its next lookup).
SERVER_READ_TIMEOUT_S = 5.0
#: Connections the server's listen queue holds while it accepts (socketserver's is 5).
LISTEN_BACKLOG = 128
#: Connections worker 0 serves at once; more wait in the listen queue.
MAX_HANDLERS = 32
_MAX_MESSAGE = 64 << 20
_MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL

# engines of worker 0 in this process, by vLLM instance id
_local_engines: dict[str, LMCacheEngine] = {}
_local_lock = threading.Lock()


def _is_private(st: os.stat_result) -> bool:
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & 0o077)


def socket_dir() -> str:
    """The private directory of the lookup sockets of this user (not created here).

    ``$XDG_RUNTIME_DIR/lmcache`` when ``XDG_RUNTIME_DIR`` is a directory of ours with
    mode 0700, else ``<tempfile.gettempdir()>/lmcache-<uid>``. The scheduler and the
    workers are processes of the same user with the same environment, so they agree.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            if _is_private(os.lstat(runtime)):
                return os.path.join(runtime, "lmcache")
        except OSError:
            pass
    return os.path.join(tempfile.gettempdir(), f"lmcache-{os.getuid()}")


def private_socket_dir(create: bool = False) -> str:
    """`socket_dir`, checked to be private; created with mode 0700 when ``create``.

    :raises PermissionError: it exists and is a symlink, not a directory, not ours, or
        open to group or others; it is left as it is.
    :raises FileNotFoundError: it does not exist and ``create`` is false.
    """
    path = socket_dir()
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    uid = os.getuid()
    expected = f"expected a directory (not a symlink) owned by uid {uid} with mode 0700"
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"lmcache lookup directory {path} is a symlink; {expected}")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"lmcache lookup directory {path} is not a directory; "
                              f"{expected}")
    if st.st_uid != uid:
        raise PermissionError(f"lmcache lookup directory {path} is owned by uid "
                              f"{st.st_uid}; {expected}")
    if st.st_mode & 0o077:
        raise PermissionError(f"lmcache lookup directory {path} has mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, open to group or others; "
                              f"{expected}")
    return path


def socket_path(instance_id: str) -> str:
    """Where worker 0 of vLLM instance ``instance_id`` listens; checks and creates nothing."""
    directory = socket_dir()
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in instance_id)[:64]
    path = os.path.join(directory, f"lookup-{safe}.sock")
    if len(os.fsencode(path)) > _MAX_SUN_PATH:  # a long temporary directory
        digest = hashlib.sha256(instance_id.encode()).hexdigest()[:16]
        path = os.path.join(directory, f"lookup-{digest}.sock")
    return path


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of ``sock``; None where the platform
    cannot tell (no ``SO_PEERCRED`` outside Linux): there only the private directory
    keeps other users out."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("lookup peer too slow")
            sock.settimeout(left)
        piece = sock.recv(n - len(buf))
        if not piece:
            raise ConnectionError("lookup peer closed the connection")
        buf += piece
    return bytes(buf)


def _recv(sock: socket.socket, deadline: float | None = None) -> bytes:
    """One message; all of it by ``deadline`` (`time.monotonic`) when one is given."""
    (n,) = struct.unpack("<Q", _recv_exactly(sock, 8, deadline))
    if n > _MAX_MESSAGE:
        raise ValueError(f"lookup message of {n} bytes; expected at most {_MAX_MESSAGE}")
    return _recv_exactly(sock, n, deadline)


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


def _claim(path: str) -> None:
    """Make room for our socket at ``path``: a socket of ours left there (by a worker that
    died) is removed; anything else is refused and left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
        os.unlink(path)
        return
    what = "a socket" if stat.S_ISSOCK(st.st_mode) else "not a socket"
    raise PermissionError(f"{path} exists ({what}, owned by uid {st.st_uid}); expected "
                          f"nothing or a socket of uid {os.getuid()}; not replacing it")


_HANDLER_THREAD = "lmcache-lookup-conn"


class _UnixServer(socketserver.UnixStreamServer):
    """A thread per connection, at most ``max_handlers`` at once; each connection is
    dropped when its client does not send a whole request within ``read_timeout_s``
    (idle, or slow); only our uid is served."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, path: str, handler: type[socketserver.BaseRequestHandler],
                 read_timeout_s: float, max_handlers: int) -> None:
        self.read_timeout_s = read_timeout_s
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._closing = threading.Event()
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        self._refused_logged = False
        super().__init__(path, handler)

    def verify_request(self, request, client_address) -> bool:  # type: ignore[override]
        try:
            uid = _peer_uid(request)
        except OSError:
            return False
        if uid is None or uid == os.getuid():
            return True
        if not self._refused_logged:
            self._refused_logged = True
            logger.warning("lmcache lookup server %s: refused a client of uid %d (only uid "
                           "%d is served; logged once)", self.server_address, uid,
                           os.getuid())
        return False

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        # at most max_handlers threads: the accept loop waits for one to finish, while
        # further clients wait in the listen queue
        while not self._slots.acquire(timeout=0.1):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        with self._active_lock:
            self._active.add(request)
        try:
            threading.Thread(target=self._serve_connection, args=(request, client_address),
                             name=_HANDLER_THREAD, daemon=True).start()
        except BaseException:
            self._done(request)
            self.shutdown_request(request)
            raise

    def _serve_connection(self, request, client_address) -> None:
        try:
            request.settimeout(self.read_timeout_s)  # the handler narrows it per message
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._done(request)
            self.shutdown_request(request)

    def _done(self, request) -> None:
        with self._active_lock:
            self._active.discard(request)
        self._slots.release()

    def close_connections(self) -> None:
        """Refuse further connections and hang up on the open ones (their threads end)."""
        self._closing.set()
        with self._active_lock:
            active = list(self._active)
        for request in active:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LookupServer:
    """Worker 0's side: answers lookups against its engine, on a daemon thread.

    It never raises for the socket: when the private directory or the socket's path is
    not safe (see the module's docstring), or binding fails, it logs an error and serves
    only the in-process path; a scheduler in another process then sees misses.
    """

    def __init__(self, instance_id: str, engine: LMCacheEngine, *,
                 read_timeout_s: float | None = None,
                 max_handlers: int | None = None) -> None:
        """:param read_timeout_s: `SERVER_READ_TIMEOUT_S` if None.
        :param max_handlers: `MAX_HANDLERS` if None.
        """
        if read_timeout_s is None:
            read_timeout_s = SERVER_READ_TIMEOUT_S
        if max_handlers is None:
            max_handlers = MAX_HANDLERS
        self.path = socket_path(instance_id)
        self.engine = engine
        with _local_lock:
            _local_engines[instance_id] = engine
        self.instance_id = instance_id
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while True:
                    try:  # the next request, whole, within the read timeout
                        data = _recv(self.request, time.monotonic() + read_timeout_s)
                    except (ConnectionError, OSError, ValueError, struct.error):
                        return  # closed, idle or slow past the read timeout, or garbage
                    try:
                        tokens, salt = _decode(data)
                        hit = owner.engine.lookup(tokens, cache_salt=salt)
                    except Exception as exc:  # a bad request costs a miss, not the worker
                        logger.warning("lmcache lookup failed: %s: %s", type(exc).__name__, exc)
                        hit = 0
                    try:
                        _send(self.request, struct.pack("<q", hit))
                    except OSError:
                        return

        try:
            private_socket_dir(create=True)
            _claim(self.path)
            self._server = _UnixServer(self.path, Handler, read_timeout_s, max_handlers)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            if self._server is not None:
                self._server.server_close()
                self._server = None
            logger.error("lmcache: worker 0 cannot serve lookups at %s (%s: %s); a "
                         "scheduler in another process will see every prompt as not "
                         "cached", self.path, type(exc).__name__, exc)
            return
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="lmcache-lookup", daemon=True)
        self._thread.start()

    @property
    def serving(self) -> bool:
        """Whether the socket is served (False: only the in-process path answers)."""
        return self._server is not None

    def close(self) -> None:
        with _local_lock:
            if _local_engines.get(self.instance_id) is self.engine:
                del _local_engines[self.instance_id]
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close_connections()  # first: frees an accept loop waiting for a handler slot
        server.shutdown()
        server.close_connections()  # and whatever it accepted meanwhile
        server.server_close()
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
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
        self._warned_answer = False

    def _connect(self) -> socket.socket:
        path = socket_path(self.instance_id)
        private_socket_dir()  # raises unless the directory is a private one of ours
        deadline = time.monotonic() + self.timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # EAGAIN: the listen queue is full; it drains
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.002)
            except BaseException:
                sock.close()
                raise
        try:
            uid = _peer_uid(sock)
        except OSError:
            sock.close()
            raise
        if uid is not None and uid != os.getuid():
            sock.close()
            raise PermissionError(f"{path} is served by uid {uid}, expected uid "
                                  f"{os.getuid()}")
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def lookup(self, tokens: Sequence[int], cache_salt: str | None) -> int:
        """Cached prefix tokens of ``tokens``; 0 when worker 0 cannot be asked."""
        with _local_lock:
            engine = _local_engines.get(self.instance_id)
        if engine is not None:
            return engine.lookup(torch.tensor(tokens, dtype=torch.int64), cache_salt=cache_salt)
        with self._lock:
            for _attempt in range(2):
                reused = self._sock is not None
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    _send(self._sock, _encode(tokens, cache_salt))
                    (hit,) = struct.unpack("<q", _recv(self._sock))
                    break
                except (OSError, ValueError, struct.error) as exc:
                    self._drop()
                    if reused and isinstance(exc, ConnectionError):
                        continue  # the server dropped our idle connection: a new one
                    if not self._warned:
                        self._warned = True
                        logger.warning("lmcache: worker 0 did not answer a lookup (%s: %s); "
                                       "treating prompts as not cached until it does "
                                       "(logged once)", type(exc).__name__, exc)
                    return 0
            else:  # unreachable: a second attempt is never on a reused connection
                return 0
            if not 0 <= hit <= len(tokens):
                if not self._warned_answer:
                    self._warned_answer = True
                    logger.warning("lmcache: worker 0 answered %d cached tokens for a "
                                   "prompt of %d; treating it as not cached (logged once)",
                                   hit, len(tokens))
                return 0
            return int(hit)

    def close(self) -> None:
        with self._lock:
            self._drop()
