"""Never wrong KV, never unbounded memory, from any byte on disk or on the wire.

Objects damaged behind the engine's back -- copied or renamed onto another chunk's name,
of another dtype, with a crafted size, oversized, of the old format -- in the disk tier,
in Redis and in S3 (real redis-server and SeaweedFS). Each must be a miss: ``retrieve``
loads nothing for it and writes nothing into the serving engine's cache, raises nothing,
allocates nothing it cannot afford, does not promote it, and ``lookup`` does not count it
again.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib

import pytest
import redis
import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from lmcache.kits.object_format import HEADER_SIZE, MAGIC
from tests.kvutil import Geometry, paged_cache, slot_mapping, slots_of

CHUNK = 16
N = 3 * CHUNK
MODEL = "org/integrity-model"


# -- where the chunks live, as the engine does not see them ---------------------------------


class Disk:
    name = "disk"

    def __init__(self, tmp_path, request):
        self.path = tmp_path / "disk"

    def fields(self) -> dict:
        # a budget above the crafted objects below, so that they are read, not evicted
        return {"local_disk": str(self.path), "max_local_disk_size": 2}

    def tier(self, engine):
        return engine.storage_manager.tiers["local_disk"]

    def name_of(self, engine, key) -> str:
        return self.tier(engine).key_to_path(key)

    def get(self, name):
        return open(name, "rb").read()

    def put(self, name, data: bytes) -> None:
        with open(name, "wb") as f:
            f.write(data)

    def delete(self, name) -> None:
        os.unlink(name)


class Redis:
    name = "redis"

    def __init__(self, tmp_path, request):
        self.server = request.getfixturevalue("redis_server")
        self.client = redis.Redis.from_url(self.server.url)
        self.namespace = f"t{uuid.uuid4().hex[:12]}"

    def fields(self) -> dict:
        return {"storage_backends": [
            {"name": "local_cpu"},
            {"name": "redis", "url": self.server.url, "namespace": self.namespace,
             "timeout_s": 5, "serde": "zstd"}]}

    def tier(self, engine):
        return engine.storage_manager.tiers["redis"]

    def name_of(self, engine, key) -> str:
        return self.tier(engine).transport.object_name(key.to_string())

    def get(self, name):
        return self.client.get(name)

    def put(self, name, data: bytes) -> None:
        self.client.set(name, data)

    def delete(self, name) -> None:
        self.client.delete(name)


class S3:
    name = "s3"

    def __init__(self, tmp_path, request):
        import s3fs

        server = request.getfixturevalue("s3_server")
        self.bucket = request.getfixturevalue("s3_bucket")
        self.options = server.storage_options()
        self.fs = s3fs.S3FileSystem(**self.options)
        self.namespace = f"t{uuid.uuid4().hex[:12]}"

    def fields(self) -> dict:
        return {"storage_backends": [
            {"name": "local_cpu"},
            {"name": "remote", "url": f"{self.bucket}/kv", "namespace": self.namespace,
             "storage_options": self.options, "timeout_s": 10, "serde": "zstd"}]}

    def tier(self, engine):
        return engine.storage_manager.tiers["remote"]

    def name_of(self, engine, key) -> str:
        return self.tier(engine).transport.object_name(key.to_string())

    def get(self, name):
        return self.fs.cat_file(name)

    def put(self, name, data: bytes) -> None:
        self.fs.pipe_file(name, data)

    def delete(self, name) -> None:
        self.fs.rm_file(name)


@pytest.fixture(params=[Disk, Redis, S3], ids=lambda c: c.name)
def store(request, tmp_path):
    return request.param(tmp_path, request)


# -- engines ----------------------------------------------------------------------------------


@pytest.fixture
def engines():
    made = []

    def make(store, dtype=torch.bfloat16, allocator="host", cpu_gb=0.01):
        g = Geometry(dtype=dtype)
        config = LMCacheEngineConfig(chunk_size=CHUNK, max_local_cpu_size=cpu_gb,
                                     allocator=allocator, **store.fields())
        meta = LMCacheEngineMetadata(MODEL, 1, 0, "vllm", dtype, g.kv_shape(CHUNK))
        instance = f"integrity-{uuid.uuid4().hex[:8]}"
        engine = LMCacheEngineBuilder.get_or_create(
            instance, config, meta, VLLMPagedMemGPUConnectorV2(g.hidden, g.num_layers))
        made.append(instance)
        return engine, g

    yield make
    for instance in made:
        LMCacheEngineBuilder.destroy(instance)


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (N,), generator=torch.Generator().manual_seed(seed))


def kv(g: Geometry, seed: int, zero: bool = False) -> dict:
    return {"kvcaches": paged_cache(g, seed=seed, zero=zero),
            "slot_mapping": slot_mapping(g, N, seed=seed)}


def keys_of(engine, tokens):
    return [k for _, _, k in engine.token_database.process_tokens(tokens)]


def write(engine, g, tokens, seed: int) -> None:
    engine.store(tokens, **kv(g, seed))
    engine.storage_manager.flush()


def load(engine, g, tokens, seed: int) -> tuple[torch.Tensor, dict]:
    """Retrieve into a zeroed cache: the mask, and the cache it wrote into."""
    dst = kv(g, seed, zero=True)
    return engine.retrieve(tokens, **dst), dst


def untouched_after(dst: dict, first_token: int) -> bool:
    """Nothing was written into the slots of tokens from ``first_token`` on."""
    slots = dst["slot_mapping"][first_token:]
    return all(not slots_of(layer, slots).any() for layer in dst["kvcaches"])


def exact_prefix(src_seed: int, g: Geometry, dst: dict, n: int) -> bool:
    src = kv(g, src_seed)
    slots = src["slot_mapping"][:n]
    return all(torch.equal(slots_of(a, slots), slots_of(b, slots))
               for a, b in zip(src["kvcaches"], dst["kvcaches"]))


def assert_miss_from(reader, g, tokens, seed, first_bad_chunk: int) -> None:
    """Chunks before ``first_bad_chunk`` load bit-exact; from it on nothing loads,
    nothing is written, nothing is promoted, and lookup stops counting at it."""
    got, dst = load(reader, g, tokens, seed)
    good = first_bad_chunk * CHUNK
    assert int(got.sum()) == good, got
    assert exact_prefix(seed, g, dst, good)
    assert untouched_after(dst, good)
    bad_key = keys_of(reader, tokens)[first_bad_chunk]
    assert not reader.storage_manager.hot_tier.contains(bad_key)  # never promoted
    assert reader.lookup(tokens) == good  # and never counted again


# -- the cases ----------------------------------------------------------------------------------


def test_a_valid_object_copied_onto_another_chunk_is_a_miss(store, engines):
    writer, g = engines(store)
    p, q = prompt(1), prompt(2)
    write(writer, g, p, seed=1)
    write(writer, g, q, seed=2)
    target = store.name_of(writer, keys_of(writer, p)[1])
    store.put(target, store.get(store.name_of(writer, keys_of(writer, q)[1])))
    reader, _ = engines(store)
    assert_miss_from(reader, g, p, seed=1, first_bad_chunk=1)
    got, _ = load(reader, g, q, seed=2)  # the original is still the original's
    assert bool(got.all())


def test_a_valid_object_renamed_onto_another_chunk_is_a_miss(store, engines):
    writer, g = engines(store)
    p, q = prompt(3), prompt(4)
    write(writer, g, p, seed=3)
    write(writer, g, q, seed=4)
    source = store.name_of(writer, keys_of(writer, q)[0])
    store.put(store.name_of(writer, keys_of(writer, p)[0]), store.get(source))
    store.delete(source)
    reader, _ = engines(store)
    assert_miss_from(reader, g, p, seed=3, first_bad_chunk=0)


def test_a_chunk_of_another_dtype_is_a_miss_not_an_error(store, engines):
    writer, g = engines(store, dtype=torch.bfloat16)
    p = prompt(5)
    write(writer, g, p, seed=5)
    # another deployment of the same model name with fp16 KV shares the store
    reader, g16 = engines(store, dtype=torch.float16)
    got, dst = load(reader, g16, p, seed=5)
    assert not got.any() and untouched_after(dst, 0)
    assert reader.lookup(p) == 0
    assert not any(reader.storage_manager.hot_tier.contains(k) for k in keys_of(reader, p))


GIB = 1 << 30
#: What each crafted header announces: (MemoryFormat value, dtype code, shape).
ANNOUNCED = {"byte-buffer-1GiB": (3, 0, [GIB]), "kv-blob-1GiB": (1, 2, [2, 2, 1 << 24, 16])}


def _crafted_header(key, fmt_value: int, dtype_code: int, shape: list[int]) -> bytes:
    # A well-formed header -- valid checksums, this key's digest -- announcing 1 GiB of
    # zeros (whose sum64 checksum is 0): every byte of it is what the header says.
    from lmcache.kits.object_format import _CRC_OFFSET, _FIELDS, _KEY_OFFSET, key_digest

    buf = bytearray(HEADER_SIZE)
    _FIELDS.pack_into(buf, 0, MAGIC, 2, 1, fmt_value, dtype_code, len(shape),
                      *(shape + [0] * (8 - len(shape))), GIB, 0)
    buf[_KEY_OFFSET:_KEY_OFFSET + 16] = key_digest(key)
    struct.pack_into("<I", buf, _CRC_OFFSET, zlib.crc32(bytes(buf[:_CRC_OFFSET])))
    return bytes(buf)


_ZEROS_FRAME: list[bytes] = []


def _zstd_gib_of_zeros() -> bytes:
    # The zstd serde's frame header and a zstd frame that inflates to 1 GiB (~32 KiB).
    if not _ZEROS_FRAME:
        import zstandard

        out = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=GIB)
        zeros = bytes(1 << 20)
        frame = b"".join(out.compress(zeros) for _ in range(GIB // len(zeros))) + out.flush()
        _ZEROS_FRAME.append(struct.pack("<6sBBQ", b"LMCZST", 1, 0, len(frame)) + frame)
    return _ZEROS_FRAME[0]


@pytest.mark.parametrize("announced", list(ANNOUNCED))
def test_a_crafted_size_allocates_nothing(store, engines, announced, monkeypatch):
    writer, g = engines(store)
    p = prompt(6)
    write(writer, g, p, seed=6)
    key = keys_of(writer, p)[0]
    header = _crafted_header(key, *ANNOUNCED[announced])
    name = store.name_of(writer, key)
    if store.name == "disk":  # a sparse file of exactly the announced size
        with open(name, "wb") as f:
            f.write(header)
            f.truncate(HEADER_SIZE + GIB)
    else:  # a small zstd value that inflates to the announced size
        store.put(name, header + _zstd_gib_of_zeros())
    # the default allocator, whose byte buffers were once unbounded
    reader, _ = engines(store, allocator="mixed", cpu_gb=0.05)
    allocator = reader.memory_allocator
    granted: list[int] = []
    real = allocator.allocate

    def recording(shape, dtype, fmt=None):
        obj = real(shape, dtype, fmt) if fmt is not None else real(shape, dtype)
        if obj is not None:
            granted.append(obj.get_size())
        return obj

    monkeypatch.setattr(allocator, "allocate", recording)
    chunk_bytes = reader.chunk_spec.max_payload_bytes
    for _ in range(3):
        got, dst = load(reader, g, p, seed=6)
        assert not got.any() and untouched_after(dst, 0)
    assert all(n <= chunk_bytes for n in granted), f"allocated {max(granted)} bytes"
    assert reader.lookup(p) == 0


def test_an_oversized_object_is_not_read_whole(store, engines, monkeypatch):
    writer, g = engines(store)
    p = prompt(7)
    write(writer, g, p, seed=7)
    key = keys_of(writer, p)[0]
    name = store.name_of(writer, key)
    store.put(name, store.get(name) + os.urandom(32 << 20))  # 32 MiB more than a chunk
    reader, _ = engines(store)
    tier = store.tier(reader)
    read: list[int] = []
    transport = getattr(tier, "transport", None)
    if transport is not None:  # remote: what the store handed over
        real = transport.get

        def counting(name, max_bytes=None):
            data = real(name, max_bytes)
            read.append(0 if data is None else len(data))
            return data

        monkeypatch.setattr(transport, "get", counting)
    got, dst = load(reader, g, p, seed=7)
    assert not got.any() and untouched_after(dst, 0)
    assert reader.lookup(p) == 0
    if transport is not None:
        assert read and max(read) <= tier.max_value_bytes + 1, read


def test_an_object_of_the_old_format_is_a_miss(store, engines):
    writer, g = engines(store)
    p = prompt(8)
    write(writer, g, p, seed=8)
    from lmcache.kits.object_format import _CRC_OFFSET

    for key in keys_of(writer, p)[1:]:
        name = store.name_of(writer, key)
        data = bytearray(store.get(name))
        struct.pack_into("<H", data, 8, 1)  # format version 1, before key digests
        data[94:124] = bytes(30)
        struct.pack_into("<I", data, _CRC_OFFSET, zlib.crc32(bytes(data[:_CRC_OFFSET])))
        store.put(name, bytes(data))
    reader, _ = engines(store)
    assert_miss_from(reader, g, p, seed=8, first_bad_chunk=1)


def test_an_object_stored_under_no_key_is_a_miss(store, engines):
    writer, g = engines(store)
    p = prompt(9)
    write(writer, g, p, seed=9)
    key = keys_of(writer, p)[2]
    name = store.name_of(writer, key)
    store.put(name, _with_key_digest(store.get(name), bytes(16)))  # stored under no key
    reader, _ = engines(store)
    assert_miss_from(reader, g, p, seed=9, first_bad_chunk=2)


def _with_key_digest(value: bytes, digest: bytes) -> bytes:
    # Both serdes (and the disk tier) start a value with the object header.
    from lmcache.kits.object_format import _CRC_OFFSET, _KEY_OFFSET

    data = bytearray(value)
    data[_KEY_OFFSET:_KEY_OFFSET + 16] = digest
    struct.pack_into("<I", data, _CRC_OFFSET, zlib.crc32(bytes(data[:_CRC_OFFSET])))
    return bytes(data)


# -- lookup counts only what will load (the disk tier after a restart) --------------------------


def test_lookup_after_a_restart_counts_only_loadable_disk_chunks(tmp_path, engines):
    store = Disk(tmp_path, None)
    writer, g = engines(store)
    prompts = [prompt(20 + i) for i in range(4)]
    for i, p in enumerate(prompts):
        write(writer, g, p, seed=20 + i)
    names = [[store.name_of(writer, k) for k in keys_of(writer, p)] for p in prompts]
    LMCacheEngineBuilder.destroy(writer.engine_id)
    with open(names[0][1], "r+b") as f:  # truncated
        f.truncate(HEADER_SIZE + 10)
    with open(names[1][1], "r+b") as f:  # header zeroed
        f.write(bytes(HEADER_SIZE))
    os.replace(names[3][0], names[2][1])  # another chunk's object under this name
    reader, _ = engines(store)
    counts = [reader.lookup(p) for p in prompts]
    assert counts == [CHUNK, CHUNK, CHUNK, 0], counts
    for i, p in enumerate(prompts):  # and what is counted loads, bit-exact
        got, dst = load(reader, g, p, seed=20 + i)
        assert int(got.sum()) == counts[i] and exact_prefix(20 + i, g, dst, counts[i])


def test_a_payload_damaged_in_place_is_found_when_read(tmp_path, engines):
    # The header is intact, so a lookup counts the chunk (it reads headers only); the
    # retrieve finds the checksum wrong, loads nothing of it, and then it is not counted.
    store = Disk(tmp_path, None)
    writer, g = engines(store)
    p = prompt(30)
    write(writer, g, p, seed=30)
    name = store.name_of(writer, keys_of(writer, p)[1])
    LMCacheEngineBuilder.destroy(writer.engine_id)
    data = bytearray(store.get(name))
    data[-1] ^= 0xFF
    store.put(name, bytes(data))
    reader, _ = engines(store)
    assert reader.lookup(p) == N
    assert_miss_from(reader, g, p, seed=30, first_bad_chunk=1)
