"""A retrieve with ``timeout_s`` ends by its deadline when the remote tier is frozen.

Real servers on loopback (redis-server, SeaweedFS for ``s3://``), each test with a
server of its own, since it freezes it (SIGSTOP). The engine has a small CPU tier above
the remote one; the hot tier is emptied after the store, so that every chunk has to come
from the frozen store. With the deadline the call ends within it (plus a margin for a
loaded machine), also once the store is in an outage and the tier's ``contains`` asks
it again; without, it waits for the tier's own timeout. Chunks that arrive after the
deadline are released, the mask is always a prefix, and once the store answers again
the whole prompt loads bit-exact.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmcache.testing.fixtures import service_missing
from lmcache.testing.servers import RedisServer, SeaweedS3Server, ServiceUnavailable
from tests.integration.test_engine import (
    CHUNK,
    CONNECTORS,
    build,  # noqa: F401 - the fixture
    make_config,
    metadata,
    paged_kwargs,
    tokens,
)
from tests.integration.test_remote_tiers import loaded_exactly
from tests.kvutil import Geometry, wait_until

#: The remote tier's own bound on one call: long enough that waiting for it is clearly
#: not the deadline, short enough that the test measures it.
TIER_TIMEOUT_S = 3.0
DEADLINE_S = 0.5
#: What a retrieve with DEADLINE_S may take on a loaded machine (copies, thread starts).
DEADLINE_BOUND_S = 1.5
CHUNKS = 12


@pytest.fixture(params=["redis", "s3"])
def remote(request) -> Iterator[tuple[Any, dict]]:
    """A server of the test's own and the storage_backends entry of a tier on it."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    bounds = {"timeout_s": TIER_TIMEOUT_S, "retry_interval_s": 0.1,
              "max_retry_interval_s": 0.2, "namespace": namespace}
    if request.param == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError as exc:
            service_missing("s3fs", exc)
        server: Any = SeaweedS3Server()
    else:
        server = RedisServer()
    try:
        server.start()
    except ServiceUnavailable as exc:
        service_missing(f"a {request.param} server", exc)
    try:
        if request.param == "s3":
            tier = {"name": "remote", "url": f"{server.make_bucket('lmcache-deadline')}/kv",
                    "storage_options": server.storage_options(), **bounds}
        else:
            tier = {"name": "redis", "url": server.url, **bounds}
        yield server, tier
    finally:
        server.resume()
        server.stop()


def is_prefix(mask: torch.Tensor) -> bool:
    n = int(mask.sum())
    return bool(mask[:n].all()) and not mask[n:].any() and n % CHUNK == 0


def timed_retrieve(engine, toks, g, n, **kwargs) -> tuple[float, torch.Tensor, dict]:
    dst = paged_kwargs(g, n, seed=7, zero=True)
    started = time.monotonic()
    mask = engine.retrieve(toks, **dst, **kwargs)
    return time.monotonic() - started, mask, dst


def stopped_at_deadline(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lmcache.kernel.cache_engine"
            and r.levelno >= logging.WARNING and "stopped at its deadline" in r.getMessage()]


def test_retrieve_ends_by_its_deadline_when_the_remote_tier_is_frozen(
        build, remote, caplog):  # noqa: F811
    server, tier = remote
    g = Geometry()
    # error_handling off: a deadline reached is a miss, never a StorageFault
    config = make_config(error_handling=False, storage_backends=["local_cpu", tier])
    engine = build(config, metadata(g), CONNECTORS["paged_v2_stacked"](g))
    manager = engine.storage_manager
    allocator = engine.memory_allocator
    n = CHUNKS * CHUNK
    toks = tokens(n, seed=3)
    src = paged_kwargs(g, n, seed=7)
    engine.store(toks, **src)
    manager.flush(timeout=30)
    hot = manager.hot_tier
    assert hot.evict_for(1 << 40) and len(hot) == 0  # every chunk is in the remote only
    assert allocator.num_active_allocations == 0
    assert engine.lookup(toks) == n
    caplog.set_level(logging.WARNING, logger="lmcache.kernel.cache_engine")

    # frozen: the deadline ends the call; the store answers right after, and what it
    # sends for the loads given up on (read ahead, or waited for) is released
    server.pause()
    try:
        with_deadline, mask, dst = timed_retrieve(engine, toks, g, n, timeout_s=DEADLINE_S)
    finally:
        server.resume()
    assert is_prefix(mask) and loaded_exactly(src, dst, mask, src["slot_mapping"])
    assert not mask.all()
    assert wait_until(lambda: allocator.num_active_allocations == len(hot),
                    within=2 * TIER_TIMEOUT_S), "chunks that arrived late were not released"
    stopped = stopped_at_deadline(caplog)
    assert len(stopped) == 1, stopped
    assert f"loaded {int(mask.sum())} of {n} tokens" in stopped[0]

    # frozen, with a prefetch of the prompt under way: the retrieve waits for it only
    # until the deadline; what the prefetch brings later is promoted, as prefetches are
    server.pause()
    try:
        engine.prefetch(toks)
        prefetching, mask, dst = timed_retrieve(engine, toks, g, n, timeout_s=DEADLINE_S)
    finally:
        server.resume()
    assert is_prefix(mask) and loaded_exactly(src, dst, mask, src["slot_mapping"])
    manager.wait_for_prefetches(timeout=2 * TIER_TIMEOUT_S)
    assert wait_until(lambda: allocator.num_active_allocations == len(hot), within=5)
    hot.evict_for(1 << 40)

    # frozen: without a deadline the call waits for the tier's own bound
    server.pause()
    try:
        without, mask, dst = timed_retrieve(engine, toks, g, n)
        assert is_prefix(mask) and loaded_exactly(src, dst, mask, src["slot_mapping"])
        # the store is in an outage now (its known keys forgotten): past the back-off,
        # the tier's contains asks the frozen store, for up to its own bound
        time.sleep(0.3)
        in_outage, mask, dst = timed_retrieve(engine, toks, g, n, timeout_s=DEADLINE_S)
        assert is_prefix(mask) and loaded_exactly(src, dst, mask, src["slot_mapping"])
        # the storage manager's get, which a retrieve falls back on, has the same bound
        first_key = next(iter(engine.token_database.process_tokens(toks)))[2]
        started = time.monotonic()
        assert manager.get(first_key, deadline=started + DEADLINE_S) is None
        get_s = time.monotonic() - started
    finally:
        server.resume()
    print(f"\n{tier['name']}: frozen store, {CHUNKS} chunks, tier timeout "
          f"{TIER_TIMEOUT_S:g} s: retrieve {with_deadline:.2f} s with timeout_s="
          f"{DEADLINE_S:g}, {prefetching:.2f} s with a prefetch under way, "
          f"{in_outage:.2f} s with the store in an outage ({get_s:.2f} s for one get), "
          f"{without:.2f} s without a deadline")
    assert with_deadline < DEADLINE_BOUND_S, with_deadline
    assert prefetching < DEADLINE_BOUND_S, prefetching
    assert get_s < DEADLINE_BOUND_S, get_s
    assert in_outage < DEADLINE_BOUND_S, in_outage
    assert without > TIER_TIMEOUT_S - 0.1, without
    assert len(stopped_at_deadline(caplog)) == 1  # a warning once per engine

    # the store answers again: the whole prompt loads, bit-exact, within a deadline
    def loads_all() -> bool:
        hot.evict_for(1 << 40)
        _, mask, dst = timed_retrieve(engine, toks, g, n, timeout_s=2 * TIER_TIMEOUT_S)
        assert is_prefix(mask) and loaded_exactly(src, dst, mask, src["slot_mapping"])
        return bool(mask.all())

    assert wait_until(loads_all, within=30), "the store did not come back"
    assert len(hot) == CHUNKS  # promoted
    assert wait_until(lambda: allocator.num_active_allocations == len(hot), within=5)


def test_the_vllm_step_is_held_no_longer_than_load_timeout_s(monkeypatch):
    """The connector's loads of one step share one bound: with the remote tier frozen,
    `start_load_kv` of two requests returns within ``load_timeout_s`` (not the tier's
    timeout per request), and the blocks not loaded are reported for recompute."""
    from types import SimpleNamespace

    from lmcache.integration.vllm.vllm_v1_adapter import (
        LMCacheConnectorMetadata,
        LMCacheConnectorV1Impl,
        LoadSpec,
        RequestMeta,
    )

    server = RedisServer()
    try:
        server.start()
    except ServiceUnavailable as exc:
        service_missing("a redis server", exc)
    block, chunk = 16, 32
    for name, value in {"CHUNK_SIZE": chunk, "LOCAL_DISK": "None", "REMOTE_URL": server.url,
                        "BLOCKING_TIMEOUT_SECS": TIER_TIMEOUT_S,
                        "LOAD_TIMEOUT_S": DEADLINE_S, "MAX_LOCAL_CPU_SIZE": 0.05}.items():
        monkeypatch.setenv(f"LMCACHE_{name}", str(value))
    vcfg = SimpleNamespace(
        instance_id=f"deadline-{uuid.uuid4().hex[:8]}",
        cache_config=SimpleNamespace(block_size=block),
        model_config=SimpleNamespace(model="unit/model"),
        kv_transfer_config=SimpleNamespace(kv_role="kv_both", kv_connector_extra_config={}))
    worker = LMCacheConnectorV1Impl(vcfg, SimpleNamespace(name="WORKER"), parent=None)
    try:
        gen = torch.Generator().manual_seed(4)
        caches = {f"layer.{i}": torch.randn(40, 2, block, 16, generator=gen) for i in range(2)}
        worker.register_kv_caches(caches)
        n = 8 * chunk
        prompts = {"a": list(range(1, n + 1)), "b": list(range(5000, 5000 + n))}
        blocks = {"a": list(range(0, 16)), "b": list(range(16, 32))}
        worker.bind_connector_metadata(LMCacheConnectorMetadata([
            RequestMeta(r, prompts[r], blocks[r], None, save_end=n) for r in prompts]))
        worker.wait_for_save()
        manager = worker.engine.storage_manager
        manager.flush(timeout=30)
        assert manager.hot_tier.evict_for(1 << 40) and len(manager.hot_tier) == 0
        meta = LMCacheConnectorMetadata([
            RequestMeta(r, prompts[r], blocks[r], None, load=LoadSpec(0, n, n - 1))
            for r in prompts])
        server.pause()
        try:
            worker.bind_connector_metadata(meta)
            started = time.monotonic()
            worker.start_load_kv(None)
            held = time.monotonic() - started
        finally:
            server.resume()
        failed = worker.get_block_ids_with_load_errors()
        print(f"\nstart_load_kv of 2 requests, Redis frozen: {held:.2f} s "
              f"(load_timeout_s={DEADLINE_S:g}, tier timeout {TIER_TIMEOUT_S:g} s)")
        assert held < DEADLINE_BOUND_S, held
        assert failed and failed <= set(blocks["a"]) | set(blocks["b"])
        assert set(blocks["b"]) <= failed  # the second request found no time left
        # the store answers again: a later step loads everything
        worker.bind_connector_metadata(meta)
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == set()
    finally:
        worker.shutdown()
        server.stop()
