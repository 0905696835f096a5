"""The cache server (``python -m lmcache.server``) and its ``lm`` tier, on real server
processes on loopback: bad frames, the conformance kit, two engines in two processes,
the server killed and restarted mid-run (with and without a disk tier), a frozen server,
16 clients at once, its budget, and the commands that start it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.builtin.tiers.lm import LMServerBackend, LMServerTransport, parse_lm_url
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.kits.object_format import HEADER_SIZE as OBJECT_HEADER_SIZE
from lmcache.kits.wire import (
    CACHE_SERVER,
    Limits,
    Op,
    Status,
    WireClient,
    encode_header,
    recv_exactly,
    recv_header,
)
from lmcache.plugin.registry import registry
from lmcache.testing.conformance import StorageBackendConformance
from lmcache.testing.servers import LMCacheServer, free_port
from lmcache.utils import CacheEngineKey
from tests.integration.test_engine import (
    CHUNK,
    CONNECTORS,
    REPO,
    build,  # noqa: F401 - the fixture
    make_config,
    metadata,
    paged_kwargs,
    tokens,
)
from tests.integration.test_remote_tiers import loaded_exactly
from tests.kvutil import Geometry

MiB = 1 << 20


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def server():
    """One server for the module: 256 MiB of memory, values up to 64 MiB, a frame must
    arrive within 1 s once begun."""
    srv = LMCacheServer(cpu_gb=0.25, extra_args=["--max-value-mb", "64",
                                                 "--frame-timeout", "1"]).start()
    yield srv
    srv.stop()


@pytest.fixture
def allocator():
    allocator = HostMemoryAllocator(64 * MiB)
    yield allocator
    assert allocator.num_active_allocations == 0, "leaked memory objects"


def lm_tier(url: str, allocator, **options) -> LMServerBackend:
    options = {"url": url, "namespace": namespace(), **options}
    backend = registry.create("storage_backend", "remote", options, None, None,
                              TierContext(tier_name="remote", memory_allocator=allocator))
    assert isinstance(backend, LMServerBackend)
    return backend


def chunk(allocator, seed: int, shape=(2, 2, 16, 64), dtype=torch.bfloat16):
    obj = allocator.allocate(shape, dtype, MemoryFormat.KV_BLOB)
    obj.tensor.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                     .to(dtype))
    return obj


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "org/Model-8B", 1, 0, f"{i:064x}")


def raw(srv: LMCacheServer) -> WireClient:
    return WireClient.connect("127.0.0.1", srv.port, time.monotonic() + 10,
                              expect_service=CACHE_SERVER)


def server_stats(srv: LMCacheServer) -> dict:
    client = raw(srv)
    try:
        reply = client.call(Op.STATS, deadline=time.monotonic() + 10)
        assert reply.status == Status.OK
        return json.loads(reply.payload)
    finally:
        client.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_lm_urls():
    assert parse_lm_url("lm://localhost:8100") == ("localhost", 8100)
    assert parse_lm_url("lm://[::1]:8100/") == ("::1", 8100)
    for bad in ("lm://localhost", "lm://h:1/path", "lm://u:p@h:1", "lm://:1", "redis://h:1",
                "lm://h:99999"):
        with pytest.raises(ValueError, match="lm://host:port"):
            parse_lm_url(bad)
    LMServerTransport("lm://nowhere.invalid:1")  # no I/O in the constructor


# -- the protocol against the server process ------------------------------------------------


def _answer(sock: socket.socket) -> tuple[Status, str]:
    h = recv_header(sock, Limits(), time.monotonic() + 10)
    body = bytearray(h.payload_len)
    recv_exactly(sock, body, time.monotonic() + 10)
    return Status(h.status), body.decode()


BAD_FRAMES = {
    "bad magic": (b"XXXX" + encode_header(Op.PING)[4:], Status.BAD_FRAME),
    "garbage": (os.urandom(256), Status.BAD_FRAME),
    "http": (b"GET / HTTP/1.1\r\nHost: cache\r\n\r\n" + b"\0" * 32, Status.BAD_FRAME),
    "wrong version": (encode_header(Op.GET, version=7), Status.BAD_VERSION),
    "header checksum": (encode_header(Op.GET)[:-4] + b"\0\0\0\0", Status.BAD_FRAME),
    "key over the limit": (encode_header(Op.GET, key_len=1 << 31), Status.OVER_LIMIT),
    "value over the limit": (encode_header(Op.PUT, key_len=4, payload_len=65 * MiB),
                             Status.OVER_LIMIT),
    "message over the limit": (encode_header(Op.EXISTS, payload_len=2 * MiB),
                               Status.OVER_LIMIT),
    "a reply": (encode_header(Op.GET, reply=True), Status.BAD_FRAME),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_a_bad_frame_is_answered_and_only_its_connection_closed(server, case):
    data, status = BAD_FRAMES[case]
    bystander = raw(server)
    before = server_stats(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        got, message = _answer(s)
        assert got == status, message
        assert s.recv(1) == b"", "the connection stays open after a bad frame"
    if status == Status.BAD_VERSION:
        assert "version 1" in message and "version 7" in message
    assert bystander.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
    after = server_stats(server)
    assert after["bad_frames"] == before["bad_frames"] + 1
    assert server._proc.proc.poll() is None
    bystander.close()


def test_truncated_stalled_and_unknown_frames_cost_nothing_else(server, allocator):
    tier = lm_tier(server.url, allocator, timeout_s=2)
    obj = chunk(allocator, 1)
    try:
        before = server_stats(server)
        truncated = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        truncated.sendall(encode_header(Op.PUT, key_len=10, payload_len=1000)[:20])
        truncated.close()  # closed in the middle of its header
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        name = tier.transport.object_name(key(1).to_string()).encode()
        stalled.sendall(encode_header(Op.PUT, key_len=len(name), payload_len=5000) + name
                        + b"x" * 100)  # then nothing more
        started = time.monotonic()
        # meanwhile another client is served as usual
        assert tier.submit_put_task(key(2), obj).result(timeout=5)
        tier._known.clear()
        got = tier.get_blocking(key(2))
        assert got is not None and bytes(got.byte_array) == bytes(obj.byte_array)
        got.ref_count_down()
        assert stalled.recv(1) == b""  # dropped after the frame timeout (1 s)
        assert time.monotonic() - started < 3
        stalled.close()
        assert not tier.contains(key(1)), "a partial value became visible"
        # a well-formed frame of an unknown operation: answered, connection kept
        client = raw(server)
        reply = client.call(99, b"k", [b"payload"], deadline=time.monotonic() + 5)
        assert reply.status == Status.UNKNOWN_OP and not client.closed
        assert client.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
        client.close()
        after = server_stats(server)
        assert after["unknown_ops"] == before["unknown_ops"] + 1
        assert after["timeouts"] >= before["timeouts"] + 1
        assert tier.stats.failures == 0
    finally:
        obj.ref_count_down()
        tier.close()


def test_announced_lengths_are_not_allocated(server):
    """Frames that announce big payloads and never send them cost the server no memory:
    a length over the limit is refused on the header, and one within it reserves room
    in the fixed budget only (no memory from the system) until the frame times out."""
    pid = server.pid
    rss_before = rss_bytes(pid)
    socks = []
    for i in range(8):  # 8 x 60 MiB announced, within the 64 MiB limit
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        name = f"ns/vllm@m@1@0@{i:064x}".encode()
        s.sendall(encode_header(Op.PUT, key_len=len(name), payload_len=60 * MiB) + name)
        socks.append(s)
    for _ in range(8):  # and lengths over the limit, many times
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(encode_header(Op.PUT, key_len=4, payload_len=1 << 50))
            assert _answer(s)[0] == Status.OVER_LIMIT
    time.sleep(0.3)
    assert rss_bytes(pid) - rss_before < 32 * MiB
    for s in socks:
        assert s.recv(1) == b""  # each dropped after the frame timeout
        s.close()
    stats = server_stats(server)
    assert stats["clients"] == 1  # this STATS connection only


def test_bad_keys_and_empty_values_are_refused(server):
    client = raw(server)
    for name in (b"no-namespace-here", b"ns/not-a-key", b"bad ns!/vllm@m@1@0@" + b"a" * 64,
                 b"\xff\xfe/x", b"ns/vllm@m@1@0@" + b"a" * 64 + b"@extra"):
        reply = client.call(Op.GET, name, arg=100, deadline=time.monotonic() + 5)
        assert reply.status == Status.BAD_REQUEST, name
    reply = client.call(Op.PUT, b"ns/vllm@m@1@0@" + b"a" * 64, [],
                        deadline=time.monotonic() + 5)
    assert reply.status == Status.BAD_REQUEST and "empty" in reply.message()
    assert client.call(Op.PING, deadline=time.monotonic() + 5).status == Status.OK
    client.close()


def test_a_get_names_the_most_bytes_it_accepts(server, allocator):
    tier = lm_tier(server.url, allocator)
    obj = chunk(allocator, 3)
    try:
        assert tier.submit_put_task(key(3), obj).result(timeout=10)
        name = tier.transport.object_name(key(3).to_string())
        client = raw(server)
        before = server_stats(server)["bytes_out"]
        reply = client.call(Op.GET, name.encode(), arg=100, max_reply=100,
                            deadline=time.monotonic() + 5)
        assert reply.status == Status.TOO_LARGE and not reply.payload
        assert reply.arg == OBJECT_HEADER_SIZE + obj.get_size()  # the value's length
        assert server_stats(server)["bytes_out"] - before < 1000  # the value was not sent
        client.close()
        # the tier: a value longer than what it asks for is a bad value, not an outage
        assert tier.transport.get(name, max_bytes=100) == b""
        tier.max_value_bytes = 100
        assert tier.get_blocking(key(3)) is None
        assert tier.stats.bad_values == 1 and tier.stats.failures == 0
    finally:
        obj.ref_count_down()
        tier.close()


def test_namespaces_are_kept_apart(server, allocator):
    a = lm_tier(server.url, allocator, namespace="tenant-a")
    b = lm_tier(server.url, allocator, namespace="tenant-b")
    same = lm_tier(server.url, allocator, namespace="tenant-a")
    obj = chunk(allocator, 4)
    try:
        k = CacheEngineKey("vllm", "org/m", 1, 0, uuid.uuid4().hex * 2)
        assert a.submit_put_task(k, obj).result(timeout=10)
        assert not b.contains(k) and b.get_blocking(k) is None
        got = same.get_blocking(k)
        assert got is not None and bytes(got.byte_array) == bytes(obj.byte_array)
        got.ref_count_down()
    finally:
        obj.ref_count_down()
        for t in (a, b, same):
            t.close()


# -- the conformance kit -------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_servers():
    """Servers of a given memory budget, started when first asked for."""
    servers: dict[int, LMCacheServer] = {}
    yield servers
    for srv in servers.values():
        srv.stop()


class TestLMServerConformance(StorageBackendConformance):
    """The storage backend kit on the ``lm`` tier against a real server; damage is done
    behind the tier's back through the wire protocol. ``has_budget``: a server of that
    budget is started (once per budget)."""

    persistent = True
    has_budget = True
    serde = "naive"  # received straight into the chunk's memory

    @pytest.fixture
    def backend_factory(self, allocator, server, budget_servers):
        ns = namespace()

        def make(budget_bytes=None):
            srv = server
            options: dict = {"namespace": ns, "timeout_s": 10, "serde": self.serde}
            if budget_bytes is not None:
                srv = budget_servers.get(budget_bytes)
                if srv is None:
                    srv = LMCacheServer(cpu_gb=budget_bytes / 1024**3).start()
                    budget_servers[budget_bytes] = srv
                options["known_keys"] = 0  # contains() asks the server
            return registry.create("storage_backend", "lm", {"url": srv.url, **options},
                                   None, None, TierContext(tier_name="lm",
                                                           memory_allocator=allocator))

        return make

    def _value(self, backend, key) -> tuple[WireClient, bytes, bytearray]:
        name = backend.transport.object_name(key.to_string()).encode()
        client = WireClient.connect(backend.transport.host, backend.transport.port,
                                    time.monotonic() + 10)
        reply = client.call(Op.GET, name, arg=1 << 30, max_reply=1 << 30,
                            deadline=time.monotonic() + 10)
        assert reply.status == Status.OK
        return client, name, reply.payload

    def _put_raw(self, client, name, value) -> None:
        assert client.call(Op.PUT, name, [value], deadline=time.monotonic() + 10).status \
            == Status.OK
        client.close()

    def corrupt(self, backend, key):
        client, name, value = self._value(backend, key)
        value[-1] ^= 0xFF
        value[len(value) // 2] ^= 0x55
        self._put_raw(client, name, value)

    def truncate(self, backend, key):
        client, name, value = self._value(backend, key)
        self._put_raw(client, name, value[:-100])

    def lose(self, backend, key):
        client, name, _ = self._value(backend, key)
        assert client.call(Op.DELETE, name, deadline=time.monotonic() + 10).status == \
            Status.OK
        client.close()


class TestLMServerConformanceZstd(TestLMServerConformance):
    """The kit again with the ``zstd`` serde: values received into a buffer, decoded by
    the serde."""

    serde = "zstd"
    has_budget = False


def test_naive_values_are_received_in_place_and_others_through_the_serde(server,
                                                                         allocator):
    naive = lm_tier(server.url, allocator)
    zstd = lm_tier(server.url, allocator, serde="zstd")
    obj = chunk(allocator, 8)
    try:
        assert type(naive.serde).__name__ == "ReceivingSerde"
        assert type(zstd.serde).__name__ == "ZstdSerde"
        for tier in (naive, zstd):
            assert tier.submit_put_task(key(8), obj).result(timeout=10)
            tier._known.clear()
            got = tier.get_blocking(key(8))
            assert got is not None and torch.equal(got.tensor, obj.tensor)
            got.ref_count_down()
            tier.remove(key(8))
    finally:
        obj.ref_count_down()
        naive.close()
        zstd.close()


# -- two engines, two processes ------------------------------------------------------------


def run_instance(role: str, seed: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.integration.server_instance", role, str(seed)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, **env, "PYTHONHASHSEED": str(hash(role) % 1000)})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_engines_in_two_processes_share_through_the_server(server):
    from tests.integration.server_instance import NUM_TOKENS

    # what vLLM's kv_cache_sharing_lmcache_v1.py example sets, on a small chunk
    env = {"LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_LOCAL_CPU": "False",
           "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05", "LMCACHE_REMOTE_URL": server.url,
           "LMCACHE_REMOTE_SERDE": "naive"}
    before = server_stats(server)
    seed = int(uuid.uuid4().int % 100000)
    stored = run_instance("store", seed, env)
    chunks = -(-NUM_TOKENS // CHUNK)
    assert stored["tiers"] == ["remote"]
    assert stored["stats"]["remote"]["puts"] == chunks
    assert stored["stats"]["remote"]["failures"] == 0
    loaded = run_instance("load", seed, env)
    assert loaded == {"role": "load", "tiers": ["remote"], "lookup": NUM_TOKENS,
                      "loaded": NUM_TOKENS, "exact": True}
    after = server_stats(server)
    assert after["puts"] - before["puts"] == chunks
    assert after["hits"] - before["hits"] == chunks


# -- the server dies in the middle of a run ---------------------------------------------


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "disk"])
def test_server_killed_and_restarted_mid_run(build, disk):  # noqa: F811
    srv = LMCacheServer(cpu_gb=0.05, disk=disk, disk_gb=0.05).start()
    g = Geometry()
    # only the lm tier: every hit comes from the server. error_handling off: had the tier
    # raised, the exception would reach this test.
    config = make_config(error_handling=False, storage_backends=[
        {"name": "remote", "url": srv.url, "timeout_s": 1.0, "retry_interval_s": 0.1,
         "max_retry_interval_s": 0.2, "namespace": namespace()}])
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    tier = engine.storage_manager.tiers["remote"]
    bound = tier.bound_s
    n = 2 * CHUNK
    hits = {"before": 0, "during": 0, "after_new": 0, "after_old": 0}
    slowest = 0.0

    def timed(fn, *args, **kwargs):
        nonlocal slowest
        started = time.monotonic()
        out = fn(*args, **kwargs)
        slowest = max(slowest, time.monotonic() - started)
        return out

    try:
        for step in range(24):
            if step == 8:
                if disk:  # the disk tier is written through, asynchronously: let it land
                    deadline = time.monotonic() + 10
                    while server_stats(srv)["disk_chunks"] < 16:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                srv.kill()
            if step == 16:
                srv.start()  # the same port (and disk directory)
                time.sleep(0.3)  # longer than the back-off: the next call probes
            toks = tokens(n, seed=100 + step)
            src = paged_kwargs(g, n, seed=100 + step)
            timed(engine.store, toks, **src)
            timed(engine.storage_manager.flush)
            seeds = [step, step - 1, step - 2]
            if step >= 16:
                seeds.append(step - 16)  # a prompt stored before the kill
            for seed in (s for s in seeds if s >= 0):
                toks = tokens(n, seed=100 + seed)
                src = paged_kwargs(g, n, seed=100 + seed)
                dst = paged_kwargs(g, n, seed=100 + seed, zero=True)
                mask = timed(engine.retrieve, toks, **dst)
                assert loaded_exactly(src, dst, mask, src["slot_mapping"]), (step, seed)
                hit = int(mask.sum())
                if step < 8:
                    hits["before"] += hit
                elif step < 16:
                    hits["during"] += hit
                elif seed >= 16:
                    hits["after_new"] += hit
                elif seed < 8:
                    hits["after_old"] += hit
        assert hits["before"] > 0 and hits["during"] == 0
        assert hits["after_new"] == 8 * 3 * n - 3 * n  # the clients reconnected by themselves
        # the old prompts (stored before the kill) come back from the disk tier only
        assert hits["after_old"] == (8 * n if disk else 0)
        assert slowest <= bound, f"a call took {slowest:.2f} s, over the bound {bound} s"
        stats = tier.stats
        assert stats.outages >= 1 and stats.dropped_puts > 0
    finally:
        srv.stop()


def test_a_frozen_server_costs_bounded_misses(allocator):
    srv = LMCacheServer(cpu_gb=0.05).start()
    tier = lm_tier(srv.url, allocator, timeout_s=0.5, retry_interval_s=0.1,
                   max_retry_interval_s=0.2)
    obj = chunk(allocator, 5)
    try:
        assert tier.submit_put_task(key(5), obj).result(timeout=5)
        srv.pause()  # accepts connections (the kernel does), answers nothing
        worst = 0.0
        for i in range(10):
            started = time.monotonic()
            tier._known.clear()
            assert not tier.contains(key(5)) and tier.get_blocking(key(5)) is None
            tier.submit_put_task(key(100 + i), obj)
            worst = max(worst, time.monotonic() - started)
        assert worst <= tier.bound_s * 2  # contains and get_blocking, each within its bound
        assert tier.stats.timeouts >= 1
        srv.resume()
        deadline = time.monotonic() + 10
        while True:  # back after the back-off, with fresh connections
            tier._known.clear()
            got = tier.get_blocking(key(5))
            if got is not None:
                break
            assert time.monotonic() < deadline, "the tier did not come back"
            time.sleep(0.1)
        assert bytes(got.byte_array) == bytes(obj.byte_array)
        got.ref_count_down()
    finally:
        srv.resume()
        obj.ref_count_down()
        tier.close()
        srv.stop()


# -- many clients at once ------------------------------------------------------------------


def test_sixteen_clients_store_and_load_at_once(allocator):
    """16 clients (each its own tier, as 16 engines would be) store and load for a
    bounded time against a server whose budget they overflow: no wrong KV, every call
    within its bound, the counts add up."""
    srv = LMCacheServer(cpu_gb=0.03).start()  # ~30 MiB: evictions happen
    clients = 16
    run_s = 4.0
    big = HostMemoryAllocator(256 * MiB)
    tiers = [lm_tier(srv.url, big, namespace="load", timeout_s=5) for _ in range(clients)]
    bound = tiers[0].bound_s
    counts = {"puts": 0, "hits": 0, "misses": 0, "wrong": 0, "slow": 0}
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + run_s
    peak_clients = 0

    def client(c: int) -> None:
        tier = tiers[c]
        rng = torch.Generator().manual_seed(c)
        mine: list[tuple[CacheEngineKey, int]] = []
        i = 0
        try:
            while time.monotonic() < stop_at:
                seed = c * 100000 + i
                i += 1
                obj = chunk(big, seed, shape=(2, 2, 64, 128))  # 64 KiB
                k = CacheEngineKey("vllm", "org/m", 1, 0, f"{seed:064x}")
                started = time.monotonic()
                future = tier.submit_put_task(k, obj)
                obj.ref_count_down()
                if future is not None and future.result(timeout=bound + 1):
                    mine.append((k, seed))
                    with lock:
                        counts["puts"] += 1
                # load one of anyone's chunks: mine or another client's
                other = int(torch.randint(0, clients, (1,), generator=rng))
                j = int(torch.randint(0, max(i, 1), (1,), generator=rng))
                oseed = other * 100000 + j
                ok = CacheEngineKey("vllm", "org/m", 1, 0, f"{oseed:064x}")
                tier._known.pop(ok, None)
                got = tier.get_blocking(ok)
                took = time.monotonic() - started
                with lock:
                    if took > 2 * bound:
                        counts["slow"] += 1
                    if got is None:
                        counts["misses"] += 1
                    else:
                        want = chunk(big, oseed, shape=(2, 2, 64, 128))
                        same = bytes(got.byte_array) == bytes(want.byte_array)
                        want.ref_count_down()
                        counts["hits" if same else "wrong"] += 1
                if got is not None:
                    got.ref_count_down()
        except Exception as exc:
            errors.append(f"client {c}: {exc!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        try:
            peak_clients = max(peak_clients, server_stats(srv)["clients"] - 1)
        except OSError:
            pass
        time.sleep(0.2)
    for t in threads:
        t.join()
    stats = server_stats(srv)
    try:
        print(f"\n16 clients for {run_s:g} s: {counts}; server: puts {stats['puts']}, hits "
              f"{stats['hits']}, misses {stats['misses']}, evicted {stats['evicted']}, "
              f"peak clients {peak_clients}")
        assert not errors, errors[:3]
        assert counts["wrong"] == 0 and counts["slow"] == 0
        assert counts["puts"] > clients and counts["hits"] > clients
        assert stats["puts"] == counts["puts"]
        assert stats["evicted"] > 0 and stats["errors"] == 0
        assert peak_clients >= clients
        assert sum(t.stats.failures for t in tiers) == 0
    finally:
        for t in tiers:
            t.close()
        srv.stop()
        assert big.num_active_allocations == 0


# -- budget --------------------------------------------------------------------------------


def test_the_budget_evicts_lru_and_a_value_too_big_is_only_a_miss(allocator):
    srv = LMCacheServer(cpu_gb=8 * MiB / 1024**3, extra_args=["--max-value-mb", "12"]).start()
    tier = lm_tier(srv.url, allocator, known_keys=0)
    shape = (2, 2, 256, 1024)  # 2 MiB of bf16
    objs = [chunk(allocator, 10 + i, shape) for i in range(6)]
    try:
        for i, obj in enumerate(objs):
            assert tier.submit_put_task(key(10 + i), obj).result(timeout=10)
        present = [tier.contains(key(10 + i)) for i in range(6)]
        assert present[-3:] == [True] * 3 and not all(present), present
        assert present == sorted(present)  # least recently used first out
        stats = server_stats(srv)
        assert stats["evicted"] >= 3 and stats["bytes"] <= stats["capacity_bytes"]
        # a value the budget cannot hold, and one over --max-value-mb: not stored, no outage
        for i, size in enumerate(((2, 2, 1280, 1024), (2, 2, 2048, 1024))):  # 10, 16 MiB
            big = HostMemoryAllocator(24 * MiB)
            obj = chunk(big, 99, size)
            assert tier.submit_put_task(key(90 + i), obj).result(timeout=10)
            obj.ref_count_down()
            assert not tier.contains(key(90 + i))
        assert server_stats(srv)["no_space"] == 1
        assert tier.stats.failures == 0 and tier.available
    finally:
        for obj in objs:
            obj.ref_count_down()
        tier.close()
        srv.stop()


# -- the commands ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["lmcache.experimental.server", "lmcache.v1.server"])
def test_the_seed_commands_start_and_serve(module, allocator):
    srv = LMCacheServer(module=module, cpu_gb=0.05).start()
    tier = lm_tier(srv.url, allocator)
    obj = chunk(allocator, 6)
    try:
        assert srv.argv()[1:4] == ["-m", module, "127.0.0.1"]
        assert tier.submit_put_task(key(6), obj).result(timeout=10)
        tier._known.clear()
        got = tier.get_blocking(key(6))
        assert got is not None and bytes(got.byte_array) == bytes(obj.byte_array)
        got.ref_count_down()
    finally:
        obj.ref_count_down()
        tier.close()
        srv.stop()


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_listening(proc: subprocess.Popen) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "listening on" in line:
            return "".join(lines)
    raise AssertionError("".join(lines))


def test_lmcache_server_command_with_a_device_and_a_disk(tmp_path):
    port = free_port()
    proc = _spawn([sys.executable, "-m", "lmcache.cli", "server", "127.0.0.1", str(port),
                   "cuda", "--cpu-gb", "0.05", "--disk", str(tmp_path / "d"), "--disk-gb",
                   "0.05"])
    try:
        out = _wait_listening(proc)
        assert "device 'cuda' ignored: the server keeps chunks in host memory" in out
        assert f"listening on 127.0.0.1:{port}" in out and "disk tier" in out
        client = WireClient.connect("127.0.0.1", port, time.monotonic() + 10,
                                    expect_service=CACHE_SERVER)
        assert client.info["limits"]["max_payload"] == 1024 * MiB
        stats = json.loads(client.call(Op.STATS, deadline=time.monotonic() + 5).payload)
        assert stats["disk_capacity_bytes"] == int(0.05 * 1024**3)
        client.close()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_are_refused():
    out = subprocess.run([sys.executable, "-m", "lmcache.server", "127.0.0.1", "1", "--cpu-gb",
                          "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--cpu-gb must be > 0" in out.stderr
