"""The scheduler's lookup socket is private to the user running vLLM (issue 11, item 5).

Nobody else can bind it first, crash worker 0's server or feed the scheduler answers;
an idle client does not hold a server thread forever; a burst of connects is answered.
Tests marked ``root`` play the other user for real (uid 65534) and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from lmcache.integration.vllm import lookup

NOBODY = 65534
IS_ROOT = hasattr(os, "getuid") and os.getuid() == 0
root = pytest.mark.skipif(not IS_ROOT, reason="plays another user: needs root")


class FakeEngine:
    """Holds the first 40 tokens of ``range(...)`` without a salt."""

    def __init__(self) -> None:
        self.calls = 0

    def lookup(self, tokens, cache_salt=None) -> int:
        self.calls += 1
        if cache_salt is not None:
            return 0
        hit = 0
        for i, t in enumerate(tokens.tolist()[:40]):
            if t != i:
                break
            hit = i + 1
        return hit


@pytest.fixture
def shared_tmp(monkeypatch) -> Iterator[str]:
    """A fresh shared temporary directory (mode 1777, like /tmp) as tempfile's, with no
    XDG_RUNTIME_DIR: socket paths land there."""
    path = tempfile.mkdtemp(prefix="lk", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(path, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", path)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def instance() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def remote(server) -> None:
    """Forget the in-process engine: the client now asks over the socket."""
    with lookup._local_lock:
        lookup._local_engines.pop(server.instance_id, None)


class FakeServer:
    """A listener at ``path`` answering ``answers`` in turn (the last one again and again)."""

    def __init__(self, path: str, answers: list[int]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.answers = list(answers)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    while True:
                        lookup._recv(conn)
                        answer = self.answers.pop(0) if len(self.answers) > 1 else \
                            self.answers[0]
                        lookup._send(conn, struct.pack("<q", answer))
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def as_nobody(child) -> int:
    """Run ``child()`` in a forked process of uid/gid 65534; its return is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = child()
        finally:
            os._exit(code)
    return pid


def wait_exit(pid: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish")


# --- squatters ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["old_path", "open_dir", pytest.param("foreign_dir",
                                                                          marks=root)])
def test_a_squatter_can_neither_crash_the_server_nor_answer(shared_tmp, instance, where):
    """Someone binds the socket before worker 0: the scheduler never takes its answer
    (a plausible 16 for 40 tokens), and worker 0 neither crashes nor deletes it."""
    if where == "old_path":  # the predictable name of the shared temporary directory
        path = os.path.join(shared_tmp, f"lmcache-lookup-{os.getuid()}-{instance}.sock")
    else:
        path = lookup.socket_path(instance)
        directory = os.path.dirname(path)
        if not os.path.exists(directory):
            os.mkdir(directory)
            os.chmod(directory, 0o777)  # made by someone else, for everyone
            if where == "foreign_dir":
                os.chown(directory, NOBODY, NOBODY)
                os.chmod(directory, 0o755)
    squatter = FakeServer(path, [16])
    if where == "foreign_dir":
        os.chown(path, NOBODY, NOBODY)
    client = lookup.LookupClient(instance, timeout_s=2)
    server = None
    try:
        assert client.lookup(list(range(40)), None) == 0  # not 16
        server = lookup.LookupServer(instance, FakeEngine())  # does not raise
        remote(server)
        assert os.path.exists(path), "the squatter's socket was deleted"
        got = client.lookup(list(range(40)), None)
        if where == "old_path":
            assert server.serving and got == 40  # ignored: the real socket is elsewhere
        else:
            assert not server.serving and got == 0  # refused: misses, never 16
        assert squatter.connections == 0
    finally:
        client.close()
        if server is not None:
            server.close()
        squatter.close()
    assert os.path.exists(path)


@pytest.mark.parametrize("what", ["file", pytest.param("foreign_socket", marks=root)])
def test_something_else_at_the_socket_path_is_refused_and_kept(shared_tmp, instance, what):
    path = lookup.socket_path(instance)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if what == "file":
        with open(path, "w") as f:
            f.write("not a socket")
    else:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
        os.chown(path, NOBODY, NOBODY)
    before = os.lstat(path)
    server = lookup.LookupServer(instance, FakeEngine())  # does not raise
    remote(server)
    try:
        after = os.lstat(path)  # left as it was
        assert (after.st_ino, after.st_uid, after.st_mode) == \
            (before.st_ino, before.st_uid, before.st_mode)
        assert lookup.LookupClient(instance, timeout_s=1).lookup(list(range(40)), None) == 0
        assert not server.serving
    finally:
        server.close()
    assert os.lstat(path).st_ino == before.st_ino


def test_a_stale_socket_of_ours_is_replaced(shared_tmp, instance):
    path = lookup.socket_path(instance)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)  # its process died without removing it
    server = lookup.LookupServer(instance, FakeEngine())
    remote(server)
    try:
        assert lookup.LookupClient(instance, timeout_s=2).lookup(list(range(40)), None) == 40
    finally:
        server.close()
    assert not os.path.exists(path)


# --- credentials of the peer ----------------------------------------------------------


def test_the_client_believes_only_a_server_of_our_uid(shared_tmp, instance, monkeypatch):
    path = lookup.socket_path(instance)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fake = FakeServer(path, [16])
    try:
        assert lookup.LookupClient(instance, timeout_s=2).lookup(list(range(40)), None) == 16
        monkeypatch.setattr(lookup, "_peer_uid", lambda sock: os.getuid() + 1,
                            raising=False)  # served by someone else
        assert lookup.LookupClient(instance, timeout_s=2).lookup(list(range(40)), None) == 0
    finally:
        fake.close()


def test_the_server_answers_only_clients_of_our_uid(shared_tmp, instance, monkeypatch):
    engine = FakeEngine()
    server = lookup.LookupServer(instance, engine)
    try:
        monkeypatch.setattr(lookup, "_peer_uid", lambda sock: os.getuid() + 1,
                            raising=False)  # asked by someone else
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(3)
            raw.connect(server.path)
            try:
                lookup._send(raw, lookup._encode(list(range(40)), None))
                assert raw.recv(8) == b""  # hung up on, not answered
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert engine.calls == 0
    finally:
        server.close()


@root
def test_peer_credentials_of_a_real_other_user(shared_tmp, instance):
    """SO_PEERCRED for real: a server run by uid 65534 (its socket moved into our private
    directory) is not believed, and a client of uid 65534 (through a link of our socket)
    is not answered."""
    # the client's check
    bind_at = os.path.join(shared_tmp, "nobody.sock")
    ready_r, ready_w = os.pipe()

    def serve() -> int:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(bind_at)
            s.listen(1)
            s.settimeout(5)
            os.write(ready_w, b"r")
            conn, _ = s.accept()
            with conn:
                conn.settimeout(5)
                try:
                    lookup._recv(conn)
                    lookup._send(conn, struct.pack("<q", 16))
                    return 1  # was asked
                except (OSError, ValueError):
                    return 0

    pid = as_nobody(serve)
    assert os.read(ready_r, 1) == b"r"
    path = lookup.socket_path(instance)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.rename(bind_at, path)  # the binding follows the inode
    assert lookup.LookupClient(instance, timeout_s=2).lookup(list(range(40)), None) == 0
    assert wait_exit(pid) == 0
    os.unlink(path)

    # the server's check
    engine = FakeEngine()
    server = lookup.LookupServer(instance, engine)
    alias = os.path.join(shared_tmp, "alias.sock")
    os.link(server.path, alias)
    os.chmod(alias, 0o666)

    def ask() -> int:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(alias)
            try:
                lookup._send(s, lookup._encode(list(range(40)), None))
                return 1 if s.recv(8) else 0
            except OSError:
                return 0

    try:
        assert wait_exit(as_nobody(ask)) == 0
        assert engine.calls == 0
    finally:
        server.close()


# --- answers, timeouts, bursts --------------------------------------------------------


def test_implausible_answers_are_misses(shared_tmp, instance):
    path = lookup.socket_path(instance)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fake = FakeServer(path, [10**9, -5, 41, 40, 0, 7])
    client = lookup.LookupClient(instance, timeout_s=2)
    try:
        got = [client.lookup(list(range(40)), None) for _ in range(6)]
        assert got == [0, 0, 0, 40, 0, 7]
        assert fake.connections == 1  # a wrong answer costs a miss, not the connection
    finally:
        client.close()
        fake.close()


_before: set[threading.Thread] = set()


def _handler_threads() -> int:
    """Connection threads of lookup servers started since `_baseline`."""
    return sum(t not in _before and (t.name == "lmcache-lookup-conn"
                                     or "process_request_thread" in t.name)  # socketserver's
               for t in threading.enumerate())


def _baseline() -> None:
    _before.clear()
    _before.update(threading.enumerate())


def _wait_for(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("timed out")
        time.sleep(0.01)
    return time.monotonic() - started


def test_idle_and_slow_clients_are_dropped_after_the_read_timeout(shared_tmp, instance,
                                                                 monkeypatch):
    monkeypatch.setattr(lookup, "SERVER_READ_TIMEOUT_S", 0.5, raising=False)
    _baseline()
    server = lookup.LookupServer(instance, FakeEngine())
    remote(server)
    try:
        idle, slow, dribbling = (socket.socket(socket.AF_UNIX) for _ in range(3))
        for s in (idle, slow, dribbling):
            s.settimeout(5)
            s.connect(server.path)
        slow.sendall(b"\x10\x00\x00\x00")  # half a length prefix, then nothing
        _wait_for(lambda: _handler_threads() == 3, 2)
        started = time.monotonic()
        request = lookup._encode(list(range(40)), None)
        request = struct.pack("<Q", len(request)) + request
        hung_up = False
        for i in range(len(request)):  # a byte every 0.1 s: never idle, always late
            try:
                dribbling.sendall(request[i:i + 1])
            except OSError:
                hung_up = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break
        assert hung_up or dribbling.recv(1) == b""
        assert idle.recv(1) == b"" and slow.recv(1) == b""  # hung up on
        dropped_after = time.monotonic() - started
        assert 0.3 < dropped_after < 2.5
        _wait_for(lambda: _handler_threads() == 0, 2)  # their threads are free
        for s in (idle, slow, dribbling):
            s.close()
        # the scheduler's own connection, idle past the timeout, reconnects unnoticed
        client = lookup.LookupClient(instance, timeout_s=2)
        assert client.lookup(list(range(40)), None) == 40
        time.sleep(0.8)
        assert client.lookup(list(range(20)), None) == 20
        assert not client._warned
        client.close()
    finally:
        server.close()


def test_handler_threads_are_capped(shared_tmp, instance, monkeypatch):
    monkeypatch.setattr(lookup, "SERVER_READ_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(lookup, "MAX_HANDLERS", 2, raising=False)
    _baseline()
    server = lookup.LookupServer(instance, FakeEngine())
    remote(server)
    idle = [socket.socket(socket.AF_UNIX) for _ in range(4)]
    try:
        for s in idle:
            s.connect(server.path)
        time.sleep(0.2)
        assert _handler_threads() == 2  # the others wait in the listen queue
        # a real lookup waits for a slot, then is answered
        assert lookup.LookupClient(instance, timeout_s=3).lookup(list(range(40)), None) == 40
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_burst_of_connects_all_get_answers(shared_tmp, instance):
    server = lookup.LookupServer(instance, FakeEngine())
    remote(server)
    n = 200
    barrier = threading.Barrier(n)
    results: list[int | None] = [None] * n

    def ask(i: int) -> None:
        client = lookup.LookupClient(instance, timeout_s=5)
        barrier.wait()
        try:
            results[i] = client.lookup(list(range(40)), None)
        finally:
            client.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
    finally:
        server.close()
    assert results == [40] * n


# --- the private directory ------------------------------------------------------------


def test_the_directory_is_created_private(shared_tmp, instance, monkeypatch):
    server = lookup.LookupServer(instance, FakeEngine())
    try:
        directory = os.path.join(shared_tmp, f"lmcache-{os.getuid()}")
        assert os.path.dirname(server.path) == directory
        st = os.lstat(directory)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()
        assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o600
    finally:
        server.close()
    # $XDG_RUNTIME_DIR when it is a private directory of ours, else the temporary one
    runtime = os.path.join(shared_tmp, "run")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    assert lookup.socket_dir() == os.path.join(runtime, "lmcache")
    assert lookup.private_socket_dir(create=True) == os.path.join(runtime, "lmcache")
    assert stat.S_IMODE(os.lstat(os.path.join(runtime, "lmcache")).st_mode) == 0o700
    os.chmod(runtime, 0o755)
    assert lookup.socket_dir() == os.path.join(shared_tmp, f"lmcache-{os.getuid()}")


@pytest.mark.parametrize("kind", ["mode_755", "mode_770", "symlink", "file",
                                  pytest.param("foreign", marks=root)])
def test_an_unsafe_directory_is_refused_with_a_clear_message(shared_tmp, instance, kind):
    directory = os.path.join(shared_tmp, f"lmcache-{os.getuid()}")
    if kind.startswith("mode_"):
        os.mkdir(directory)
        os.chmod(directory, int(kind[5:], 8))
        expected = "open to group or others"
    elif kind == "symlink":
        target = os.path.join(shared_tmp, "elsewhere")
        os.mkdir(target, 0o700)
        os.symlink(target, directory)
        expected = "is a symlink"
    elif kind == "file":
        with open(directory, "w") as f:
            f.write("x")
        expected = "is not a directory"
    else:
        os.mkdir(directory, 0o700)
        os.chown(directory, NOBODY, NOBODY)
        expected = f"owned by uid {NOBODY}"
    before = os.lstat(directory)
    server = lookup.LookupServer(instance, FakeEngine())  # the worker does not crash
    remote(server)
    try:
        assert lookup.LookupClient(instance, timeout_s=1).lookup(list(range(40)), None) == 0
        assert not server.serving
    finally:
        server.close()
    with pytest.raises(PermissionError, match=expected) as info:
        lookup.private_socket_dir(create=True)
    assert directory in str(info.value) and f"owned by uid {os.getuid()} with mode 0700" \
        in str(info.value)
    after = os.lstat(directory)  # left as it was
    assert (after.st_ino, after.st_mode, after.st_uid) == \
        (before.st_ino, before.st_mode, before.st_uid)


# --- across two processes -------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import sys
    from lmcache.integration.vllm import lookup

    class Engine:
        def lookup(self, tokens, cache_salt=None):
            if cache_salt is not None:
                return 0
            hit = 0
            for i, t in enumerate(tokens.tolist()[:40]):
                if t != i:
                    break
                hit = i + 1
            return hit

    server = lookup.LookupServer(sys.argv[1], Engine())
    print("ready", flush=True)
    sys.stdin.readline()
    server.close()
""")


def test_the_happy_path_across_two_processes(shared_tmp, instance):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = shared_tmp
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, instance], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = lookup.LookupClient(instance, timeout_s=5)
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert os.path.exists(lookup.socket_path(instance))  # the same path on both sides
        assert client.lookup(list(range(40)), None) == 40
        assert client.lookup(list(range(33)) + [99] * 7, None) == 33
        assert client.lookup(list(range(40)), "tenant") == 0
        assert client.lookup([], None) == 0
    finally:
        client.close()
        worker.stdin.close()
        assert worker.wait(10) == 0
    assert not os.path.exists(lookup.socket_path(instance))
    assert lookup.LookupClient(instance, timeout_s=1).lookup(list(range(40)), None) == 0
