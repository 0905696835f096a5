"""Store/retrieve throughput of the CPU and disk tiers against the machine's own limits.

Llama-3-8B geometry (32 layers, 8 KV heads, head size 128, bf16) in vLLM's paged
layout ([2, num_blocks, 16, 8, 128] per layer), 256-token chunks (32 MiB each). Every
figure is printed next to a baseline measured in the same run on the same bytes:

- memcpy: torch ``copy_`` of the chunk bytes into a preallocated tensor;
- raw disk: one sequential ``write`` / ``readinto`` per chunk file in the same directory.

The headline is the default configuration as a user gets it: a fresh process,
``LMCacheEngineConfig.from_defaults(chunk_size=256, remote_url=None)`` (the ``mixed``
allocator, its background prefault, a 5 GB CPU tier), new tokens every store, and the
first store of the new engine included -- once right after the engine is made, once
after a start-up pause (a serving engine loads its model after making the cache). The
rows below it are a tuned set-up, labelled: ``allocator: {name: host, prefault: true}``
(the whole region touched at start-up) and a warm-up store of the same tokens.

Disk figures come three ways, because the page cache decides what "disk" means:
warm reads and buffered writes run at memory speed (the engine's extra passes over
memory — the paged gather/scatter and the checksum — show); reads after dropping the
page cache (root only: ``/proc/sys/vm/drop_caches``) and writes with ``fsync`` measure
the device, which is what a restart or a cache larger than memory meets.

Run:  .venv/bin/python benchmarks/bench_engine.py [--tokens 8192] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.gpu_connector import VLLMPagedMemGPUConnectorV2
from lmcache.experimental.token_database import ChunkedTokenDatabase

LAYERS, HEADS, HEAD, BLOCK, CHUNK = 32, 8, 128, 16, 256
DTYPE = torch.bfloat16
GIB = 1024**3


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def drop_page_cache() -> bool:
    """Empty the page cache so that reads come from the device; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def make_paged(num_tokens: int):
    num_blocks = num_tokens // BLOCK
    layers = [torch.randn(2, num_blocks, BLOCK, HEADS, HEAD).to(DTYPE) for _ in range(LAYERS)]
    # vLLM's slot mapping: pages in any order (a busy server), tokens in order inside a page
    pages = torch.randperm(num_blocks)[: num_tokens // BLOCK]
    slots = (pages.repeat_interleave(BLOCK) * BLOCK + torch.arange(BLOCK).repeat(len(pages)))
    return layers, slots


def engine(instance: str, config: LMCacheEngineConfig):
    meta = LMCacheEngineMetadata("meta-llama/Meta-Llama-3-8B", 1, 0, "vllm", DTYPE,
                                 (LAYERS, 2, CHUNK, HEADS, HEAD))
    return LMCacheEngineBuilder.get_or_create(
        instance, config, meta, VLLMPagedMemGPUConnectorV2(HEADS * HEAD, LAYERS))


def default_child(n: int, pause_s: float) -> dict:
    """The default configuration in this (fresh) process: seconds of the first store,
    of two more stores of new tokens, and of retrieving each."""
    layers, slots = make_paged(n)
    kw = {"kvcaches": layers, "slot_mapping": slots}
    out = {"kvcaches": [torch.zeros_like(t) for t in layers], "slot_mapping": slots}
    prompts = [torch.randint(0, 128000, (n,)) for _ in range(3)]
    started = time.perf_counter()
    e = engine("bench-default", LMCacheEngineConfig.from_defaults(chunk_size=CHUNK,
                                                                  remote_url=None))
    result = {"create_s": time.perf_counter() - started, "store_s": [], "retrieve_s": []}
    time.sleep(pause_s)
    prefault = getattr(e.memory_allocator, "prefault", None)
    result["backed_gb"] = (prefault.populated / 1e9) if prefault is not None else None
    for tokens in prompts:
        t = time.perf_counter()
        e.store(tokens, **kw)
        result["store_s"].append(time.perf_counter() - t)
    for tokens in prompts:
        t = time.perf_counter()
        assert e.retrieve(tokens, **out).all()
        result["retrieve_s"].append(time.perf_counter() - t)
    assert all(torch.equal(a, b) for a, b in zip(layers, out["kvcaches"]))
    LMCacheEngineBuilder.destroy("bench-default")
    return result


def run_default(n: int, pause_s: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--tokens", str(n), "--default-child",
                           str(pause_s)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the default-configuration child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dir", default=None, help="directory for the disk tier")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--default-child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.default_child is not None:
        print(json.dumps(default_child(args.tokens // CHUNK * CHUNK, args.default_child)))
        return
    from lmcache.ops import cpu_ops

    kernels = cpu_ops(wait=True) is not None
    n = args.tokens // CHUNK * CHUNK
    nbytes = n * LAYERS * 2 * HEADS * HEAD * DTYPE.itemsize
    work = Path(args.dir or tempfile.mkdtemp(prefix="lmcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"geometry: Llama-3-8B ({LAYERS} layers, {HEADS} KV heads, head {HEAD}, bf16), "
          f"{n} tokens = {n // CHUNK} chunks of {CHUNK}, {nbytes / GIB:.2f} GiB; disk: {work}; "
          f"CPU kernels: {'compiled' if kernels else 'off (pure torch)'}")
    layers, slots = make_paged(n)
    tokens = torch.randint(0, 128000, (n,))
    kw = {"kvcaches": layers, "slot_mapping": slots}
    chunk_bytes = nbytes // (n // CHUNK)
    rows = []

    # -- baselines -----------------------------------------------------------------------
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    memcpy = nbytes / best(lambda: dst.copy_(src), args.repeat) / GIB

    def first_touch() -> None:  # memory never touched: the kernel backs it page by page
        torch.empty(nbytes, dtype=torch.uint8).copy_(src)

    fresh_memcpy = nbytes / best(first_touch, args.repeat) / GIB
    raw_dir = work / "raw"
    raw_dir.mkdir(exist_ok=True)
    chunks = [memoryview(src[i * chunk_bytes:(i + 1) * chunk_bytes].numpy())
              for i in range(n // CHUNK)]

    def raw_write():
        # new files in an emptied directory, as the disk tier writes them (emptying the
        # directory is not timed, for either)
        shutil.rmtree(raw_dir)
        raw_dir.mkdir()
        os.sync()  # start each timed write with no dirty pages pending, for both
        t = time.perf_counter()
        for i, c in enumerate(chunks):
            with open(raw_dir / f"{i}.bin", "wb") as f:
                f.write(c)
        return time.perf_counter() - t

    def raw_write_durable():
        shutil.rmtree(raw_dir)
        raw_dir.mkdir()
        os.sync()
        t = time.perf_counter()
        for i, c in enumerate(chunks):
            with open(raw_dir / f"{i}.bin", "wb") as f:
                f.write(c)
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(raw_dir, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return time.perf_counter() - t

    def raw_read():
        out = memoryview(dst.numpy())
        for i in range(len(chunks)):
            with open(raw_dir / f"{i}.bin", "rb", buffering=0) as f:
                f.readinto(out[i * chunk_bytes:(i + 1) * chunk_bytes])


    # -- headline: the default configuration, fresh processes ---------------------------
    headline = [run_default(n, 0.0), run_default(n, 2.0)]

    # -- CPU tier, tuned -----------------------------------------------------------------
    cpu_config = LMCacheEngineConfig(chunk_size=CHUNK, allocator={"name": "host",
                                     "prefault": True},
                                     max_local_cpu_size=nbytes / GIB * 1.05 + 0.01)
    e = engine("bench-cpu", cpu_config)
    e.store(tokens, **kw)  # warm: pages and code paths

    def cpu_store():
        for key in list(e.storage_manager.hot_tier._objects):
            e.storage_manager.hot_tier.remove(key)
        e.store(tokens, **kw)

    store_s = best(cpu_store, args.repeat)
    out = {"kvcaches": [torch.zeros_like(t) for t in layers], "slot_mapping": slots}
    assert e.retrieve(tokens, **out).all()
    retrieve_s = best(lambda: e.retrieve(tokens, **out), args.repeat)
    assert all(torch.equal(a, b) for a, b in zip(layers, out["kvcaches"]))
    rows.append(("CPU tier store, tuned", nbytes / store_s / GIB, "memcpy", memcpy))
    rows.append(("CPU tier retrieve, tuned", nbytes / retrieve_s / GIB, "memcpy", memcpy))

    # lookup of a fully cached prompt: 128k tokens, stored with the same engine settings
    # (lookup cost is hashing + one index probe per chunk; chunk bytes do not matter)
    small_meta = LMCacheEngineMetadata("m", 1, 0, "vllm", DTYPE, (1, 2, CHUNK, 1, 8))
    small = LMCacheEngineBuilder.get_or_create(
        "bench-lookup", LMCacheEngineConfig(chunk_size=CHUNK, allocator="host",
                                            max_local_cpu_size=0.1),
        small_meta, VLLMPagedMemGPUConnectorV2(8, 1))
    long = torch.randint(0, 128000, (131072,))
    small.store(long, kvcaches=[torch.zeros(2, 131072 // BLOCK, BLOCK, 1, 8, dtype=DTYPE)],
                slot_mapping=torch.arange(131072))
    assert small.lookup(long) == 131072
    lookup_ms = statistics.median(
        [best(lambda: small.lookup(long), 1) for _ in range(20)]) * 1000
    LMCacheEngineBuilder.destroy("bench-lookup")
    db = ChunkedTokenDatabase(cpu_config, small_meta)
    million = torch.randint(0, 128000, (1 << 20,))
    hash_s = best(lambda: db.prefix_hashes(million), 5)
    LMCacheEngineBuilder.destroy("bench-cpu")

    # -- disk tier -----------------------------------------------------------------------
    disk = work / "lmcache"
    shutil.rmtree(disk, ignore_errors=True)
    disk_config = LMCacheEngineConfig(
        chunk_size=CHUNK, local_cpu=False, allocator={"name": "host", "prefault": True},
        max_local_cpu_size=nbytes / GIB * 1.1 + 0.1, local_disk=str(disk),
        max_local_disk_size=nbytes / GIB * 2 + 1)

    def disk_store(config=disk_config):
        shutil.rmtree(disk, ignore_errors=True)
        d = engine("bench-disk", config)
        os.sync()
        t = time.perf_counter()
        d.store(tokens, **kw)
        d.storage_manager.flush()
        elapsed = time.perf_counter() - t
        LMCacheEngineBuilder.destroy("bench-disk")
        return elapsed

    # The tier alone, on chunks already in CPU memory: what it adds to raw file I/O.
    stage_dir = work / "tier"  # its own directory: two live disk tiers never share one
    shutil.rmtree(stage_dir, ignore_errors=True)
    staged = engine("bench-stage", disk_config.model_copy(update={"local_disk": str(stage_dir)}))
    manager = staged.storage_manager
    chunk_list = list(staged.token_database.process_tokens(tokens))
    objs = []
    for start, end, _ in chunk_list:
        obj = manager.allocate(staged.gpu_connector.get_shape(end - start), DTYPE)
        staged.gpu_connector.from_gpu(obj, start, end, **kw)
        objs.append(obj)

    def tier_write():
        tier = manager.tiers["local_disk"]
        for (_, _, key) in chunk_list:
            tier.remove(key)
        os.sync()
        t = time.perf_counter()
        futures = [tier.submit_put_task(key, obj) for (_, _, key), obj in zip(chunk_list, objs)]
        for f in futures:
            f.result()
        return time.perf_counter() - t

    def tier_read():
        tier = manager.tiers["local_disk"]
        t = time.perf_counter()
        for _, _, key in chunk_list:
            tier.get_blocking(key).ref_count_down()
        return time.perf_counter() - t

    # disk writes here swing with the kernel's write-back: alternate the baselines and the
    # tier, each after a sync, and keep the best of each
    times: dict[str, list[float]] = {k: [] for k in ("raw_w", "store", "tier_w")}
    for _ in range(args.repeat):
        times["raw_w"].append(raw_write())
        times["tier_w"].append(tier_write())
        times["store"].append(disk_store())
    durable = LMCacheEngineConfig(
        chunk_size=CHUNK, local_cpu=False, allocator={"name": "host", "prefault": True},
        max_local_cpu_size=nbytes / GIB * 1.1 + 0.1, storage_backends=[
            {"name": "local_disk", "path": str(disk), "max_size_gb": nbytes / GIB * 2 + 1,
             "fsync": True}])
    times.update({"raw_w_sync": [], "store_sync": []})
    for _ in range(max(1, args.repeat - 1)):
        times["raw_w_sync"].append(raw_write_durable())
        times["store_sync"].append(disk_store(durable))
    d = engine("bench-disk", disk_config)  # a fresh engine: the index comes from the files
    out = {"kvcaches": [torch.zeros_like(t) for t in layers], "slot_mapping": slots}
    times.update({k: [] for k in ("raw_r", "retrieve", "tier_r")})
    for _ in range(args.repeat):
        times["raw_r"].append(best(raw_read, 1))
        times["tier_r"].append(tier_read())
        times["retrieve"].append(best(lambda: d.retrieve(tokens, **out), 1))
    assert all(torch.equal(a, b) for a, b in zip(layers, out["kvcaches"]))
    cold = drop_page_cache()
    if cold:
        times.update({"raw_r_cold": [], "retrieve_cold": []})
        for _ in range(max(1, args.repeat - 1)):
            drop_page_cache()
            times["raw_r_cold"].append(best(raw_read, 1))
            drop_page_cache()
            times["retrieve_cold"].append(best(lambda: d.retrieve(tokens, **out), 1))
        assert all(torch.equal(a, b) for a, b in zip(layers, out["kvcaches"]))
    LMCacheEngineBuilder.destroy("bench-disk")
    for obj in objs:
        obj.ref_count_down()
    LMCacheEngineBuilder.destroy("bench-stage")
    rate = {k: nbytes / min(v) / GIB for k, v in times.items()}
    rows.append(("disk tier write (from CPU memory)", rate["tier_w"], "raw write",
                 rate["raw_w"]))
    rows.append(("disk tier read (into CPU memory)", rate["tier_r"], "raw read", rate["raw_r"]))
    rows.append(("engine store to disk (until written)", rate["store"], "raw write",
                 rate["raw_w"]))
    rows.append(("engine retrieve from disk", rate["retrieve"], "raw read", rate["raw_r"]))
    rows.append(("engine store to disk, fsync", rate["store_sync"], "raw+fsync",
                 rate["raw_w_sync"]))
    if cold:
        rows.append(("engine retrieve, cold page cache", rate["retrieve_cold"], "raw cold",
                     rate["raw_r_cold"]))
    else:
        print("(cold-cache reads skipped: dropping the page cache needs root)")

    now, paused = headline
    print("\nheadline: default configuration (from_defaults), fresh process, new tokens "
          "every store")
    print(f"engine made in {now['create_s'] * 1000:.0f} ms")
    head_rows = [
        ("first store, right after start", nbytes / now["store_s"][0] / GIB),
        ("later stores, right after start", nbytes / statistics.median(
            now["store_s"][1:]) / GIB),
        ("first store, 2 s after start", nbytes / paused["store_s"][0] / GIB),
        ("later stores, 2 s after start", nbytes / statistics.median(
            paused["store_s"][1:]) / GIB),
        ("retrieve (median)", nbytes / statistics.median(
            now["retrieve_s"] + paused["retrieve_s"]) / GIB),
    ]
    print(f"memory backed by the prefault thread when the first store came: "
          f"{now['backed_gb']} GB right after start, {paused['backed_gb']} GB 2 s after "
          f"(of 5.37 GB); stores in ms: {[round(t * 1e3) for t in now['store_s']]}, "
          f"{[round(t * 1e3) for t in paused['store_s']]}")
    for name, value in head_rows:
        print(f"CPU tier {name:30} {value:7.2f}   {'memcpy':10} {memcpy:8.2f}  "
              f"{value / memcpy:5.2f}x")
    print(f"(memcpy into memory never touched before: {fresh_memcpy:.2f} GiB/s; the first "
          f"store right after start is {head_rows[0][1] / fresh_memcpy:.2f}x that: the "
          "kernel backs the pages as they are written)")
    print(f"\n{'operation':38} {'GiB/s':>8}   {'baseline':10} {'GiB/s':>8}  ratio")
    for name, value, base, base_value in rows:
        print(f"{name:38} {value:8.2f}   {base:10} {base_value:8.2f}  {value / base_value:5.2f}x")
    print(f"\nlookup, 131072-token prompt fully cached: {lookup_ms:.2f} ms (median of 20)")
    print(f"token hashing (sha256 chain, 256-token chunks): {(1 << 20) / hash_s / 1e6:.0f} "
          f"M tokens/s")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        for folder in (raw_dir, disk, stage_dir):
            shutil.rmtree(folder, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
