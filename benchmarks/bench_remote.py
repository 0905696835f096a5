"""Store/retrieve throughput of the Redis and S3 tiers against raw redis-py and raw s3fs.

Llama-3-8B chunk geometry: 256 tokens x 32 layers x K/V x 8 KV heads x head 128, bf16
(32 MiB per chunk). Every figure is printed next to a baseline measured in the same run,
on the same bytes, at the same concurrency, interleaved with it (best of ``--repeat``):

- raw redis-py: ``SET``/``GET`` of each chunk's bytes with a plain ``redis.Redis``, once
  with hiredis (redis-py's default when it is installed, as it is with lmcache-redis)
  and once with redis-py's pure-Python parser and command packer (its default without
  hiredis); the tier is measured with the same choice on its own connections;
- raw s3fs: ``pipe_file``/``cat_file`` of each chunk's bytes.

The tiers are built as an engine builds them (the registry, the default options but
``url``, ``namespace`` and ``num_workers`` = the concurrency, the engine's chunk spec),
so a get reads what a serving engine reads (``GETRANGE`` bounded by the largest chunk).
The tier's figures include everything it does: the serde (header, checksum), the
thread hand-offs and timeouts, reading into memory from the engine's allocator and
verifying the checksum. Then the serdes: ratio and speed of ``zstd`` on KV computed by a
randomly initialised small Llama (transformers, if installed) and on Gaussian bf16 noise.

Servers: by default a ``redis-server`` and a SeaweedFS S3 server are started on loopback
(``lmcache.testing.servers``); ``--redis-url`` / ``--s3-url`` + ``--s3-endpoint`` use
existing ones instead.

Run:  .venv/bin/python benchmarks/bench_remote.py [--chunks 8] [--repeat 3] [--skip serde]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lmcache.abc.storage_backend import ChunkSpec, TierContext
from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.experimental.storage_backend.remote_backend import RemoteBackend
from lmcache.experimental.storage_backend.serde import NaiveSerde, ZstdSerde
from lmcache.plugin.registry import registry
from lmcache.utils import CacheEngineKey

LAYERS, HEADS, HEAD, CHUNK = 32, 8, 128, 256
SHAPE = (LAYERS, 2, CHUNK, HEADS, HEAD)
DTYPE = torch.bfloat16
GB = 1e9


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def keys(n: int) -> list[CacheEngineKey]:
    return [CacheEngineKey("vllm", "meta-llama/Meta-Llama-3-8B", 1, 0,
                           f"{uuid.uuid4().int:064x}") for _ in range(n)]


def parallel(threads: int, fn: Callable[[int], object], n: int) -> None:
    if threads == 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, range(n)))


class TierBench:
    """Interleaved runs of the tier and its raw baseline, at one concurrency."""

    def __init__(self, name: str, make_backend: Callable[[int], RemoteBackend],
                 raw_put: Callable[[str, bytes], None], raw_get: Callable[[str], bytes],
                 chunks: list, payloads: list[bytes]) -> None:
        self.name, self.make_backend = name, make_backend
        self.raw_put, self.raw_get = raw_put, raw_get
        self.chunks, self.payloads = chunks, payloads
        self.best: dict[str, float] = {}

    def _keep(self, what: str, seconds: float) -> None:
        self.best[what] = min(self.best.get(what, float("inf")), seconds)

    def run(self, threads: int) -> None:
        n = len(self.chunks)
        names = [f"raw-{uuid.uuid4().hex}" for _ in range(n)]
        self._keep("raw put", timed(lambda: parallel(
            threads, lambda i: self.raw_put(names[i], self.payloads[i]), n)))
        self._keep("raw get", timed(lambda: parallel(
            threads, lambda i: self.raw_get(names[i]), n)))

        backend = self.make_backend(threads)
        ks = keys(n)

        def put_all() -> None:
            futures = [backend.submit_put_task(k, c) for k, c in zip(ks, self.chunks)]
            for f in futures:
                assert f is not None and f.result() is True

        def get_one(i: int) -> None:
            obj = backend.get_blocking(ks[i])
            assert obj is not None, "a miss in the benchmark"
            obj.ref_count_down()

        self._keep("tier put", timed(put_all))
        backend._known.clear()  # retrieve as another instance would: ask the store
        self._keep("tier get", timed(lambda: parallel(threads, get_one, n)))
        stats = backend.stats
        assert stats.dropped_puts == 0 and stats.failures == 0, stats
        backend.close()

    def report(self, threads: int, nbytes: int) -> None:
        b = self.best
        for op in ("put", "get"):
            tier, raw = nbytes / b[f"tier {op}"] / GB, nbytes / b[f"raw {op}"] / GB
            print(f"  {self.name:5s} {op:3s}  x{threads}: tier {tier:6.2f} GB/s   raw "
                  f"{raw:6.2f} GB/s   ratio {tier / raw:5.2f}")


def make_tier(name: str, allocator, workers: int, **options: Any) -> RemoteBackend:
    """The tier ``name`` as an engine builds it: default options but ``options``."""
    spec = ChunkSpec(MemoryFormat.KV_BLOB, DTYPE, frozenset(
        (LAYERS, 2, n, HEADS, HEAD) for n in range(1, CHUNK + 1)))
    return registry.create("storage_backend", name, {"num_workers": workers, **options},
                           None, None, TierContext(tier_name=name, memory_allocator=allocator,
                                                   chunk_spec=spec))


def redis_parsers() -> list[tuple[str, dict[str, Any]]]:
    """The reply parsers to measure: (label, connection keywords of redis-py)."""
    from redis.connection import (
        Connection,
        PythonRespSerializer,
        _HiredisParser,
        _RESP2Parser,
    )
    from redis.utils import HIREDIS_AVAILABLE

    pure = {"parser_class": _RESP2Parser,
            "command_packer": PythonRespSerializer(6000, Connection().encoder.encode)}
    found = [("pure Python", pure)]
    if HIREDIS_AVAILABLE:
        found.insert(0, ("hiredis", {"parser_class": _HiredisParser}))
    else:
        print("\n(hiredis is not installed: pip install hiredis, or reinstall "
              "lmcache-redis, which depends on it)")
    return found


def redis_choice(client) -> str:
    """What a connection of ``client``'s pool parses and packs with (checked, not assumed)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        return f"{type(conn._parser).__name__} / {type(conn._command_packer).__name__}"
    finally:
        pool.release(conn)


def bench_redis(url: str, label: str, kwargs: dict[str, Any], allocator, chunks: list,
                payloads: list[bytes], threads: list[int], repeat: int) -> None:
    """The redis tier against raw redis-py, both with the parser and packer ``kwargs``."""
    import redis

    raw = redis.Redis.from_url(url, **kwargs)

    def make_redis(workers: int) -> RemoteBackend:
        raw.flushdb()
        backend = make_tier("redis", allocator, workers, url=url,
                            namespace=f"bench{uuid.uuid4().hex[:8]}")
        # the same parser and packer on the tier's connections (made on first use)
        backend.transport.client().connection_pool.connection_kwargs.update(kwargs)
        return backend

    probe = make_redis(1)
    choice = redis_choice(probe.transport.client())
    probe.close()
    print(f"\nRedis tier ({url}, serde naive) vs raw redis-py SET/GET, {label} (parser / "
          f"packer: raw {redis_choice(raw)}, tier {choice}):")
    nbytes = sum(len(p) for p in payloads)
    for t in threads:
        bench = TierBench("redis", make_redis, lambda k, v: raw.set(k, v), raw.get, chunks,
                          payloads)
        for _ in range(repeat):
            bench.run(t)
        bench.report(t, nbytes)
    raw.flushdb()
    raw.close()


def kv_chunks(allocator, n: int) -> list:
    chunks = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        obj = allocator.allocate(SHAPE, DTYPE, MemoryFormat.KV_BLOB)
        obj.tensor.copy_(torch.randn(SHAPE, generator=g).to(DTYPE))
        chunks.append(obj)
    return chunks


def llama_kv() -> tuple[torch.Tensor, str] | None:
    """K/V of a randomly initialised small Llama (transformers) for a random prompt."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                         vocab_size=32000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(DTYPE).eval()
    ids = torch.randint(0, config.vocab_size, (1, CHUNK * 4))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    kv = torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)])
                      for k, v in layers])  # [layers, 2, tokens, heads, head]
    return kv.contiguous(), (f"random-weight Llama (transformers), {config.num_hidden_layers} "
                             f"layers, {config.num_key_value_heads} KV heads, head "
                             f"{config.head_dim}, {ids.shape[1]} tokens")


def bench_serdes(allocator, repeat: int) -> None:
    print("\nserdes (one thread; MB/s of KV; encode = the pieces a transport sends, decode "
          "= into the allocator, checksum verified):")
    sources = []
    found = llama_kv()
    if found is not None:
        sources.append((found[1], found[0]))
    else:
        print("  (transformers not installed: no model KV)")
    sources.append(("Gaussian bf16 noise", torch.randn(4, 2, 1024, 8, 128).to(DTYPE)))
    serdes = [("naive", NaiveSerde()), ("zstd level 1, shuffle", ZstdSerde(1, True)),
              ("zstd level 1", ZstdSerde(1, False)), ("zstd level 3, shuffle",
                                                      ZstdSerde(3, True)),
              ("zstd level -3, shuffle", ZstdSerde(-3, True))]
    for label, kv in sources:
        obj = allocator.allocate(kv.shape, DTYPE, MemoryFormat.KV_BLOB)
        obj.tensor.copy_(kv)
        size = obj.get_size()
        print(f"  {label} ({size / 2**20:.0f} MiB):")
        for name, serde in serdes:
            data = b""
            enc = dec = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                parts = serde.serialize_parts(obj)  # what a transport sends, unjoined
                enc = min(enc, time.perf_counter() - start)
                data = b"".join(parts)
                start = time.perf_counter()
                back = serde.deserialize(data, allocator)
                dec = min(dec, time.perf_counter() - start)
                assert back is not None and bytes(back.byte_array) == bytes(obj.byte_array)
                back.ref_count_down()
            print(f"    {name:24s} ratio {size / len(data):5.3f}   encode "
                  f"{size / enc / 1e6:7.0f} MB/s   decode {size / dec / 1e6:7.0f} MB/s")
        obj.ref_count_down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8, help="32 MiB chunks per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,4", help="concurrencies to measure")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (else started)")
    parser.add_argument("--s3-url", default=None, help="s3://bucket/prefix (else started)")
    parser.add_argument("--s3-endpoint", default=None, help="endpoint_url of --s3-url")
    parser.add_argument("--skip", default="", help="comma list of: redis, s3, serde")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from lmcache.ops import cpu_ops

    kernels = cpu_ops(wait=True) is not None
    n = args.chunks
    chunk_bytes = torch.Size(SHAPE).numel() * DTYPE.itemsize
    nbytes = n * chunk_bytes
    print(f"geometry: Llama-3-8B chunk ({LAYERS} layers, {HEADS} KV heads, head {HEAD}, bf16, "
          f"{CHUNK} tokens) = {chunk_bytes / 2**20:.0f} MiB; {n} chunks per run "
          f"({nbytes / 2**30:.2f} GiB); best of {args.repeat}; CPU kernels: "
          f"{'compiled' if kernels else 'off'}")
    allocator = HostMemoryAllocator((n + 24) * (chunk_bytes + 4096), prefault=True)
    chunks = kv_chunks(allocator, n)
    payloads = [bytes(c.byte_array) for c in chunks]
    threads = [int(t) for t in args.threads.split(",")]
    started = []
    try:
        if "redis" not in skip:
            url = args.redis_url
            if url is None:
                from lmcache.testing.servers import RedisServer

                server = RedisServer().start()
                started.append(server)
                url = server.url
            for label, kwargs in redis_parsers():
                bench_redis(url, label, kwargs, allocator, chunks, payloads, threads,
                            args.repeat)
        if "s3" not in skip:
            if args.s3_url is None:
                from lmcache.testing.servers import SeaweedS3Server

                s3 = SeaweedS3Server().start()
                started.append(s3)
                base, options = s3.make_bucket("bench"), s3.storage_options()
            else:
                base, options = args.s3_url, ({"endpoint_url": args.s3_endpoint}
                                              if args.s3_endpoint else {})
            import s3fs

            fs = s3fs.S3FileSystem(**options)
            prefix = base.removeprefix("s3://").rstrip("/")

            def make_s3(workers: int) -> RemoteBackend:
                return make_tier("remote", allocator, workers, url=base,
                                 namespace=f"bench{uuid.uuid4().hex[:8]}",
                                 storage_options=options)

            print(f"\nS3 tier ({base} on {options.get('endpoint_url', 'AWS')}, serde naive) "
                  "vs raw s3fs pipe_file/cat_file:")
            for t in threads:
                bench = TierBench("s3", make_s3, lambda k, v: fs.pipe_file(f"{prefix}/{k}", v),
                                  lambda k: fs.cat_file(f"{prefix}/{k}"), chunks, payloads)
                for _ in range(args.repeat):
                    bench.run(t)
                bench.report(t, nbytes)
        if "serde" not in skip:
            bench_serdes(allocator, args.repeat)
    finally:
        for c in chunks:
            c.ref_count_down()
        for server in started:
            server.stop()


if __name__ == "__main__":
    main()
