"""Store/load throughput of the cache server's tier (``lm://``) next to a raw loopback socket
and the Redis tier, measured in the same run on the same bytes.

Chunks have the Llama-3-8B geometry (256 tokens x 32 layers x K/V x 8 KV heads x head 128,
bf16: 32 MiB each). Each figure is the best of ``--repeat`` rounds (the first round, with
its connections opened, is printed too), at 1 and at 4 clients (each client its own tier
and connection, as separate engines would be, on a thread of this process):

- **lm tier**: ``submit_put_task`` (serde header and checksum, the frame sent from the
  chunk's own memory) and ``get_blocking`` (received, copied into a memory object of the
  engine's allocator, checksum verified), against ``python -m lmcache.server`` in its
  own process;
- **raw socket**: the same bytes over a plain TCP connection to a minimal server process
  (length prefix, ``sendall``; the server receives into preallocated memory and answers
  with one byte; a load is received into a preallocated buffer): what loopback TCP
  costs, with nothing else;
- **redis tier**: the ``redis`` tier (lmcache-redis) against ``redis-server`` on loopback,
  when installed;
- **p2p fetch** (loads only: a p2p put is one index entry, no data): the ``p2p`` tier of
  each client asks the Redis index and fetches the chunk from the owner's peer service,
  received straight into a memory object, checksum verified. The owner is a ``p2p`` tier
  in this process serving the chunks from memory.

Ratios are the lm tier's (and the p2p fetch's) throughput over the raw socket's, and the
lm tier's over the redis tier's.

Run:  .venv/bin/python benchmarks/bench_server.py [--chunks 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.plugin.registry import registry
from lmcache.testing.servers import LMCacheServer, RedisServer, ServiceUnavailable, free_port
from lmcache.utils import CacheEngineKey

LAYERS, HEADS, HEAD, CHUNK = 32, 8, 128, 256
SHAPE = (LAYERS, 2, CHUNK, HEADS, HEAD)
DTYPE = torch.bfloat16
GB = 1e9
_LEN = struct.Struct("<cQ")  # op (b"P" put / b"G" get), length


# -- the raw socket baseline ------------------------------------------------------------------


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("closed")
        got += k


def raw_server(port: int, size: int) -> None:
    """A minimal server: a preallocated buffer per connection, put = receive into it, get
    = send it back."""
    listener = socket.create_server(("127.0.0.1", port))

    def serve(conn: socket.socket) -> None:
        buf = memoryview(bytearray(size))
        head = memoryview(bytearray(_LEN.size))
        with conn:
            try:
                while True:
                    _recv_into(conn, head)
                    op, n = _LEN.unpack(head)
                    if op == b"P":
                        _recv_into(conn, buf[:n])
                        conn.sendall(b"k")
                    else:
                        conn.sendall(buf[:n])
            except ConnectionError:
                return

    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class RawClient:
    def __init__(self, port: int, size: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(size))
        self.ack = memoryview(bytearray(1))

    def put(self, payload: memoryview) -> None:
        self.sock.sendall(_LEN.pack(b"P", payload.nbytes))
        self.sock.sendall(payload)
        _recv_into(self.sock, self.ack)

    def get(self, n: int) -> None:
        self.sock.sendall(_LEN.pack(b"G", n))
        _recv_into(self.sock, self.buf[:n])

    def close(self) -> None:
        self.sock.close()


# -- measuring --------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_threads(clients: int, fn: Callable[[int, int], object], n: int) -> None:
    """``fn(client, item)`` for every item, item i on client ``i % clients``."""
    def run(c: int) -> None:
        for i in range(c, n, clients):
            fn(c, i)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def new_keys(n: int) -> list[CacheEngineKey]:
    return [CacheEngineKey("vllm", "meta-llama/Meta-Llama-3-8B", 1, 0,
                           f"{uuid.uuid4().int:064x}") for _ in range(n)]


class Results:
    def __init__(self) -> None:
        self.best: dict[tuple[str, str, int], float] = {}
        self.first: dict[tuple[str, str, int], float] = {}

    def add(self, what: str, op: str, clients: int, seconds: float) -> None:
        k = (what, op, clients)
        self.first.setdefault(k, seconds)
        self.best[k] = min(self.best.get(k, float("inf")), seconds)


def tier_round(tiers: list, chunks: list, results: Results, name: str) -> None:
    clients, n = len(tiers), len(chunks)
    keys = new_keys(n)

    def put(c: int, i: int) -> None:
        future = tiers[c].submit_put_task(keys[i], chunks[i])
        assert future is not None and future.result() is True

    def get(c: int, i: int) -> None:
        obj = tiers[c].get_blocking(keys[i])
        assert obj is not None, f"a miss in the benchmark ({name})"
        obj.ref_count_down()

    results.add(name, "put", clients, timed(lambda: in_threads(clients, put, n)))
    for t in tiers:
        t._known.clear()  # load as another instance would: ask the store
    results.add(name, "get", clients, timed(lambda: in_threads(clients, get, n)))
    for k in keys:
        tiers[0].remove(k)
    for t in tiers:
        s = t.stats
        assert s.dropped_puts == 0 and s.failures == 0, (name, s)


def raw_round(clients_: list[RawClient], payloads: list[memoryview], results: Results) -> None:
    clients, n = len(clients_), len(payloads)
    results.add("raw", "put", clients, timed(lambda: in_threads(
        clients, lambda c, i: clients_[c].put(payloads[i]), n)))
    results.add("raw", "get", clients, timed(lambda: in_threads(
        clients, lambda c, i: clients_[c].get(payloads[i].nbytes), n)))


def p2p_round(owner, fetchers: list, chunks: list, results: Results,
              held: dict) -> None:
    clients, n = len(fetchers), len(chunks)
    keys = new_keys(n)
    for k, c in zip(keys, chunks):
        held[k] = c
        future = owner.submit_put_task(k, c)  # one index entry
        assert future is not None and future.result() is True

    def get(c: int, i: int) -> None:
        obj = fetchers[c].get_blocking(keys[i])
        assert obj is not None, "a miss in the benchmark (p2p)"
        obj.ref_count_down()

    results.add("p2p", "get", clients, timed(lambda: in_threads(clients, get, n)))
    for k in keys:
        owner.remove(k)
        held.pop(k, None)


def p2p_tier(redis, port: int, ns: str, context: TierContext, held: dict):
    def read_local(key):
        obj = held.get(key)
        if obj is not None:
            obj.ref_count_up()
        return obj

    ctx = TierContext(tier_name="p2p", memory_allocator=context.memory_allocator,
                      read_local=read_local)
    return registry.create("storage_backend", "p2p", {
        "lookup_url": redis.url, "distributed_url": f"127.0.0.1:{port}", "namespace": ns,
        "timeout_s": 60}, None, None, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    nbytes = torch.Size(SHAPE).numel() * DTYPE.itemsize
    if args.raw_server:
        raw_server(args.raw_server, nbytes)
        return

    n = args.chunks
    allocator = HostMemoryAllocator((n + 2 * max(args.clients) + 2) * (nbytes + 4096))
    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(n):
        obj = allocator.allocate(SHAPE, DTYPE, MemoryFormat.KV_BLOB)
        obj.tensor.copy_(torch.randn(SHAPE, generator=g).to(DTYPE))
        chunks.append(obj)
    payloads = [c.byte_array for c in chunks]

    total_gb = (n + 2) * nbytes / 1024**3
    lm = LMCacheServer(cpu_gb=max(1.0, 2 * total_gb)).start(timeout=120)
    raw_port = free_port()
    raw = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--raw-server",
                            str(raw_port)], stdin=subprocess.DEVNULL)
    redis = None
    try:
        redis = RedisServer(extra_args=["--maxmemory", "0"]).start()
    except ServiceUnavailable as exc:
        print(f"(no redis tier: {exc})")
    try:
        registry.entry("storage_backend", "redis")
    except Exception as exc:  # lmcache-redis not installed
        print(f"(no redis tier: {exc})")
        if redis is not None:
            redis.stop()
        redis = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", raw_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        context = TierContext(tier_name="bench", memory_allocator=allocator)
        results = Results()
        for clients in args.clients:
            ns = uuid.uuid4().hex[:8]
            lm_tiers = [registry.create("storage_backend", "lm", {
                "url": lm.url, "namespace": ns, "timeout_s": 60}, None, None, context)
                for _ in range(clients)]
            redis_tiers = [] if redis is None else [registry.create(
                "storage_backend", "redis", {"url": redis.url, "namespace": ns,
                                             "timeout_s": 60}, None, None, context)
                for _ in range(clients)]
            raws = [RawClient(raw_port, nbytes) for _ in range(clients)]
            held: dict = {}
            p2p = [] if redis is None else [p2p_tier(redis, free_port(), ns, context, held)
                                            for _ in range(clients + 1)]
            for _ in range(args.repeat):  # interleaved: every round measures all of them
                raw_round(raws, payloads, results)
                tier_round(lm_tiers, chunks, results, "lm")
                if redis_tiers:
                    tier_round(redis_tiers, chunks, results, "redis")
                if p2p:
                    p2p_round(p2p[0], p2p[1:], chunks, results, held)
            for t in [*lm_tiers, *redis_tiers, *p2p]:
                t.close()
            for r in raws:
                r.close()
        report(results, n * nbytes, args.clients, redis is not None)
    finally:
        for c in chunks:
            c.ref_count_down()
        raw.kill()
        raw.wait()
        lm.stop()
        if redis is not None:
            redis.stop()


def report(results: Results, total: int, client_counts: list[int], with_redis: bool) -> None:
    print(f"\n{total / 2**20:.0f} MiB in {total // (32 << 20)} chunks of 32 MiB, loopback; "
          "GB/s (best of the rounds; the first round in parentheses)")
    header = f"{'op':4s} {'clients':>7s}  {'lm tier':>16s}  {'raw socket':>16s}"
    if with_redis:
        header += f"  {'redis tier':>16s}"
    header += "   lm/raw" + ("  lm/redis" if with_redis else "")
    print(header)
    def speed(what: str, op: str, clients: int, table: dict) -> float:
        return total / table[(what, op, clients)] / GB

    for op in ("put", "get"):
        for clients in client_counts:
            best = {w: speed(w, op, clients, results.best) for w in ("lm", "raw", "redis")
                    if (w, op, clients) in results.best}
            first = {w: speed(w, op, clients, results.first) for w in best}
            cells = [f"{best[w]:6.2f} ({first[w]:5.2f})" for w in best]
            line = f"{op:4s} {clients:7d}  " + "  ".join(f"{c:>16s}" for c in cells)
            line += f"   {best['lm'] / best['raw']:6.2f}"
            if with_redis:
                line += f"  {best['lm'] / best['redis']:8.2f}"
            print(line)
    if ("p2p", "get", client_counts[0]) in results.best:
        print(f"\n{'op':4s} {'clients':>7s}  {'p2p fetch':>16s}  {'raw socket':>16s}  p2p/raw")
        for clients in client_counts:
            p2p = speed("p2p", "get", clients, results.best)
            raw = speed("raw", "get", clients, results.best)
            first = speed("p2p", "get", clients, results.first)
            print(f"get  {clients:7d}  {p2p:6.2f} ({first:5.2f})  {raw:16.2f}  "
                  f"{p2p / raw:7.2f}")


if __name__ == "__main__":
    main()
