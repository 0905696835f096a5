"""``vllm_paged`` and ``vllm_paged_v2``: vLLM's paged KV addressed by a slot mapping."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from lmcache.abc.gpu_connector import ConnectorContext, GPUConnectorInterface
from lmcache.abc.memory import MemoryFormat
from lmcache.builtin.connectors._checks import (
    check_dims,
    check_known,
    check_layer,
    check_memory_tensor,
    dims_from_metadata,
    kv_layers,
    memory_tensor,
    require,
    split_kv,
    version_of,
)
from lmcache.builtin.connectors._cpu_moves import (
    block_size_of,
    cpu_kernel_move,
    gather_blocks_cpu,
    scatter_blocks_cpu,
    scatter_rows_cpu,
)
from lmcache.ops import start_building
from lmcache.plugin.options import PluginOptions

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["VLLMPagedMemGPUConnector", "VLLMPagedMemGPUConnectorV2"]


class _PagedKVConnector(GPUConnectorInterface):
    """Shared implementation of the paged connectors (see `VLLMPagedMemGPUConnectorV2`).

    Per layer, K and V are viewed as ``[num_blocks * block_size, hidden_dim]`` (no copy)
    and moved with ``index_select`` (into the memory object) or ``index_copy_`` (into the
    cache) over the chunk's slots: one call for K and V together in the stacked layout
    (two on CPU, where that is faster), one each for a (K, V) pair. The cost is a few
    calls per layer, never per token. When the memory object lives on another device
    than the cache, the whole chunk goes through a staging tensor on the cache's device
    and crosses devices in one copy.
    """

    def __init__(self, hidden_dim_size: int, num_layers: int, use_gpu: bool = False) -> None:
        check_dims(hidden_dim_size, num_layers)
        self.hidden_dim_size = hidden_dim_size
        self.num_layers = num_layers
        self.use_gpu = bool(use_gpu)
        self._staging: torch.Tensor | None = None
        self._last_layers: tuple[list[Any], list[Any]] | None = None
        self._last_slots: tuple[torch.Tensor, int, int] | None = None
        start_building()  # the CPU kernels compile in the background; torch serves meanwhile
        self._staging_lock = threading.Lock()

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden_dim_size])

    # -- validation ----------------------------------------------------------------------

    def _flat_layers(self, kvcaches: Any) -> list[Any]:
        """Per layer, a ``[2, num_slots, hidden]`` view (stacked layout) or a pair of
        ``[num_slots, hidden]`` views (pair layout), all in the layout of layer 0.

        A store or retrieve moves many chunks of the same layers: they are checked once,
        and again when a layer is another object (the layers are held meanwhile, so that
        no other tensor can take their identity)."""
        layers = kv_layers(kvcaches, self.num_layers)
        last = self._last_layers
        if last is not None and len(last[0]) == len(layers) and all(
                a is b for a, b in zip(layers, last[0])):
            return last[1]
        flat = self._check_layers(layers)
        self._last_layers = (list(layers), flat)
        return flat

    def _check_layers(self, layers: Any) -> list[Any]:
        k0, v0 = split_kv(layers[0], 0, stacked_ndims=(5,))
        if k0.dim() != 4 or k0.shape[2] * k0.shape[3] != self.hidden_dim_size:
            raise ValueError(
                f"kvcaches[0]: K has shape {tuple(k0.shape)}; expected [num_blocks, "
                "block_size, num_kv_heads, head_size] with num_kv_heads * head_size "
                f"= {self.hidden_dim_size} (hidden_dim_size)")
        check_layer(k0, v0, 0, k0)
        stacked = isinstance(layers[0], torch.Tensor)
        shape = layers[0].shape if stacked else k0.shape
        dtype, device, hidden = k0.dtype, k0.device, self.hidden_dim_size
        num_slots = k0.shape[0] * k0.shape[1]
        flat: list[Any] = []
        # The hot path: one combined comparison per layer; diagnose only on failure.
        for i, layer in enumerate(layers):
            ok = False
            if stacked:
                ok = (isinstance(layer, torch.Tensor) and layer.shape == shape
                      and layer.dtype == dtype and layer.device == device)
            elif isinstance(layer, (tuple, list)) and len(layer) == 2:
                k, v = layer
                ok = (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
                      and k.shape == shape and v.shape == shape and k.dtype == dtype
                      and v.dtype == dtype and k.device == device and v.device == device)
            if not ok:
                k, v = split_kv(layer, i, stacked_ndims=(5,))
                check_layer(k, v, i, k0)
                raise ValueError(f"kvcaches[{i}] is laid out unlike kvcaches[0]; expected "
                                 "every layer a (K, V) pair, or every layer one stacked "
                                 "tensor")
            try:
                # view, never reshape: writes into a copy would be lost
                flat.append(layer.view(2, num_slots, hidden) if stacked else
                            (k.view(num_slots, hidden), v.view(num_slots, hidden)))
            except RuntimeError:
                k, v = (layer[0], layer[1]) if stacked else (k, v)
                raise ValueError(
                    f"kvcaches[{i}]: K/V with strides {k.stride()}/{v.stride()} cannot be "
                    f"viewed as [num_blocks * block_size, {hidden}]; expected each block "
                    "contiguous in (block_size, num_kv_heads, head_size)") from None
        return flat

    def _chunk_slots(self, slot_mapping: Any, start: int, end: int, num_slots: int,
                     device: torch.device, *, allow_skipped: bool) -> tuple[torch.Tensor, bool]:
        """The int64 slots of tokens ``[start, end)`` and whether any of them is -1."""
        if not isinstance(slot_mapping, torch.Tensor):
            raise ValueError(f"slot_mapping must be a 1-D integer torch.Tensor, got "
                             f"{type(slot_mapping).__name__}")
        if slot_mapping.dim() != 1:
            raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}; expected a "
                             "1-D tensor with one slot per token of the whole sequence")
        dtype = slot_mapping.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"slot_mapping has dtype {dtype}; expected an integer dtype")
        if slot_mapping.device != device:
            raise ValueError(f"slot_mapping is on device {slot_mapping.device}; expected "
                             f"{device}, the device of the KV cache")
        if start < 0 or start > end:
            raise ValueError(f"start/end out of range: got start={start}, end={end}; "
                             "expected 0 <= start <= end")
        if end > slot_mapping.shape[0]:
            raise ValueError(f"slot_mapping is too short: it has {slot_mapping.shape[0]} "
                             f"slots but end={end}; expected a full slot mapping, one slot per "
                             "token of the whole sequence")
        slots = slot_mapping[start:end]
        if slots.numel() == 0:
            return slots.long(), False
        # One device sync for all range checks (an out-of-range index would be a device
        # assert on CUDA, or silently wrong memory, so it is worth it), per slot mapping:
        # while it is the same object, unwritten, and all its slots are valid, its
        # chunks need no sync of their own.
        last = self._last_slots
        version = version_of(slot_mapping)  # None: not tracked, so never reused
        if last is not None and last[0] is slot_mapping and version is not None \
                and last[1] == version and last[2] == num_slots:
            return slots.long(), False
        if start == 0 and end == slot_mapping.shape[0]:
            whole = slots
        else:
            whole = slot_mapping
        lo, hi = torch.stack(torch.aminmax(whole)).tolist()
        if lo >= 0 and hi < num_slots:
            if version is not None:
                self._last_slots = (slot_mapping, version, num_slots)
            return slots.long(), False
        if whole is not slots:
            lo, hi = torch.stack(torch.aminmax(slots)).tolist()
        if lo < -1 or hi >= num_slots:
            bad = lo if lo < -1 else hi
            raise ValueError(f"slot_mapping[{start}:{end}] holds slot {bad}; expected slots in "
                             f"[0, {num_slots}) (num_blocks * block_size) or -1")
        if lo == -1 and not allow_skipped:
            raise ValueError(
                f"slot_mapping[{start}:{end}] contains -1 (a prefix-cached token); expected "
                "start/end never to overlap the prefix cached by the serving engine")
        return slots.long(), lo == -1

    KWARGS = frozenset({"kvcaches", "slot_mapping", "offset"})

    @staticmethod
    def _offset(kwargs: dict[str, Any]) -> int:
        """The seed's ``offset``: the token the slot mapping's first entry belongs to."""
        offset = kwargs.get("offset", 0)
        if offset is None:
            return 0
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int (the token that "
                             f"slot_mapping[0] belongs to), got {offset!r}")
        return offset

    def check_kwargs(self, num_tokens: int, **kwargs: Any) -> None:
        check_known(kwargs, self.KWARGS, self)
        flat = self._flat_layers(require(kwargs, "kvcaches", "the paged KV cache"))
        first = flat[0][0]
        slot_mapping = require(kwargs, "slot_mapping", "a 1-D integer tensor with one slot "
                                "(block_id * block_size + offset) per token of the sequence")
        offset = self._offset(kwargs)
        if offset > num_tokens:
            raise ValueError(f"offset={offset} is beyond the {num_tokens} tokens; expected "
                             "0 <= offset <= len(tokens)")
        self._chunk_slots(slot_mapping, 0, num_tokens - offset, first.shape[0], first.device,
                          allow_skipped=True)
        if offset and slot_mapping.shape[0] != num_tokens - offset:
            # A window of the slot mapping holds exactly one slot per token from offset
            # on, so that a full slot mapping passed with an offset is refused, never
            # misread.
            raise ValueError(
                f"slot_mapping has {slot_mapping.shape[0]} slots; with offset={offset} "
                f"expected {num_tokens - offset}, one per token from token {offset} to the "
                f"end of the {num_tokens} tokens")

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[list[Any], torch.Tensor, torch.Tensor, bool]:
        kvcaches = require(kwargs, "kvcaches", f"a sequence of {self.num_layers} layers, "
                            "each a (K, V) pair of [num_blocks, block_size, num_kv_heads, "
                            "head_size] tensors or one [2, num_blocks, ...] tensor")
        slot_mapping = require(kwargs, "slot_mapping", "a 1-D integer tensor with one slot "
                                "(block_id * block_size + offset) per token of the sequence")
        offset = self._offset(kwargs)
        if offset and start < offset:
            raise ValueError(f"tokens [{start}, {end}) begin before offset={offset}, the "
                             "first token that slot_mapping has a slot for")
        tensor = memory_tensor(memory_obj)
        flat = self._flat_layers(kvcaches)
        first = flat[0][0]  # K of layer 0, [num_slots, hidden] in either layout
        slots, skipped = self._chunk_slots(slot_mapping, start - offset, end - offset,
                                           first.shape[0], first.device,
                                           allow_skipped=not filling)
        check_memory_tensor(memory_obj, tensor, self.get_shape(end - start), first.dtype,
                             filling=filling)
        return flat, tensor, slots, skipped

    # -- staging across devices --------------------------------------------------------

    def _staging_buffer(self, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        if not self.use_gpu:
            return torch.empty(like.shape, dtype=like.dtype, device=device)
        buf = self._staging
        n = like.numel()
        if buf is None or buf.dtype != like.dtype or buf.device != device or buf.numel() < n:
            buf = torch.empty(max(n, buf.numel() if buf is not None else 0),
                              dtype=like.dtype, device=device)
            self._staging = buf
        return buf[:n].view(like.shape)

    def _preallocate(self, chunk_size: int, dtype: torch.dtype, device: Any) -> None:
        self._staging = torch.empty(self.get_shape(chunk_size).numel(), dtype=dtype,
                                    device=device)

    # -- transfers -----------------------------------------------------------------------

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Gather tokens ``[start, end)`` from the paged cache into ``memory_obj`` and mark
        it KV_BLOB. See the class docstring for the keyword arguments.

        :raises ValueError: ``kvcaches`` or ``slot_mapping`` missing or malformed; a
            ``-1`` slot within ``[start, end)``; a memory object of the wrong shape, dtype
            or format.
        :raises AssertionError: the memory object has no tensor.
        """
        flat, dst, slots, _ = self._prepare(memory_obj, start, end, kwargs, filling=True)
        memory_obj.metadata.payload_checksum = None  # unless the gather computes it
        device = flat[0][0].device
        if dst.device == device:
            if device.type == "cpu" and cpu_kernel_move(
                    flat, slots, dst, block_size_of(kwargs["kvcaches"]), to_cache=False,
                    memory_obj=memory_obj):
                memory_obj.metadata.fmt = MemoryFormat.KV_BLOB
                return
            if device.type == "cpu" and gather_blocks_cpu(
                    flat, slots, dst, block_size_of(kwargs["kvcaches"])):
                memory_obj.metadata.fmt = MemoryFormat.KV_BLOB
                return
            self._gather(flat, slots, dst)
        else:
            with self._staging_lock:
                buf = self._staging_buffer(dst, device)
                self._gather(flat, slots, buf)
                dst.copy_(buf)
        memory_obj.metadata.fmt = MemoryFormat.KV_BLOB

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Scatter ``memory_obj`` into the slots of tokens ``[start, end)``; tokens whose
        slot is ``-1`` are skipped and no other slot of the cache is written.

        :raises ValueError: as `from_gpu` (except for ``-1``, which is skipped), and when
            the memory object is not KV_BLOB.
        :raises AssertionError: the memory object has no tensor.
        """
        flat, src, slots, skipped = self._prepare(memory_obj, start, end, kwargs,
                                                  filling=False)
        device = flat[0][0].device
        if src.device == device:
            if device.type == "cpu" and cpu_kernel_move(
                    flat, slots, src, block_size_of(kwargs["kvcaches"]), to_cache=True):
                return
            if device.type == "cpu" and not skipped and scatter_blocks_cpu(
                    flat, slots, src, block_size_of(kwargs["kvcaches"])):
                return
            self._scatter(flat, slots, src, skipped)
        else:
            with self._staging_lock:
                buf = self._staging_buffer(src, device)
                buf.copy_(src)
                self._scatter(flat, slots, buf, skipped)

    @staticmethod
    def _gather(flat: list[Any], slots: torch.Tensor, dst: torch.Tensor) -> None:
        if isinstance(flat[0], torch.Tensor) and dst.device.type != "cpu":
            # one launch for K and V together (into a strided out); on CPU two
            # contiguous copies are faster
            for layer, out in zip(flat, dst.unbind(1)):
                torch.index_select(layer, 1, slots, out=out)
            return
        for layer, out_k, out_v in zip(flat, dst[0].unbind(0), dst[1].unbind(0)):
            k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
            torch.index_select(k, 0, slots, out=out_k)
            torch.index_select(v, 0, slots, out=out_v)

    @staticmethod
    def _scatter(flat: list[Any], slots: torch.Tensor, src: torch.Tensor,
                 skipped: bool) -> None:
        if skipped:
            # rare: tokens the serving engine holds already (slot -1) are left alone
            keep = torch.nonzero(slots >= 0).squeeze(1)
            slots = slots.index_select(0, keep)
            src = src.index_select(2, keep)
        if src.device.type == "cpu":
            pairs = []
            for layer, src_k, src_v in zip(flat, src[0].unbind(0), src[1].unbind(0)):
                k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
                pairs += [(k, src_k), (v, src_v)]
            scatter_rows_cpu(pairs, slots)
            return
        if isinstance(flat[0], torch.Tensor):
            for layer, src_kv in zip(flat, src.unbind(1)):
                layer.index_copy_(1, slots, src_kv)
            return
        for (k, v), src_k, src_v in zip(flat, src[0].unbind(0), src[1].unbind(0)):
            k.index_copy_(0, slots, src_k)
            v.index_copy_(0, slots, src_v)


class VLLMPagedMemGPUConnector(_PagedKVConnector):
    """vLLM's paged KV, addressed by a full slot mapping.

    Keyword arguments and behaviour are those of `VLLMPagedMemGPUConnectorV2`
    (both cache layouts are accepted); this class never keeps a staging buffer.
    """

    class Options(PluginOptions):
        pass

    def __init__(self, hidden_dim_size: int, num_layers: int) -> None:
        super().__init__(hidden_dim_size, num_layers, use_gpu=False)

    @classmethod
    def from_options(cls, options: VLLMPagedMemGPUConnector.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> VLLMPagedMemGPUConnector:
        return cls(*dims_from_metadata(metadata))


class VLLMPagedMemGPUConnectorV2(_PagedKVConnector):
    """vLLM's paged KV, addressed by a full slot mapping (the connector vLLM uses).

    Keyword arguments of `from_gpu` and `to_gpu`:

    ``kvcaches``
        ``num_layers`` layers, each either a ``(K, V)`` pair of tensors
        ``[num_blocks, block_size, num_kv_heads, head_size]`` or one tensor
        ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (vLLM's flash-attention
        layout). ``num_kv_heads * head_size`` must equal ``hidden_dim_size``; all layers
        share one shape, dtype and device; each block must be contiguous in
        ``(block_size, num_kv_heads, head_size)``.
    ``slot_mapping``
        A 1-D integer tensor on the cache's device with one slot per token of the *whole*
        sequence (``slot = block_id * block_size + offset``), so token ``t``'s KV is
        at flat row ``slot_mapping[t]``. Slots of one sequence are distinct. Tokens whose
        KV the serving engine already holds (prefix caching) have slot ``-1``; those
        entries are never touched: `to_gpu` skips them, and `from_gpu` refuses a
        range that contains one (the engine never stores the prefix it did not compute).
    ``offset`` (optional, default 0)
        The seed's way to pass a window of the slot mapping: ``slot_mapping[i]`` is then
        the slot of token ``offset + i``, and chunks before ``offset`` cannot be moved.
        Through the engine (``store``/``retrieve`` of ``n`` tokens) the window must hold
        exactly ``n - offset`` slots. The seed applied it to stores only; here it has
        the same meaning in both directions.

    Memory objects are KV_BLOB, ``[2, num_layers, end - start, hidden_dim]`` in the
    cache's dtype, on the cache's device or any other (typically pinned CPU memory).
    Across devices the chunk is staged on the cache's device and crosses in one copy;
    with ``use_gpu=True`` that staging buffer is kept and reused (grown on demand, or
    allocated up front when ``chunk_size``, ``dtype`` and ``device`` are given),
    otherwise it is allocated per call. Copies across devices are blocking, so host
    memory may be reused as soon as a call returns; work that stays on one CUDA device is
    ordered on the current stream. Each call reads the chunk's slot range back to the
    host once (one sync) to check it.
    """

    class Options(PluginOptions):
        use_gpu: bool = Field(
            default=False,
            description="Keep one reusable staging buffer on the KV cache's device for "
            "transfers between a GPU cache and host memory objects, instead of allocating "
            "one per chunk.",
        )

    _KWARGS = ("chunk_size", "dtype", "device")

    def __init__(self, hidden_dim_size: int, num_layers: int, use_gpu: bool = False,
                 **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self._KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments "
                            f"{unknown}; accepted: {list(self._KWARGS)}")
        super().__init__(hidden_dim_size, num_layers, use_gpu=use_gpu)
        chunk_size, dtype, device = (kwargs.get(k) for k in self._KWARGS)
        if use_gpu and chunk_size is not None and dtype is not None and device is not None:
            self._preallocate(chunk_size, dtype, device)

    @classmethod
    def from_options(cls, options: VLLMPagedMemGPUConnectorV2.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> VLLMPagedMemGPUConnectorV2:
        # The staging buffer is made on first use unless the caller names the device.
        hidden_dim, num_layers = dims_from_metadata(metadata)
        extra: dict[str, Any] = {}
        if context is not None and context.device is not None:
            extra = {"chunk_size": config.chunk_size, "dtype": metadata.kv_dtype,
                     "device": context.device}
        return cls(hidden_dim, num_layers, use_gpu=options.use_gpu, **extra)

