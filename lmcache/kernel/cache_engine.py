"""The cache engine: the serving engine's entry point to store, look up and load KV."""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections import defaultdict
from typing import Any

import torch

from lmcache.abc.gpu_connector import GPUConnectorInterface
from lmcache.abc.memory import MemoryAllocatorInterface, MemoryFormat
from lmcache.abc.storage_backend import ChunkSpec, SupportsPinning
from lmcache.abc.token_database import TokenDatabase, supports_cache_salt
from lmcache.kernel.config import LMCacheEngineConfig
from lmcache.kernel.metadata import LMCacheEngineMetadata
from lmcache.kernel.storage_manager import StorageManager
from lmcache.plugin.manager import hooks
from lmcache.plugin.registry import registry
from lmcache.utils import LogOnce

logger = logging.getLogger(__name__)


class LMCacheEngine:
    """The main class for the cache engine.

    When storing, it takes the serving engine's KV cache (through the GPU connector),
    turns each chunk into a memory object in CPU memory and hands it to the storage
    manager, which keeps it in the CPU tier and writes it to the lower tiers
    asynchronously. When retrieving, it fetches the chunks from the tiers and puts them
    back into the serving engine's KV cache through the GPU connector. Prefetching moves
    chunks from lower tiers into CPU memory ahead of a retrieve; the storage manager
    makes a retrieve wait for a prefetch of the same chunk rather than load it twice.

    ``tokens`` are a 1-D tensor of token ids. A ``mask`` has the same length and always
    looks like ``FFFFFTTTTTTT``: ``True`` marks the tokens to store or match, and the
    number of ``False`` entries must be a multiple of the chunk size.
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata,
        memory_allocator: MemoryAllocatorInterface,
        token_database: TokenDatabase,
        gpu_connector: GPUConnectorInterface | None,
        *,
        storage_manager: StorageManager | None = None,
        engine_id: str | None = None,
    ):
        self.config = config
        self.metadata = metadata
        self.memory_allocator = memory_allocator
        self.token_database = token_database
        self.gpu_connector = gpu_connector
        _check_geometry(config, metadata)
        self.engine_id = engine_id or f"lmcache-{id(self):x}"
        self.chunk_spec = _chunk_spec(config, metadata, gpu_connector)
        self.storage_manager = storage_manager or StorageManager.from_config(
            config, metadata, memory_allocator, self.engine_id, self.chunk_spec)
        self._log_full = LogOnce(logger)
        self._log_load = LogOnce(logger)
        self._closed = False

    # -- helpers -------------------------------------------------------------------------------

    def _chunks(self, tokens: torch.Tensor, mask: torch.Tensor | None, cache_salt: str | None):
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a 1-D torch.Tensor of token ids, got "
                             f"{type(tokens).__name__}")
        if tokens.device.type == "meta":
            raise ValueError("tokens are on the meta device (no data); expected token ids "
                             "on the CPU or a GPU")
        if cache_salt is not None:
            _check_salt(cache_salt)
            if not supports_cache_salt(self.token_database):
                raise ValueError(f"cache_salt needs a token database that supports salts "
                                 f"(lmcache.abc.token_database.SupportsCacheSalt); "
                                 f"{type(self.token_database).__name__} does not")
            return self.token_database.process_tokens(tokens, mask, cache_salt=cache_salt)
        return self.token_database.process_tokens(tokens, mask)

    def _connector(self) -> GPUConnectorInterface:
        if self.gpu_connector is None:
            raise ValueError("this engine has no GPU connector: pass one to "
                             "LMCacheEngineBuilder.get_or_create or select gpu_connector in "
                             "the configuration")
        return self.gpu_connector

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"engine {self.engine_id!r} is closed")

    # -- the seed's API --------------------------------------------------------------------------

    @torch.no_grad()
    def store(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> None:
        """Store the KV of ``tokens`` (where ``mask`` is True) into the cache.

        ``kwargs`` go to the GPU connector (``kvcaches``, ``slot_mapping``, ...), except
        ``cache_salt``, a per-request salt that keeps tenants' chunks apart.

        :raises ValueError: if the number of ``False`` entries in the mask is not a
            multiple of the chunk size, or the connector's arguments are wrong.
        """
        self._check_open()
        connector = self._connector()
        cache_salt = kwargs.pop("cache_salt", None)
        chunks = list(self._chunks(tokens, mask, cache_salt))
        connector.check_kwargs(int(tokens.shape[0]), **kwargs)
        manager = self.storage_manager
        stored: dict[str, list] = defaultdict(lambda: [[], 0, 0])  # tiers done in this call
        started = time.perf_counter()
        # The prompt's own chunks in the hot tier stay there until this store ends, so a
        # prompt larger than the CPU budget never evicts its own prefix (what later
        # prompts can match). When memory runs out, the newest of its chunks that a lower
        # tier also took makes room; when none did, the tail is dropped.
        hot = manager.hot_tier
        pinning = hot if isinstance(hot, SupportsPinning) else None
        want_checksum = "sum64" if any(t is not hot for t in manager.tiers.values()) else None
        pinned: list[tuple[Any, bool]] = []  # (key, a lower tier has it), oldest first
        try:
            for i, (start, end, key) in enumerate(chunks):
                if manager.is_stored_or_storing(key):
                    if pinning is not None and pinning.pin(key):
                        pinned.append((key, False))
                    continue
                shape = connector.get_shape(end - start)
                obj = manager.allocate(shape, self.metadata.kv_dtype, MemoryFormat.KV_BLOB)
                while obj is None and pinning is not None:
                    own = next((j for j in range(len(pinned) - 1, -1, -1) if pinned[j][1]),
                               None)
                    if own is None:
                        break
                    pinning.unpin(pinned.pop(own)[0])
                    obj = manager.allocate(shape, self.metadata.kv_dtype,
                                           MemoryFormat.KV_BLOB)
                if obj is None:
                    self._store_stopped(shape, i, len(chunks), bool(pinned))
                    break
                try:
                    # a connector that checksums the payload as it writes it says so here,
                    # when a tier below the CPU will need the checksum
                    obj.metadata.payload_checksum = None
                    obj.metadata.want_checksum = want_checksum
                    connector.from_gpu(obj, start, end, **kwargs)
                    done, below = manager.put(key, obj, end - start)
                    for tier in done:
                        _add(stored[tier], key, end - start, obj.get_size())
                finally:
                    obj.ref_count_down()
                if pinning is not None and pinning.pin(key):
                    pinned.append((key, below))
        finally:
            for key, _ in pinned:
                pinning.unpin(key)  # type: ignore[union-attr]
        duration = time.perf_counter() - started
        for tier, (keys, num_tokens, num_bytes) in stored.items():
            hooks().lmcache_chunks_stored(
                engine_id=self.engine_id, tier=tier, keys=keys, num_tokens=num_tokens,
                num_bytes=num_bytes, duration_s=duration)

    def _store_stopped(self, shape: torch.Size, done: int, total: int, kept: bool) -> None:
        nbytes = shape.numel() * self.metadata.kv_dtype.itemsize
        try:
            capacity = self.memory_allocator.capacity
        except NotImplementedError:
            capacity = None
        if capacity is not None and nbytes > capacity:
            self._log_full("chunk", "a chunk of %d bytes is larger than the whole CPU memory "
                           "of the cache (%d bytes, max_local_cpu_size): nothing can be "
                           "stored; raise max_local_cpu_size or lower chunk_size", nbytes,
                           capacity)
        elif kept:
            self._log_full("prompt", "a prompt of %d chunks does not fit in the CPU memory "
                           "of the cache (%s bytes, max_local_cpu_size): kept its first %d "
                           "chunks, the prefix that later prompts can match, and stored no "
                           "more", total, capacity, done)
        else:
            self._log_full("full", "CPU memory for the cache is full of chunks in use; "
                           "skipping the rest of this store")

    @torch.no_grad()
    def retrieve(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Load the cached KV of the longest cached prefix of ``tokens`` into the serving
        engine through the GPU connector.

        ``kwargs`` go to the GPU connector (``kvcaches``, ``slot_mapping``, ...), except
        ``cache_salt`` (as for `store`) and ``timeout_s``, the longest this call may wait
        for chunks: a float > 0, or None (the default) for no bound beyond the tiers' own.
        With it, the call returns within about ``timeout_s`` plus the time of copying
        the chunks that arrived by then (a copy is never interrupted): a chunk that has
        not arrived from a tier below the hot tier by the deadline is a miss, and the
        load stops there, so the mask is a prefix as always. Chunks in the hot tier are
        in memory and always load; what arrives after the deadline is released.

        :returns: a CPU bool tensor, as long as ``tokens``, True for the tokens loaded.
        :raises ValueError: if the number of ``False`` entries in the mask is not a
            multiple of the chunk size, ``timeout_s`` is not a finite number > 0 (or
            None), or the connector's arguments are wrong.
        """
        self._check_open()
        started_at = time.monotonic()
        connector = self._connector()
        cache_salt = kwargs.pop("cache_salt", None)
        timeout_s = _check_timeout(kwargs.pop("timeout_s", None))
        deadline = None if timeout_s is None else started_at + timeout_s
        started = time.perf_counter()
        chunks = list(self._chunks(tokens, mask, cache_salt))
        connector.check_kwargs(int(tokens.shape[0]), **kwargs)
        ret_mask = torch.zeros(int(tokens.shape[0]), dtype=torch.bool)
        per_tier: dict[str, list] = defaultdict(lambda: [[], 0, 0])
        first = chunks[0][0] if chunks else None
        found_all = self.storage_manager.iter_get([key for _, _, key in chunks],
                                                  deadline=deadline)
        try:
            for (start, end, key), found in zip(chunks, found_all):
                if found is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        self._load_stopped(timeout_s, int(ret_mask.sum()),
                                           sum(e - s for s, e, _ in chunks))
                    break
                obj, tier = found
                try:
                    connector.to_gpu(obj, start, end, **kwargs)
                finally:
                    obj.ref_count_down()
                ret_mask[start:end] = True
                _add(per_tier[tier], key, end - start, obj.get_size())
        finally:
            found_all.close()  # releases chunks read ahead and not used
        duration = time.perf_counter() - started
        for tier, (keys, num_tokens, num_bytes) in per_tier.items():
            hooks().lmcache_chunks_retrieved(
                engine_id=self.engine_id, tier=tier, keys=keys, num_tokens=num_tokens,
                num_bytes=num_bytes, duration_s=duration)
        hooks().lmcache_lookup_finished(
            engine_id=self.engine_id, num_tokens=int(ret_mask.shape[0]) - (first or 0),
            hit_tokens=int(ret_mask.sum()), duration_s=duration, operation="retrieve")
        return ret_mask

    def _load_stopped(self, timeout_s: float | None, loaded: int, asked: int) -> None:
        self._log_load("deadline", "a retrieve stopped at its deadline (timeout_s=%g): "
                       "loaded %d of %d tokens; the chunks not loaded by then are misses",
                       timeout_s, loaded, asked)

    def lookup(self, tokens: torch.Tensor, search_range: list[str] | str | None = None, *,
               cache_salt: str | None = None) -> int:
        """How many prefix tokens of ``tokens`` are cached (a contiguous prefix of chunks).

        :param search_range: tier names to search (``local_cpu``, ``local_disk``, ... —
            the seed's ``Hot``, and a tier's class name or a base's, such as
            ``LocalCPUBackend``, ``LocalDiskBackend`` or ``RemoteBackend``, are accepted
            too); one name may be given bare; all tiers if None. An unknown name is a
            ``ValueError``.
        :param cache_salt: the request's salt, as given to `store`.
        """
        self._check_open()
        started = time.perf_counter()
        hit = 0
        chunks = self._chunks(tokens, None, cache_salt)
        for _, end, key in chunks:
            if not self.storage_manager.contains(key, search_range):
                break
            hit = end
        hooks().lmcache_lookup_finished(
            engine_id=self.engine_id, num_tokens=int(tokens.shape[0]), hit_tokens=hit,
            duration_s=time.perf_counter() - started, operation="lookup")
        return hit

    def prefetch(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
                 cache_salt: str | None = None) -> None:
        """Start loading the cached prefix of ``tokens`` into CPU memory."""
        self._check_open()
        for _, _, key in self._chunks(tokens, mask, cache_salt):
            if not self.storage_manager.prefetch(key):
                break

    def close(self) -> None:
        """Finish pending writes, close the tiers and release the engine's memory."""
        if self._closed:
            return
        hooks().lmcache_engine_closing(engine_id=self.engine_id, engine=self)
        self._closed = True
        try:
            self.storage_manager.close()
        finally:
            close = getattr(self.memory_allocator, "close", None)
            if close is not None:
                close()


def _check_timeout(timeout_s: Any) -> float | None:
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) \
            or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, or None for "
                         f"no bound beyond the tiers' own; got {timeout_s!r}")
    return float(timeout_s)


def _check_salt(cache_salt: Any) -> None:
    if not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a str (or None), got "
                         f"{type(cache_salt).__name__}")
    try:
        cache_salt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("cache_salt must be valid Unicode text (it holds a lone "
                         "surrogate)") from None


def _check_geometry(config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata) -> None:
    if metadata.kv_shape[2] != config.chunk_size:
        raise ValueError(f"metadata.kv_shape[2] is {metadata.kv_shape[2]} but chunk_size is "
                         f"{config.chunk_size}; expected kv_shape = (num_layers, 2, "
                         "chunk_size, num_kv_heads, head_size)")


def _chunk_spec(config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                connector: GPUConnectorInterface | None) -> ChunkSpec:
    """The chunks this engine stores: what its connector fills, or without one the
    KV_BLOB layout ``[2, num_layers, tokens, num_kv_heads * head_size]``."""
    if connector is not None:
        return ChunkSpec.for_connector(connector, config.chunk_size, metadata.kv_dtype)
    layers, _, _, heads, head_size = metadata.kv_shape
    return ChunkSpec(MemoryFormat.KV_BLOB, metadata.kv_dtype, frozenset(
        (2, layers, n, heads * head_size) for n in range(1, config.chunk_size + 1)))


def _add(record: list, key: Any, num_tokens: int, num_bytes: int) -> None:
    # per-tier tally of one operation: [keys, tokens, bytes], reported in one hook call
    record[0].append(key)
    record[1] += num_tokens
    record[2] += num_bytes


class LMCacheEngineBuilder:
    """Process-wide registry of engines by instance id.

    An engine may also be known by aliases (`add_alias`): names shared by the engines an
    integration makes, such as the seed's ``ENGINE_NAME`` of the vLLM integration, so
    that ``destroy(alias)`` closes every engine made under it in this process -- and is
    a no-op in a process that made none.
    """

    _lock = threading.Lock()
    _instances: dict[str, LMCacheEngine] = {}
    _aliases: dict[str, list[str]] = {}

    @classmethod
    def get_or_create(cls, instance_id: str, config: LMCacheEngineConfig,
                      metadata: LMCacheEngineMetadata,
                      gpu_connector: GPUConnectorInterface | None) -> LMCacheEngine:
        """The engine registered as ``instance_id``, built from ``config`` if there is none.

        Components are created by plugin name through the registry: the allocator,
        the token database, the storage tiers and — when ``gpu_connector`` is None and
        the configuration selects one — the GPU connector.

        :raises ValueError: if the instance exists with a different configuration or
            metadata.
        """
        with cls._lock:
            engine = cls._instances.get(instance_id)
            if engine is not None:
                if engine.config != config or engine.metadata != metadata:
                    raise ValueError(
                        f"LMCache engine {instance_id!r} already exists with a different "
                        f"{'configuration' if engine.config != config else 'metadata'}")
                return engine
            hooks().lmcache_configure(config=config, metadata=metadata)
            allocator = registry.create("allocator", config.allocator.name,
                                        config.allocator.options, config, metadata)
            token_database = registry.create(
                "token_database", config.token_database.name, config.token_database.options,
                config, metadata)
            if gpu_connector is None and config.gpu_connector is not None:
                gpu_connector = registry.create(
                    "gpu_connector", config.gpu_connector.name, config.gpu_connector.options,
                    config, metadata)
            engine = LMCacheEngine(config, metadata, allocator, token_database, gpu_connector,
                                   engine_id=instance_id)
            cls._instances[instance_id] = engine
        hooks().lmcache_engine_started(engine_id=instance_id, engine=engine, config=config,
                                       metadata=metadata)
        return engine

    @classmethod
    def add_alias(cls, alias: str, instance_id: str) -> None:
        """Let ``alias`` name the engine ``instance_id`` too (several engines may share
        one alias). `get` answers an alias that is not an instance id with the first
        engine still registered under it; `destroy` closes them all.

        :raises KeyError: if no engine is registered as ``instance_id``.
        """
        with cls._lock:
            if instance_id not in cls._instances:
                raise KeyError(f"no LMCache engine {instance_id!r} to alias as {alias!r}")
            ids = cls._aliases.setdefault(alias, [])
            if instance_id not in ids:
                ids.append(instance_id)

    @classmethod
    def get(cls, instance_id: str) -> LMCacheEngine | None:
        """The engine registered as ``instance_id`` (or, failing that, the first one
        aliased as ``instance_id``), or None if not found."""
        with cls._lock:
            engine = cls._instances.get(instance_id)
            if engine is None:
                for aliased in cls._aliases.get(instance_id, ()):
                    return cls._instances[aliased]
            return engine

    @classmethod
    def destroy(cls, instance_id: str) -> None:
        """Close the engine registered as ``instance_id`` and every engine aliased as
        ``instance_id``, and forget them; nothing to do if there is none."""
        with cls._lock:
            ids = [instance_id, *cls._aliases.pop(instance_id, ())]
            engines = [e for e in (cls._instances.pop(i, None) for i in dict.fromkeys(ids))
                       if e is not None]
            for alias, aliased in list(cls._aliases.items()):
                aliased[:] = [i for i in aliased if i in cls._instances]
                if not aliased:
                    del cls._aliases[alias]
        for engine in engines:
            engine.close()
