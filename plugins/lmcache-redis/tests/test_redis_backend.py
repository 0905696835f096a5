"""The redis tier against real redis-server processes: standalone, ACL users, TLS, cluster,
a frozen server, corrupt values. What a plugin author ships beside the code."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid

import pydantic
import pytest
import redis
import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.object_format import HEADER_SIZE, MAGIC
from lmcache.experimental.storage_backend.serde import NaiveSerde, ZstdSerde
from lmcache.plugin.registry import registry
from lmcache.testing.conformance import StorageBackendConformance
from lmcache.testing.fixtures import service_missing
from lmcache.testing.servers import RedisServer, ServiceUnavailable
from lmcache.utils import CacheEngineKey
from lmcache_redis.backend import (
    RedisBackend,
    RedisTransport,
    _read_value,
    parse_redis_url,
)

SHAPE = (4, 2, 16, 2, 32)  # layers, K/V, tokens, heads, head size


def key(i: int, model: str = "org/model") -> CacheEngineKey:
    return CacheEngineKey("vllm", model, 1, 0, f"{i:064x}")


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(64 << 20)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"


def chunk(allocator, seed: int, shape=SHAPE, dtype=torch.bfloat16):
    obj = allocator.allocate(shape, dtype, MemoryFormat.KV_BLOB)
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(shape, generator=g).to(dtype))
    return obj


def same(a, b) -> bool:
    return (a.get_shape() == b.get_shape() and a.get_dtype() == b.get_dtype()
            and a.get_memory_format() == b.get_memory_format()
            and bytes(a.byte_array) == bytes(b.byte_array))


@pytest.fixture
def open_backend(allocator):
    made = []

    def open_(url, serde=None, **kwargs) -> RedisBackend:
        namespace = kwargs.pop("namespace", f"t{uuid.uuid4().hex[:12]}")
        transport_kwargs = {k: kwargs.pop(k) for k in ("cluster_nodes", "tls_ca_file",
                                                        "tls_verify") if k in kwargs}
        timeout_s = kwargs.setdefault("timeout_s", 5.0)
        transport = RedisTransport(url, namespace=namespace, timeout_s=timeout_s,
                                   **transport_kwargs)
        backend = RedisBackend(transport, serde or NaiveSerde(), allocator, **kwargs)
        made.append(backend)
        return backend

    yield open_
    for backend in made:
        backend.close()


def put(backend, k, obj) -> None:
    future = backend.submit_put_task(k, obj)
    assert future is not None
    assert future.result(timeout=30) is True


# -- URLs ---------------------------------------------------------------------------------


def test_parse_redis_url():
    t = parse_redis_url("redis://cache:6380/2")
    assert (t.tls, t.cluster, t.nodes, t.db, t.username, t.password) == \
        (False, False, [("cache", 6380)], 2, None, None)
    t = parse_redis_url("rediss://alice:p%40ss@cache")
    assert t.tls and t.nodes == [("cache", 6379)] and (t.username, t.password) == \
        ("alice", "p@ss")
    assert parse_redis_url("redis://:secret@h:1").password == "secret"
    assert parse_redis_url("redis://secret@h:1").password == "secret"
    t = parse_redis_url("redis+cluster://a:7000,b:7001")
    assert t.cluster and t.nodes == [("a", 7000), ("b", 7001)]
    t = parse_redis_url("redis://a:7000,b:7001")
    assert t.cluster
    t = parse_redis_url("redis://a:7000", cluster_nodes=["b:7001"])
    assert t.cluster and t.nodes == [("a", 7000), ("b", 7001)]
    assert parse_redis_url("rediss+cluster://[::1]:7000").nodes == [("::1", 7000)]
    assert parse_redis_url("unix:///run/redis.sock").unix_path == "/run/redis.sock"
    for bad in ("http://h:1", "redis://h:port", "redis://h:70000", "redis://h/db",
                "redis+cluster://a:1/3", "redis://"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_options_refuse_unknown_keys_and_bad_values():
    with pytest.raises(pydantic.ValidationError):
        RedisBackend.Options(url="redis://h", colour="blue")
    with pytest.raises(pydantic.ValidationError):
        RedisBackend.Options(url="redis://h", timeout_s=0)
    with pytest.raises(pydantic.ValidationError):
        RedisBackend.Options(url="redis://h", namespace="a:b/c")


def test_registered_as_its_own_distribution():
    entry = registry.entry("storage_backend", "redis")
    assert entry.dist_name == "lmcache-redis"
    assert registry.load("storage_backend", "redis") is RedisBackend


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("serde", [NaiveSerde(), NaiveSerde("crc32"), ZstdSerde(),
                                   ZstdSerde(level=3, shuffle=False)],
                         ids=["naive", "naive-crc32", "zstd", "zstd-noshuffle"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_round_trip_is_bit_exact(redis_server, open_backend, allocator, serde, dtype):
    backend = open_backend(redis_server.url, serde)
    obj = chunk(allocator, 1, dtype=dtype)
    assert not backend.contains(key(1))
    put(backend, key(1), obj)
    assert backend.contains(key(1)) and not backend.exists_in_put_tasks(key(1))
    # a second backend (no local knowledge) finds it through the store
    other = open_backend(redis_server.url, serde, namespace=backend.transport.namespace)
    assert other.contains(key(1))
    got = other.get_blocking(key(1))
    assert got is not None and same(obj, got)
    got.ref_count_down()
    future = other.submit_prefetch_task(key(1))
    got = future.result(timeout=10)
    assert same(obj, got)
    got.ref_count_down()
    assert other.remove(key(1)) and not other.contains(key(1))
    assert other.get_blocking(key(1)) is None
    obj.ref_count_down()


def test_value_is_one_self_describing_redis_string(redis_server, open_backend, allocator):
    backend = open_backend(redis_server.url)
    obj = chunk(allocator, 2)
    put(backend, key(2, "org/Llama-3.1-8B"), obj)
    raw = redis.Redis(port=redis_server.port).get(
        f"{backend.transport.namespace}:{key(2, 'org/Llama-3.1-8B').to_string()}")
    assert raw[:8] == MAGIC and len(raw) == HEADER_SIZE + obj.get_size()
    assert raw[HEADER_SIZE:] == bytes(obj.byte_array)
    obj.ref_count_down()


def test_large_chunk_goes_out_unjoined_and_comes_back(redis_server, open_backend, allocator):
    # Llama-3-8B geometry with 64 tokens (8 MiB): the value is sent as header + view.
    backend = open_backend(redis_server.url)
    obj = chunk(allocator, 3, shape=(32, 2, 64, 8, 128))
    parts = backend.serde.serialize_parts(obj)
    assert parts[1].obj is not None and len(parts) == 2 and len(parts[0]) == HEADER_SIZE
    put(backend, key(3), obj)
    got = backend.get_blocking(key(3))
    assert same(obj, got)
    got.ref_count_down()
    obj.ref_count_down()


def test_puts_are_skipped_when_known_or_pending(redis_server, open_backend, allocator):
    backend = open_backend(redis_server.url)
    obj = chunk(allocator, 4)
    put(backend, key(4), obj)
    assert backend.submit_put_task(key(4), obj) is None  # known to be stored
    assert backend.stats.puts == 1
    obj.ref_count_down()


# -- reading values ----------------------------------------------------------------------


def test_connections_use_hiredis_and_resp2(redis_server):
    # the default install is the fast one: hiredis comes with lmcache-redis
    from redis.connection import _HiredisParser
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE, "hiredis is a dependency of lmcache-redis"
    transport = RedisTransport(redis_server.url)
    try:
        assert transport.exists("nothing") is False
        pool = transport.client().connection_pool
        conn = pool.get_connection()
        try:
            assert isinstance(conn._parser, _HiredisParser) and conn.protocol == 2
        finally:
            pool.release(conn)
    finally:
        transport.close()


class Trickle:
    """A socket that hands out ``data`` ``step`` bytes per ``recv_into``."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def recv_into(self, buf) -> int:
        piece = self.data[self.pos:self.pos + min(self.step, len(buf))]
        buf[:len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


@pytest.mark.parametrize("step", [1, 2, 7, 1 << 16])
def test_read_value_takes_the_reply_in_any_pieces(step):
    value = bytes(range(256)) * 400  # longer than the first read
    sock = Trickle(b"$%d\r\n%b\r\n" % (len(value), value), step)
    got = _read_value(sock, None)
    assert bytes(got) == value and sock.pos == len(sock.data)
    assert bytes(_read_value(Trickle(b"$3\r\nabc\r\n", step), 2)) == b"abc"
    assert bytes(_read_value(Trickle(b"$0\r\n\r\n", step), 10)) == b""
    assert _read_value(Trickle(b"$-1\r\n", step), None) is None


def test_read_value_raises_what_redis_py_raises():
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        _read_value(Trickle(b"-WRONGTYPE Operation against a key\r\n", 5), None)
    with pytest.raises(redis.exceptions.MovedError) as moved:
        _read_value(Trickle(b"-MOVED 3999 127.0.0.1:7002\r\n", 5), None)
    assert moved.value.node_addr == ("127.0.0.1", 7002)
    for bad in (b"+OK\r\n", b":1\r\n", b"$x\r\n", b"$3\r\nabcd\r\n", b"$3\r\nab\r\n",
                b"$3\r\nabc\r\n+OK\r\n"):
        with pytest.raises((redis.exceptions.InvalidResponse, redis.ConnectionError)):
            _read_value(Trickle(bad, 64), None)
    with pytest.raises(redis.exceptions.InvalidResponse, match="GETRANGE"):  # bounded
        _read_value(Trickle(b"$%d\r\n" % (1 << 40), 64), 1000)
    with pytest.raises(redis.ConnectionError, match="closed"):  # ends mid-value
        _read_value(Trickle(b"$10\r\nabc", 64), None)


def test_error_replies_keep_the_connection_in_step(redis_server):
    transport = RedisTransport(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    try:
        client = redis.Redis(port=redis_server.port)
        wrong = transport.object_name("a-list")
        client.rpush(wrong, b"x")
        transport.put(transport.object_name("k"), [b"value"])
        for max_bytes in (None, 100):
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                transport.get(wrong, max_bytes)
            assert bytes(transport.get(transport.object_name("k"), max_bytes)) == b"value"
            assert bytes(transport.get(transport.object_name("k"), 2)) == b"val"
            assert transport.get(transport.object_name("none"), max_bytes) is None
        client.delete(wrong)
    finally:
        transport.close()


# -- credentials and TLS ---------------------------------------------------------------


def test_username_and_password_in_the_url(open_backend, allocator, caplog):
    acl = ["--requirepass", "defaultpw", "--user", "alice", "on", ">alicepw", "~*", "&*",
           "+@all"]
    try:
        server = RedisServer(extra_args=acl).start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    try:
        obj = chunk(allocator, 5)
        alice = open_backend(f"redis://alice:alicepw@127.0.0.1:{server.port}")
        put(alice, key(5), obj)
        default = open_backend(f"redis://:defaultpw@127.0.0.1:{server.port}",
                               namespace=alice.transport.namespace)
        got = default.get_blocking(key(5))
        assert same(obj, got)
        got.ref_count_down()
        with caplog.at_level(logging.WARNING):
            wrong = open_backend(f"redis://alice:nope@127.0.0.1:{server.port}",
                                 namespace=alice.transport.namespace)
            assert not wrong.contains(key(5))  # an authentication error is a miss
            assert wrong.get_blocking(key(5)) is None
        assert "alicepw" not in caplog.text and "nope" not in caplog.text  # redacted
        obj.ref_count_down()
    finally:
        server.stop()


def _make_certificates(directory) -> tuple[str, str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        service_missing("openssl (to make a TLS certificate)")
    ca_key, ca, key_file, csr, cert = (str(directory / n) for n in
                                       ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "2", "-subj", "/CN=lmcache-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key_file, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", str(ext)],
    ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, timeout=60)
    return ca, cert, key_file


def test_rediss_tls(tmp_path, open_backend, allocator):
    ca, cert, key_file = _make_certificates(tmp_path)
    from lmcache.testing.servers import free_port

    tls_port = free_port()
    try:
        server = RedisServer(extra_args=[
            "--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key_file,
            "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]).start()
    except ServiceUnavailable as exc:
        service_missing("redis-server with TLS", exc)
    try:
        obj = chunk(allocator, 6)
        url = f"rediss://127.0.0.1:{tls_port}"
        backend = open_backend(url, tls_ca_file=ca)
        put(backend, key(6), obj)
        got = backend.get_blocking(key(6))
        assert same(obj, got)
        got.ref_count_down()
        # The value crossed TLS: it is in the server, seen on the plaintext port.
        plain = redis.Redis(port=server.port)
        assert plain.exists(f"{backend.transport.namespace}:{key(6).to_string()}")
        # A client that does not trust the CA gets misses, not exceptions.
        untrusting = open_backend(url, namespace=backend.transport.namespace, timeout_s=2.0)
        assert not untrusting.contains(key(6))
        assert untrusting.stats.failures == 1
        obj.ref_count_down()
    finally:
        server.stop()


# -- cluster ---------------------------------------------------------------------------


def test_cluster_spreads_chunks_over_the_nodes(redis_cluster, open_backend, allocator):
    backend = open_backend(redis_cluster.url)
    objs = [chunk(allocator, 100 + i) for i in range(24)]
    for i, obj in enumerate(objs):
        put(backend, key(i), obj)
    namespace = backend.transport.namespace
    per_node = [len(redis.Redis(port=n.port).keys(f"{namespace}:*")) for n in
                redis_cluster.nodes]
    assert sum(per_node) == 24 and all(per_node), per_node
    # one start-up node is enough to find all of them
    first = redis_cluster.nodes[0]
    other = open_backend(f"redis://127.0.0.1:{first.port}", namespace=namespace,
                         cluster_nodes=[f"127.0.0.1:{redis_cluster.nodes[1].port}"])
    for i, obj in enumerate(objs):
        got = other.get_blocking(key(i))
        assert got is not None and same(obj, got)
        got.ref_count_down()
        obj.ref_count_down()


def test_cluster_follows_moved_slots(redis_cluster, open_backend, allocator):
    backend = open_backend(redis_cluster.url)
    obj = chunk(allocator, 9)
    client = backend.transport.client()
    right = client.get_node_from_key
    nodes = client.get_nodes()

    def wrong_once(name, *args, **kwargs):  # as if the slot had moved since
        client.get_node_from_key = right
        node = right(name, *args, **kwargs)
        return next(n for n in nodes if n.name != node.name)

    client.get_node_from_key = wrong_once
    put(backend, key(9), obj)
    backend._known.clear()
    client.get_node_from_key = wrong_once
    got = backend.get_blocking(key(9))
    assert got is not None and same(obj, got)
    assert backend.stats.failures == 0
    got.ref_count_down()
    obj.ref_count_down()


def test_cluster_through_the_remote_tier(redis_cluster, allocator):
    backend = registry.create(
        "storage_backend", "remote", {"url": redis_cluster.url, "serde": "zstd",
                                      "namespace": f"t{uuid.uuid4().hex[:8]}"},
        None, None, TierContext(tier_name="remote", memory_allocator=allocator))
    try:
        assert isinstance(backend, RedisBackend) and backend.transport.target.cluster
        obj = chunk(allocator, 7)
        put(backend, key(7), obj)
        got = backend.get_blocking(key(7))
        assert same(obj, got)
        got.ref_count_down()
        obj.ref_count_down()
    finally:
        backend.close()


# -- faults ----------------------------------------------------------------------------


def test_frozen_server_costs_one_timeout_then_nothing(open_backend, allocator):
    try:
        server = RedisServer().start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    try:
        backend = open_backend(server.url, timeout_s=0.5, retry_interval_s=0.3)
        obj = chunk(allocator, 8)
        put(backend, key(8), obj)
        backend._known.clear()  # make the next lookup ask the store
        server.pause()  # SIGSTOP: connections hang, nothing answers
        started = time.monotonic()
        assert not backend.contains(key(8))
        assert time.monotonic() - started < 0.5 + 0.5  # bounded by timeout_s
        started = time.monotonic()
        for _ in range(50):  # during the back-off: at once, without traffic
            assert not backend.contains(key(8))
            assert backend.get_blocking(key(8)) is None
            assert backend.submit_put_task(key(9), obj) is None
        assert time.monotonic() - started < 0.2
        stats = backend.stats
        assert stats.timeouts == 1 and stats.outages == 1 and stats.dropped_puts == 50
        server.resume()
        deadline = time.monotonic() + 10
        while not backend.contains(key(8)):  # back by itself, on fresh connections
            assert time.monotonic() < deadline, "the tier did not come back"
            time.sleep(0.05)
        got = backend.get_blocking(key(8))
        assert same(obj, got)
        got.ref_count_down()
        obj.ref_count_down()
    finally:
        server.resume()
        server.stop()


def test_killed_server_then_restart(open_backend, allocator):
    try:
        server = RedisServer().start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    try:
        backend = open_backend(server.url, timeout_s=1.0, retry_interval_s=0.1,
                               max_retry_interval_s=0.2)
        obj = chunk(allocator, 10)
        put(backend, key(10), obj)
        server.kill()
        assert not backend.contains(key(11))  # connection refused: a miss
        assert backend.get_blocking(key(10)) is None
        assert backend.submit_put_task(key(11), obj) is None  # dropped
        server.start()  # same port, empty
        time.sleep(0.3)  # longer than the longest back-off: the next call probes
        assert not backend.contains(key(10))  # forgotten: the store came back empty
        put(backend, key(11), obj)
        got = backend.get_blocking(key(11))
        assert same(obj, got)
        got.ref_count_down()
        obj.ref_count_down()
    finally:
        server.stop()


@pytest.mark.parametrize("damage", ["foreign", "truncated", "flipped", "empty", "extended"])
@pytest.mark.parametrize("serde", [NaiveSerde(), ZstdSerde()], ids=["naive", "zstd"])
def test_bad_values_are_misses_then_repaired(redis_server, open_backend, allocator, serde,
                                             damage):
    backend = open_backend(redis_server.url, serde)
    obj = chunk(allocator, 12)
    put(backend, key(12), obj)
    client = redis.Redis(port=redis_server.port)
    name = f"{backend.transport.namespace}:{key(12).to_string()}"
    value = bytearray(client.get(name))
    if damage == "foreign":
        value = bytearray(b"not an lmcache object" * 10)
    elif damage == "truncated":
        value = value[: len(value) // 2]
    elif damage == "flipped":
        value[len(value) - 100] ^= 0x10
    elif damage == "empty":
        value = bytearray()
    else:
        value += b"\0"
    client.set(name, bytes(value))
    other = open_backend(redis_server.url, serde, namespace=backend.transport.namespace)
    assert other.contains(key(12))  # the store has something under that name
    assert other.get_blocking(key(12)) is None
    assert other.stats.bad_values == 1
    assert not other.contains(key(12))  # and it is not fetched again for a while
    put(other, key(12), obj)  # a put of ours replaces it
    got = other.get_blocking(key(12))
    assert same(obj, got)
    got.ref_count_down()
    obj.ref_count_down()


# -- the shipped conformance kit -------------------------------------------------------------


class TestRedisConformance(StorageBackendConformance):
    """The same contract every storage backend meets, against a real redis-server."""

    persistent = True

    @pytest.fixture
    def backend_factory(self, allocator, redis_server):
        ns = f"kit{uuid.uuid4().hex[:12]}"
        self.port = redis_server.port

        def make(budget_bytes=None):
            transport = RedisTransport(redis_server.url, namespace=ns, timeout_s=5.0)
            return RedisBackend(transport, NaiveSerde(), allocator, timeout_s=5.0)

        return make

    def _rewrite(self, backend, k, change) -> None:
        client = redis.Redis(port=self.port)
        name = backend.transport.object_name(k.to_string())
        value = client.get(name)
        assert value is not None
        if change is None:
            client.delete(name)
        else:
            client.set(name, change(bytearray(value)))

    def corrupt(self, backend, k):
        def flip(v: bytearray) -> bytes:
            v[-1] ^= 0xFF
            return bytes(v)
        self._rewrite(backend, k, flip)

    def truncate(self, backend, k):
        self._rewrite(backend, k, lambda v: bytes(v[: len(v) // 2]))

    def lose(self, backend, k):
        self._rewrite(backend, k, None)
