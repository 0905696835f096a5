"""The implementation behind vLLM's built-in ``LMCacheConnectorV1``.

vLLM creates one `LMCacheConnectorV1Impl` in the scheduler (role ``SCHEDULER``) and
one in every worker (role ``WORKER``); its wrapper forwards each call of the KV
connector API to it.

Scheduler side
    `get_num_new_matched_tokens` asks worker 0's engine how many prompt tokens are
    cached (see `lookup`), leaves out what vLLM's own prefix cache already holds, and
    never offers the whole prompt (vLLM must compute the last prompt token to sample).
    `build_connector_meta` tells the workers, per request and step, which chunks to
    load before the forward pass and which to store after it; block ids come from the
    scheduler output.

Worker side
    `register_kv_caches` builds the cache engine for the worker from the lmcache
    configuration and picks the connector for the layout of vLLM's KV cache: vLLM's
    CPU backend (``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` per layer,
    moved as whole blocks by ``vllm_cpu_blocks``) or the flash-attention layout
    (``[2, num_blocks, block_size, num_kv_heads, head_size]``, ``vllm_paged_v2``).
    Before the first request, a round trip through the live cache with vLLM's own cache
    writer proves the layout is the one the connector reads (see `layout_check`); an
    unknown layout stops vLLM at start. `start_load_kv` loads every request's chunks
    before the forward pass,
    `wait_for_save` stores the chunks computed in it. A chunk that cannot be loaded
    (missing, corrupt, a tier that failed) is reported through
    `get_block_ids_with_load_errors`, and vLLM recomputes from there; a store that
    fails costs a future miss. Neither ever raises into vLLM.

Configuration
    ``LMCACHE_CONFIG_FILE`` names a YAML file; ``LMCACHE_<FIELD>`` variables override it.
    Variables alone give `LMCacheEngineConfig.from_env` semantics: the seed's defaults
    and what they set (no disk tier unless one is asked for). Without either, the
    embedded default applies: the CPU tier plus a disk tier in ``./.lmcache`` (the
    working directory of vLLM), no server needed.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmcache.integration.vllm import layout_check
from lmcache.integration.vllm.layout_check import CacheLayout
from lmcache.integration.vllm.lookup import LookupClient, LookupServer
from lmcache.integration.vllm.utils import ENGINE_NAME
from lmcache.kernel.cache_engine import LMCacheEngine, LMCacheEngineBuilder
from lmcache.kernel.config import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    ComponentSpec,
    ConfigError,
    LMCacheEngineConfig,
    env_overrides,
)
from lmcache.kernel.metadata import LMCacheEngineMetadata
from lmcache.plugin import hookimpl
from lmcache.plugin.manager import get_plugin_manager
from lmcache.plugin.registry import registry

try:  # the base class of connector metadata; absent when vLLM is not installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorMetadata as _MetadataBase,
    )
except ImportError:  # pragma: no cover - vLLM is what calls this module
    _MetadataBase = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["LMCacheConnectorV1Impl", "LMCacheConnectorMetadata", "load_config",
           "DEFAULT_DISK_DIR"]

logger = logging.getLogger(__name__)


def _configure_logging() -> None:
    """Make lmcache's messages visible next to vLLM's (level from ``LMCACHE_LOG_LEVEL``,
    default INFO), unless the application configured logging itself."""
    ours = logging.getLogger("lmcache")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "(lmcache pid=%(process)d) %(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper())

#: Where the embedded default keeps the disk tier, relative to the working directory.
DEFAULT_DISK_DIR = ".lmcache"
#: Size of the embedded default's tiers, in GB.
DEFAULT_CPU_GB = 5.0
DEFAULT_DISK_GB = 20.0


def load_config(environ: dict[str, str] | None = None) -> LMCacheEngineConfig:
    """The configuration of the vLLM integration.

    ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_<FIELD>`` as in
    `LMCacheEngineConfig.from_env`: a user who sets variables gets the seed's defaults
    and the variables, nothing else. Only when no ``LMCACHE_<FIELD>`` variable is set
    does the embedded default apply (the CPU tier and a disk tier in `DEFAULT_DISK_DIR`).
    """
    env = os.environ if environ is None else environ
    if env.get(CONFIG_FILE_ENV):
        if environ is None:
            return LMCacheEngineConfig.from_env()
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(environ)
            return LMCacheEngineConfig.from_env()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    overrides = env_overrides(dict(env))
    data: dict[str, Any] = {}
    if not overrides:
        data = {"local_cpu": True, "max_local_cpu_size": DEFAULT_CPU_GB,
                "local_disk": os.path.abspath(DEFAULT_DISK_DIR),
                "max_local_disk_size": DEFAULT_DISK_GB}
    data.update(overrides)
    try:
        return LMCacheEngineConfig(**data)
    except ConfigError as exc:
        origins = {name: f"${ENV_PREFIX}{name.upper()}" for name in overrides}
        raise exc.with_source("the environment", origins) from None


# ---------------------------------------------------------------------------------------
# What the scheduler tells the workers
# ---------------------------------------------------------------------------------------


@dataclass
class LoadSpec:
    """Load chunks of ``tokens[:lmcache_tokens]``; vLLM holds ``vllm_cached`` tokens and
    expects ``vllm_cached + num_external`` computed tokens after the load."""

    vllm_cached: int
    lmcache_tokens: int
    num_external: int


@dataclass
class RequestMeta:
    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    cache_salt: str | None
    load: LoadSpec | None = None
    #: store ``token_ids[:save_end]``, skipping the first ``save_skip`` (chunk aligned)
    save_skip: int = 0
    save_end: int = 0
    #: the request's LoRA adapter ``(name, id)``, for the KV events of its chunks
    lora: tuple[str, int] | None = None


@dataclass
class LMCacheConnectorMetadata(_MetadataBase):  # type: ignore[misc]
    requests: list[RequestMeta] = field(default_factory=list)


@dataclass
class _Tracked:
    """The scheduler's record of one running request."""

    request: Any
    block_ids: list[int] = field(default_factory=list)
    # tokens this request already asked the workers to store; chunks found by a lookup
    # are not counted, since a load may still find them corrupt (the engine's store
    # skips chunks it holds without copying them)
    saved: int = 0
    load: LoadSpec | None = None
    load_sent: bool = False

    def __post_init__(self) -> None:
        self.salt = request_salt(self.request)


# ---------------------------------------------------------------------------------------
# What makes the KV of a prompt other than its tokens
# ---------------------------------------------------------------------------------------

_adapter_digests: dict[tuple[str, tuple], str] = {}
_adapter_lock = threading.Lock()


def adapter_digest(path: str) -> str:
    """A sha256 of the files of the LoRA adapter at ``path`` (a directory or a file): the
    same name re-pointed at other weights, or an adapter reloaded with other weights,
    gets another digest. Cached by the files' sizes and modification times."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else \
        ([root] if root.is_file() else [])
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _adapter_lock:
        cached = _adapter_digests.get((path, stamp))
    if cached is not None:
        return cached
    h = hashlib.sha256()
    if not files:  # not readable here: the path is all there is to tell adapters apart
        h.update(b"path\0" + path.encode("utf-8", "surrogatepass"))
    for p in files:
        h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    digest = h.hexdigest()
    with _adapter_lock:
        _adapter_digests[(path, stamp)] = digest
    return digest


def request_salt(request: Any) -> str | None:
    """The salt of a request's chunk keys: its ``cache_salt``, and everything else that
    changes its KV for the same tokens -- the LoRA adapter (name and content), the
    multimodal inputs (their hashes and positions) and prompt embeddings (a hash of
    them) -- so that such requests never share chunks with requests that differ in any
    of them. A request with none of these keeps its ``cache_salt`` as is."""
    salt = getattr(request, "cache_salt", None)
    parts: list[Any] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(["lora", str(lora.lora_name), adapter_digest(str(lora.lora_path or ""))])
    for feature in getattr(request, "mm_features", None) or []:
        position = feature.mm_position
        parts.append(["mm", str(feature.identifier), int(position.offset),
                      int(position.length)])
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is not None:
        data = embeds.detach().cpu().contiguous()
        parts.append(["prompt_embeds", str(data.dtype), list(data.shape),
                      hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()])
    if not parts:
        return salt
    return "lmcache-request/v1" + json.dumps([salt, *parts], separators=(",", ":"))


# ---------------------------------------------------------------------------------------
# KV events
# ---------------------------------------------------------------------------------------


@dataclass
class StoredChunk:
    """A chunk lmcache stored, as vLLM's ``LMCacheConnectorV1`` reads it to publish a
    ``BlockStored`` event: one block of ``chunk_size`` tokens named by the chunk's prefix
    hash, in the tier (``medium``) that made it visible."""

    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str


def external_block_hash(chunk_hash: str) -> bytes | int:
    """A chunk's hash as vLLM publishes block hashes: bytes, or the low 64 bits as an int
    when ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` is set (as vLLM does for its own)."""
    try:
        raw = bytes.fromhex(chunk_hash)
    except ValueError:  # a third-party token database's own hash strings
        raw = chunk_hash.encode("utf-8", "surrogatepass")
    try:
        import vllm.envs as envs
        as_int = bool(envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    except Exception:
        as_int = os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") not in ("", "0")
    return int.from_bytes(raw, "big") & ((1 << 64) - 1) if as_int else raw


class _StoreRecorder:
    """An lmcache hook plugin that records, between `start` and `stop`, the chunks one
    engine's store made visible in a tier on the calling thread (the synchronous tiers;
    writes to lower tiers complete later, on their writer threads, and are not events)."""

    def __init__(self, engine_id: str) -> None:
        self.engine_id = engine_id
        self._thread: int | None = None
        self._stored: dict[Any, str] = {}

    def start(self) -> None:
        self._stored = {}
        self._thread = threading.get_ident()

    def stop(self) -> dict[Any, str]:
        self._thread = None
        stored, self._stored = self._stored, {}
        return stored

    @hookimpl
    def lmcache_chunks_stored(self, engine_id: str, tier: str, keys: Any, num_tokens: int,
                              num_bytes: int, duration_s: float) -> None:
        if engine_id == self.engine_id and threading.get_ident() == self._thread:
            for key in keys:
                self._stored.setdefault(key, tier)


# ---------------------------------------------------------------------------------------
# Which models the connector can serve
# ---------------------------------------------------------------------------------------

#: Layer kinds (as Hugging Face configs name them) whose state is a paged KV cache. vLLM
#: turns its hybrid KV cache manager off for this connector, so sliding-window and
#: chunked layers then keep full KV, which the connector stores and loads like any other.
ATTENTION_LAYER_KINDS = frozenset({"attention", "full_attention", "sliding_attention",
                                   "chunked_attention", "local_attention", "global_attention"})


def model_layer_kinds(model_config: Any) -> dict[str, int]:
    """How many layers of each kind the model has, from its Hugging Face config
    (``layer_types`` or ``layers_block_type``); empty when the config does not say."""
    config = getattr(model_config, "hf_text_config", None) or \
        getattr(model_config, "hf_config", None)
    for attr in ("layer_types", "layers_block_type"):
        kinds = getattr(config, attr, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            counts: dict[str, int] = {}
            for kind in kinds:
                counts[str(kind)] = counts.get(str(kind), 0) + 1
            return counts
    return {}


def check_model_kind(model_config: Any) -> None:
    """Refuse, at start, a model whose layers keep state other than attention KV (Mamba,
    linear attention, convolutions): vLLM cannot run such hybrid models with its hybrid
    KV cache manager off, and lmcache would not store their state anyway."""
    kinds = model_layer_kinds(model_config)
    other = {k: n for k, n in kinds.items() if k not in ATTENTION_LAYER_KINDS}
    if other or (getattr(model_config, "is_hybrid", False) is True and not kinds):
        described = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "not listed"
        raise ValueError(
            f"lmcache's vLLM connector does not support {getattr(model_config, 'model', '')}: "
            f"its layers are {described}; only attention layers "
            f"({', '.join(sorted(ATTENTION_LAYER_KINDS))}) keep a KV cache lmcache can "
            "store, and vLLM cannot run hybrid state-space models with a connector that "
            "turns its hybrid KV cache manager off. Run this model without "
            "kv_transfer_config.")


# ---------------------------------------------------------------------------------------
# The connector
# ---------------------------------------------------------------------------------------


class LMCacheConnectorV1Impl:
    """What vLLM's ``LMCacheConnectorV1`` delegates to (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: Any, parent: Any) -> None:
        _configure_logging()
        check_model_kind(vllm_config.model_config)
        self.vllm_config = vllm_config
        self.parent = parent
        self.is_scheduler = getattr(role, "name", str(role)) == "SCHEDULER"
        self.config = load_config()
        self.chunk_size = self.config.chunk_size
        self.block_size = int(vllm_config.cache_config.block_size)
        self.instance_id = vllm_config.instance_id or "default"
        kv_role = getattr(vllm_config.kv_transfer_config, "kv_role", "kv_both")
        self.can_load = kv_role in ("kv_both", "kv_consumer")
        self.can_save = kv_role in ("kv_both", "kv_producer")
        self.save_decode_cache = bool(self.config.save_decode_cache)
        if self.is_scheduler:
            self._set_load_failure_policy(vllm_config.kv_transfer_config)
        # scheduler
        self._tracked: dict[str, _Tracked] = {}
        self._lookup = LookupClient(self.instance_id) if self.is_scheduler else None
        # worker
        self.engine: LMCacheEngine | None = None
        self._engine_id: str | None = None
        self._kvcaches: list[torch.Tensor] = []
        self._metadata: LMCacheConnectorMetadata | None = None
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()  # requests of this step whose load failed
        self._server: LookupServer | None = None
        self._warned: set[str] = set()
        events = getattr(vllm_config, "kv_events_config", None)
        self._events_enabled = bool(getattr(events, "enable_kv_cache_events", False))
        self._recorder: _StoreRecorder | None = None
        self._kv_events: list[StoredChunk] = []
        self._closed = False
        self._close_lock = threading.Lock()
        # vLLM's wrapper does not forward shutdown(): flush the tiers when the process
        # ends, whether it exits normally (atexit) or is a multiprocessing child, whose
        # exit skips atexit but runs multiprocessing's finalizers.
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)
        multiprocessing.util.Finalize(None, _close_at_exit, args=(ref,), exitpriority=100)
        logger.info("lmcache connector (%s) for %s: chunk %d tokens, tiers %s",
                    "scheduler" if self.is_scheduler else "worker",
                    vllm_config.model_config.model, self.chunk_size,
                    [s.name for s in self.config.storage_backend_specs()])

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _set_load_failure_policy(kv_transfer_config: Any) -> None:
        """A cache miss discovered while loading must cost a recompute, not the request.

        vLLM's default ``kv_load_failure_policy`` is ``fail`` (right for disaggregated
        prefill, where missing KV is an error); for a cache, a chunk that turns out to be
        corrupt or gone is a miss. The scheduler reads the policy right after creating its
        connector, so it is set here, unless ``kv_connector_extra_config`` says
        ``{"load_failure_policy": "fail"}``.
        """
        extra = getattr(kv_transfer_config, "kv_connector_extra_config", None) or {}
        wanted = extra.get("load_failure_policy", "recompute")
        if wanted not in ("recompute", "fail"):
            raise ValueError(f"kv_connector_extra_config.load_failure_policy is {wanted!r}; "
                             "expected 'recompute' or 'fail'")
        if getattr(kv_transfer_config, "kv_load_failure_policy", wanted) != wanted:
            logger.info("lmcache: kv_load_failure_policy=%s (a chunk that cannot be loaded "
                        "is recomputed; set kv_connector_extra_config.load_failure_policy "
                        "to change it)", wanted)
            kv_transfer_config.kv_load_failure_policy = wanted

    def _warn_once(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("lmcache: %s failed (%s: %s); vLLM goes on without the cache "
                           "for it (logged once)", what, type(exc).__name__, exc,
                           exc_info=exc)

    def _slot_mapping(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.block_size
        blocks = torch.tensor(block_ids[:-(-num_tokens // bs)], dtype=torch.int64)
        if blocks.numel() * bs < num_tokens:
            raise ValueError(f"{blocks.numel()} blocks cannot hold {num_tokens} tokens")
        slots = (blocks.unsqueeze(1) * bs + torch.arange(bs)).view(-1)[:num_tokens]
        # the paged connectors want the slots where the KV cache is (the GPU, with vLLM's
        # GPU backend); the page connector reads the first slot of each block on the host
        device = self._kvcaches[0].device if self._kvcaches else slots.device
        return slots.to(device) if device.type != "cpu" else slots

    # ======================================================================================
    # Worker side
    # ======================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build this worker's cache engine for vLLM's KV cache tensors."""
        if self.engine is not None:
            return
        layers = list(kv_caches.values())
        if not layers:
            raise ValueError("vLLM registered no KV cache layers")
        first = layers[0]
        mla = bool(getattr(self.vllm_config.model_config, "use_mla", False))
        if mla and first.dim() == 4 and first.shape[1] == 1:
            # vLLM's CPU backend keeps the latent cache as [num_blocks, 1, block_size,
            # latent]: the same bytes as the MLA layout, seen without the unit dimension
            # (a view: what the connector writes lands in vLLM's cache)
            layers = [layer.squeeze(1) for layer in layers]
            first = layers[0]
        if first.dim() == 4:
            _, heads, bs, two_hs = first.shape
            if bs != self.block_size or two_hs % 2:
                raise ValueError(f"KV cache layer of shape {tuple(first.shape)}; expected "
                                 f"[num_blocks, num_kv_heads, {self.block_size}, "
                                 "2*head_size] (vLLM's CPU layout)")
            head_size, default_connector = two_hs // 2, "vllm_cpu_blocks"
            options: dict[str, Any] = {"block_size": self.block_size}
            layout = CacheLayout("cpu", 0, self.block_size, int(heads), int(head_size))
        elif first.dim() == 5 and first.shape[0] == 2:
            _, _, bs, heads, head_size = first.shape
            default_connector = "vllm_paged_v2"
            options = {"use_gpu": first.device.type == "cuda"}
            layout = CacheLayout("flash", 1, int(bs), int(heads), int(head_size))
        elif first.dim() == 3 and mla:
            _, bs, latent = first.shape
            if bs != self.block_size:
                raise ValueError(f"KV cache layer of shape {tuple(first.shape)}; expected "
                                 f"[num_blocks, {self.block_size}, kv_lora_rank + "
                                 "qk_rope_head_dim] (vLLM's MLA layout)")
            heads, head_size, default_connector = 1, int(latent), "vllm_mla_blocks"
            options = {"block_size": self.block_size}
            hf = getattr(self.vllm_config.model_config, "hf_text_config", None)
            layout = CacheLayout("mla", 0, self.block_size, 1, int(latent),
                                 int(getattr(hf, "kv_lora_rank", 0) or 0))
        else:
            raise ValueError(f"KV cache layer of shape {tuple(first.shape)}; expected vLLM's "
                             "CPU layout [num_blocks, num_kv_heads, block_size, 2*head_size] "
                             "or the flash-attention layout [2, num_blocks, block_size, "
                             "num_kv_heads, head_size]")
        rank, world_size = parallel_rank()
        if world_size > 1:
            self.config = per_worker_budget(self.config, world_size)
        # MLA: every tensor-parallel rank holds the same latent KV, so all of them name
        # a chunk alike (by pipeline stage only) and a shared tier keeps one copy of it
        key_rank, key_world = parallel_rank(across_tensor_parallel=not mla)
        metadata = LMCacheEngineMetadata(
            model_name=str(self.vllm_config.model_config.model), world_size=key_world,
            worker_id=key_rank, fmt="vllm", kv_dtype=first.dtype,
            kv_shape=(len(layers), 1 if mla else 2, self.chunk_size, int(heads),
                      int(head_size)))
        if self.config.gpu_connector is not None:
            connector = registry.create("gpu_connector", self.config.gpu_connector.name,
                                        self.config.gpu_connector.options, self.config,
                                        metadata)
        else:
            connector = registry.create("gpu_connector", default_connector, options,
                                        self.config, metadata)
        extra = getattr(self.vllm_config.kv_transfer_config, "kv_connector_extra_config",
                        None) or {}
        if extra.get("layout_check", True):
            model_dtype = getattr(self.vllm_config.model_config, "dtype", first.dtype)
            layout_check.run(connector, layers, layout,
                             model_dtype=model_dtype if isinstance(model_dtype, torch.dtype)
                             else first.dtype,
                             cache_dtype=str(getattr(self.vllm_config.cache_config,
                                                     "cache_dtype", "auto")))
        self._engine_id = f"vllm-{self.instance_id}-rank{rank}"
        self.engine = LMCacheEngineBuilder.get_or_create(self._engine_id, self.config,
                                                         metadata, connector)
        # the published examples end with LMCacheEngineBuilder.destroy(ENGINE_NAME)
        LMCacheEngineBuilder.add_alias(ENGINE_NAME, self._engine_id)
        if self._events_enabled:
            self._recorder = _StoreRecorder(self.engine.engine_id)
            get_plugin_manager().register(self._recorder)
        self._kvcaches = layers
        if rank == 0:
            self._server = LookupServer(self.instance_id, self.engine)
        logger.info("lmcache engine %s: %d layers, %s %s, connector %s, worker %d of %d "
                    "(CPU tier %.3g GB, disk tier %.3g GB)", self._engine_id, len(layers),
                    tuple(first.shape), first.dtype, type(connector).__name__, rank,
                    world_size, self.config.max_local_cpu_size,
                    self.config.max_local_disk_size if self.config.local_disk else 0.0)

    def bind_connector_metadata(self, metadata: LMCacheConnectorMetadata) -> None:
        self._metadata = metadata

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Load the cached chunks of this step's new requests into vLLM's KV cache."""
        meta = self._metadata if self._metadata is not None else \
            self.parent._get_connector_metadata()
        if self.engine is None or not isinstance(meta, LMCacheConnectorMetadata):
            return
        self._failed_loads.clear()
        bound = self.config.load_timeout_s
        deadline = None if bound is None else time.monotonic() + bound
        for req in meta.requests:
            if req.load is not None:
                self._load(req, deadline)

    def _load(self, req: RequestMeta, deadline: float | None = None) -> None:
        spec = req.load
        assert spec is not None and self.engine is not None
        expected_end = spec.vllm_cached + spec.num_external
        start = spec.vllm_cached // self.chunk_size * self.chunk_size
        loaded_end = start
        started = time.perf_counter()
        try:
            n = spec.lmcache_tokens
            tokens = torch.tensor(req.token_ids[:n], dtype=torch.int64)
            mask = torch.ones(n, dtype=torch.bool)
            mask[:start] = False
            slots = self._slot_mapping(req.block_ids, n)
            slots[:spec.vllm_cached] = -1  # vLLM's own prefix cache: never overwrite it
            # one bound for the whole step: what is not loaded by then is recomputed
            # (chunks already in CPU memory still load: they cost a copy, not a wait)
            timeout = None if deadline is None else max(1e-6, deadline - time.monotonic())
            got = self.engine.retrieve(tokens, mask, kvcaches=self._kvcaches,
                                       slot_mapping=slots, cache_salt=req.cache_salt,
                                       timeout_s=timeout)
            loaded_end = start + int(got[start:].long().cumprod(0).sum())
        except Exception as exc:
            self._warn_once("loading KV", exc)
        logger.debug("lmcache: request %s loaded tokens [%d, %d) (vLLM held %d) in %.1f ms",
                     req.req_id, max(start, spec.vllm_cached), loaded_end, spec.vllm_cached,
                     (time.perf_counter() - started) * 1e3)
        if loaded_end < expected_end:
            # vLLM computes this step as if the load had worked; storing the request now
            # would store blocks that hold no valid KV. It is stored once recomputed.
            self._failed_loads.add(req.req_id)
            bs = self.block_size
            first = max(loaded_end, spec.vllm_cached) // bs
            last = (expected_end - 1) // bs
            self._load_errors.update(req.block_ids[first:last + 1])
            logger.info("lmcache: request %s loaded %d of %d tokens; vLLM recomputes the "
                        "rest", req.req_id, max(0, loaded_end - spec.vllm_cached),
                        spec.num_external)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in `start_load_kv`, before the forward pass."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Stores happen for all layers at once in `wait_for_save`."""

    def wait_for_save(self) -> None:
        """Store the chunks this step computed (after the forward pass)."""
        meta = self._metadata
        if self.engine is None or not isinstance(meta, LMCacheConnectorMetadata):
            return
        for req in meta.requests:
            if req.save_end <= req.save_skip or req.req_id in self._failed_loads:
                continue
            started = time.perf_counter()
            try:
                n = req.save_end
                tokens = torch.tensor(req.token_ids[:n], dtype=torch.int64)
                mask = torch.ones(n, dtype=torch.bool)
                mask[:req.save_skip] = False
                recorder = self._recorder
                if recorder is not None:
                    recorder.start()
                try:
                    self.engine.store(tokens, mask, kvcaches=self._kvcaches,
                                      slot_mapping=self._slot_mapping(req.block_ids, n),
                                      cache_salt=req.cache_salt)
                finally:
                    stored = recorder.stop() if recorder is not None else {}
                if stored:
                    self._kv_events.extend(self._stored_events(req, tokens, stored))
                logger.debug("lmcache: request %s stored tokens [%d, %d) in %.1f ms",
                             req.req_id, req.save_skip, n,
                             (time.perf_counter() - started) * 1e3)
            except Exception as exc:
                self._warn_once("storing KV", exc)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        """Stores and loads finish within their step: nothing is ever in flight here."""
        if finished_req_ids and self.engine is not None and logger.isEnabledFor(logging.DEBUG):
            manager = self.engine.storage_manager
            hot = manager.hot_tier
            try:
                allocated = manager.memory_allocator.allocated_bytes
            except NotImplementedError:
                allocated = -1
            logger.debug("lmcache: %d request(s) finished; hot tier: %d chunks, %d bytes; "
                         "%d bytes allocated", len(finished_req_ids),
                         len(hot) if hot is not None and hasattr(hot, "__len__") else -1,
                         getattr(hot, "used_bytes", -1), allocated)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_events(self) -> list[StoredChunk]:
        """The chunks stored since the last call, for vLLM's KV events (``BlockStored``,
        when ``kv_events_config.enable_kv_cache_events`` is on)."""
        events, self._kv_events = self._kv_events, []
        return events

    def _stored_events(self, req: RequestMeta, tokens: torch.Tensor,
                       stored: dict[Any, str]) -> list[StoredChunk]:
        """One event per whole chunk of ``req`` that its store wrote, in prefix order,
        each naming the chunk before it as its parent."""
        assert self.engine is not None
        db = self.engine.token_database
        chunks = db.process_tokens(tokens, None, cache_salt=req.cache_salt) \
            if req.cache_salt is not None else db.process_tokens(tokens, None)
        events, parent = [], None
        for start, end, key in chunks:
            block_hash = external_block_hash(key.chunk_hash)
            tier = stored.get(key)
            if tier is not None and end - start == self.chunk_size:
                events.append(StoredChunk(
                    block_hashes=[block_hash], parent_block_hash=parent,
                    token_ids=req.token_ids[start:end], block_size=self.chunk_size,
                    lora_id=req.lora[1] if req.lora else None,
                    lora_name=req.lora[0] if req.lora else None, medium=tier))
            parent = block_hash
        return events

    def shutdown(self) -> None:
        """Finish pending writes (the disk tier) and close the engine."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._lookup is not None:
            self._lookup.close()
        if self._server is not None:
            self._server.close()
        if self._recorder is not None:
            get_plugin_manager().unregister(self._recorder)
            self._recorder = None
        if self._engine_id is not None:
            LMCacheEngineBuilder.destroy(self._engine_id)
            self.engine = None

    # ======================================================================================
    # Scheduler side
    # ======================================================================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Prompt tokens beyond ``num_computed_tokens`` that lmcache can load."""
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._tracked[request.request_id] = _Tracked(request)
        tracked.load, tracked.load_sent = None, False
        prompt = request.prompt_token_ids
        if not self.can_load or not prompt:
            return 0
        started = time.perf_counter()
        try:
            hit = self._lookup.lookup(prompt, tracked.salt) \
                if self._lookup is not None else 0
        except Exception as exc:
            self._warn_once("looking up a prompt", exc)
            return 0
        logger.debug("lmcache: request %s: %d of %d prompt tokens cached (lookup %.1f ms)",
                     request.request_id, hit, len(prompt),
                     (time.perf_counter() - started) * 1e3)
        usable = min(hit, len(prompt) - 1)  # vLLM computes the last prompt token itself
        if usable <= num_computed_tokens:
            return 0
        tracked.load = LoadSpec(num_computed_tokens, hit, usable - num_computed_tokens)
        return usable - num_computed_tokens

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return
        if num_external_tokens <= 0 or tracked.load is None:
            tracked.load = None
        else:
            tracked.load.num_external = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput
                             ) -> LMCacheConnectorMetadata:
        meta = LMCacheConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        if preempted:
            logger.debug("lmcache: vLLM preempted %s", sorted(preempted))
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._emit(meta, new.req_id, tracked, new.num_computed_tokens,
                       scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_blocks[0]) if new_blocks is not None else []
                logger.debug("lmcache: request %s resumed after preemption at token %d",
                             req_id, cached.num_computed_tokens[i])
            elif new_blocks is not None:
                tracked.block_ids.extend(new_blocks[0])
            self._emit(meta, req_id, tracked, cached.num_computed_tokens[i],
                       scheduled.get(req_id, 0))
        return meta

    def _emit(self, meta: LMCacheConnectorMetadata, req_id: str, tracked: _Tracked,
              num_computed: int, num_scheduled: int) -> None:
        request = tracked.request
        # lengths only: the token lists are copied below, and only for a request that has
        # something to load or store this step (most decode steps have neither)
        prompt = request.prompt_token_ids or []
        tokens = request.all_token_ids if self.save_decode_cache else prompt
        load = None
        if tracked.load is not None and not tracked.load_sent:
            load, tracked.load_sent = tracked.load, True
        if num_computed < tracked.saved:
            # vLLM went back (a failed load, a preemption): what it recomputes is stored
            # again; the store skips the chunks that did make it
            tracked.saved = num_computed // self.chunk_size * self.chunk_size
        computed_after = min(num_computed + num_scheduled, len(tokens))
        if computed_after == len(prompt):
            save_end = computed_after  # the prefill is done: its partial last chunk too
        else:  # a chunked prefill in progress, or decoding: whole chunks only
            save_end = computed_after // self.chunk_size * self.chunk_size
        skip = tracked.saved // self.chunk_size * self.chunk_size
        if not self.can_save or save_end <= tracked.saved:
            save_end = skip = 0
        else:
            tracked.saved = save_end
        if load is None and save_end == 0:
            return
        needed = max(save_end, load.lmcache_tokens if load else 0)
        lora = getattr(request, "lora_request", None)
        meta.requests.append(RequestMeta(
            req_id=req_id, token_ids=list(itertools.islice(tokens, needed)),
            block_ids=list(tracked.block_ids), cache_salt=tracked.salt,
            load=load, save_skip=skip, save_end=save_end,
            lora=(str(lora.lora_name), int(lora.lora_int_id)) if lora is not None else None))

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        logger.debug("lmcache: request %s finished (%s); %d request(s) tracked",
                     request.request_id, getattr(request.status, "name", request.status),
                     len(self._tracked))
        return False, None


def parallel_rank(across_tensor_parallel: bool = True) -> tuple[int, int]:
    """This worker's place among the workers of one vLLM instance: ``(rank, world_size)``
    over tensor and pipeline parallelism (``rank = pp_rank * tp_size + tp_rank``). Every
    worker holds another part of the KV (its heads, its layers), so each names its chunks
    with its own rank; a bare worker without vLLM's parallel state is rank 0 of 1.
    ``across_tensor_parallel=False`` counts pipeline stages only (``(pp_rank,
    pp_size)``): the ranks of one stage of an MLA model hold the same KV."""
    try:
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        tp_rank = get_tensor_model_parallel_rank()
        tp_size = get_tensor_model_parallel_world_size()
    except Exception:  # no parallel state (a bare worker in tests): one worker
        return 0, 1
    try:
        pp = get_pp_group()
        pp_rank, pp_size = int(pp.rank_in_group), int(pp.world_size)
    except Exception:
        pp_rank, pp_size = 0, 1
    if not across_tensor_parallel:
        return pp_rank, pp_size
    return pp_rank * tp_size + tp_rank, tp_size * pp_size


def per_worker_budget(config: LMCacheEngineConfig, world_size: int) -> LMCacheEngineConfig:
    """The configuration of one of ``world_size`` workers: ``max_local_cpu_size`` and
    ``max_local_disk_size`` are budgets of the vLLM instance, so each worker (its own
    process, with its own tiers, holding 1/world_size of every chunk's KV) gets its
    share of them; so does every tier's ``max_size_gb`` in ``storage_backends``."""
    update: dict[str, Any] = {
        "max_local_cpu_size": config.max_local_cpu_size / world_size,
        "max_local_disk_size": config.max_local_disk_size / world_size}
    if config.storage_backends is not None:
        specs = []
        for spec in config.storage_backends:
            options = spec.options
            size = options.get("max_size_gb")
            if isinstance(size, (int, float)) and not isinstance(size, bool):
                options["max_size_gb"] = size / world_size
            specs.append(ComponentSpec(name=spec.name, **options))
        update["storage_backends"] = specs
    return config.model_copy(update=update)


def _close_at_exit(ref: weakref.ref[LMCacheConnectorV1Impl]) -> None:
    impl = ref()
    if impl is not None:
        try:
            impl.shutdown()
        except Exception:  # at exit: never turn a clean exit into a traceback
            logger.exception("lmcache: closing the cache engine at exit failed")
