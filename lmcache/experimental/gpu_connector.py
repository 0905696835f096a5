"""GPU connectors: move KV between the serving engine's cache and memory objects.

Connectors, by entry-point name in the ``lmcache.gpu_connectors`` group:

* ``vllm_nested_tuple`` -- `VLLMNestedTupleGPUConnector`, one contiguous (K, V) pair
  per layer covering the whole sequence;
* ``vllm_paged``        -- `VLLMPagedMemGPUConnector`, vLLM's paged KV addressed by a
  slot mapping;
* ``vllm_paged_v2``     -- `VLLMPagedMemGPUConnectorV2`, the same, with an optional
  reusable staging buffer on the cache's device (the one vLLM's adapter uses on GPUs);
* ``vllm_cpu_blocks``   -- `VLLMCPUBlockConnector`, vLLM's CPU backend layout, moved as
  whole blocks (opaque pages).

All of them are pure torch: one vectorized copy per layer and K/V, on whatever device
the tensors live on (CPU or CUDA).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from lmcache.experimental.memory_management import MemoryFormat
from lmcache.ops import cpu_ops, start_building
from lmcache.plugin.options import PluginOptions

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryObj

__all__ = [
    "GPUConnectorInterface",
    "VLLMNestedTupleGPUConnector",
    "VLLMPagedMemGPUConnector",
    "VLLMPagedMemGPUConnectorV2",
    "VLLMCPUBlockConnector",
]


class GPUConnectorInterface(ABC):
    """Copies KV between the serving engine's layout and KV_BLOB memory objects.

    A KV_BLOB memory object holds the KV of the tokens ``[start, end)`` of a sequence
    as one tensor of shape ``[2, num_layers, end - start, hidden_dim]`` (K then V), with
    ``hidden_dim = num_kv_heads * head_size``. A connector knows the serving engine's
    layout (contiguous per-request tensors, paged blocks addressed by a slot mapping,
    ...) and reads it from the keyword arguments the engine passes to
    ``store``/``retrieve``. It must:

    - copy exactly the tokens ``[start, end)``, bit for bit, in both directions;
    - never touch serving-engine memory outside the slots of those tokens;
    - raise ``ValueError`` naming the missing keyword or the expected shape, dtype or
      device when its input is wrong — before copying anything.

    Connectors are plugins (group ``lmcache.gpu_connectors``).
    """

    @abstractmethod
    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy the KV of tokens ``[start, end)`` from the serving engine into
        ``memory_obj``. Sub-classes define the format of the kwargs."""

    @abstractmethod
    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy ``memory_obj`` into the serving engine's KV at tokens ``[start, end)``.
        Sub-classes define the format of the kwargs."""

    @abstractmethod
    def get_shape(self, num_tokens: int) -> torch.Size:
        """The shape of the memory object that holds ``num_tokens`` tokens."""

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> GPUConnectorInterface:
        """Build the connector from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")


# ---------------------------------------------------------------------------------------
# Shared validation (everything is checked before the first byte is copied)
# ---------------------------------------------------------------------------------------

KVPair = tuple[torch.Tensor, torch.Tensor]


def _check_dims(hidden_dim_size: int, num_layers: int) -> None:
    for name, value in (("hidden_dim_size", hidden_dim_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _dims_from_metadata(metadata: LMCacheEngineMetadata) -> tuple[int, int]:
    """``(hidden_dim, num_layers)`` from ``kv_shape`` =
    ``(num_layers, 2, chunk_size, num_kv_heads, head_size)``."""
    shape = metadata.kv_shape
    return shape[3] * shape[4], shape[0]


def _require(kwargs: dict[str, Any], name: str, expected: str) -> Any:
    value = kwargs.get(name)
    if value is None:
        raise ValueError(f"missing keyword argument {name!r}: expected {expected}")
    return value


def _layers(kvcaches: Any, num_layers: int) -> Any:
    if isinstance(kvcaches, (str, bytes, Mapping)) or not hasattr(kvcaches, "__len__"):
        raise ValueError(f"kvcaches must be a sequence of {num_layers} layers, got "
                         f"{type(kvcaches).__name__}")
    if len(kvcaches) != num_layers:
        raise ValueError(f"kvcaches has {len(kvcaches)} layers; expected {num_layers} "
                         "(num_layers)")
    return kvcaches


def _split_kv(layer: Any, i: int, stacked_ndims: tuple[int, ...]) -> KVPair:
    """A layer's (K, V): a pair of tensors, or one tensor with K and V stacked on dim 0."""
    if isinstance(layer, torch.Tensor):
        if layer.dim() not in stacked_ndims or layer.shape[0] != 2:
            raise ValueError(
                f"kvcaches[{i}] is a tensor of shape {tuple(layer.shape)}; expected a (K, V) "
                f"pair or one {'/'.join(map(str, stacked_ndims))}-D tensor [2, ...] with K "
                "and V stacked on dim 0")
        return layer[0], layer[1]
    if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence) or len(layer) != 2:
        raise ValueError(f"kvcaches[{i}] must be a (K, V) pair of tensors, got "
                         f"{type(layer).__name__}")
    k, v = layer
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise ValueError(f"kvcaches[{i}] must be a (K, V) pair of tensors, got "
                         f"({type(k).__name__}, {type(v).__name__})")
    return k, v


def _check_layer(k: torch.Tensor, v: torch.Tensor, i: int, first: torch.Tensor) -> None:
    # K against V, then every layer against layer 0 (whose own shape the caller checked).
    for what, a, b in (("shape", tuple(k.shape), tuple(v.shape)), ("dtype", k.dtype, v.dtype),
                       ("device", k.device, v.device)):
        if a != b:
            raise ValueError(f"kvcaches[{i}]: K has {what} {a} but V has {b}; expected the "
                             f"same {what} for K and V")
    for what, a, b in (("shape", tuple(k.shape), tuple(first.shape)),
                       ("dtype", k.dtype, first.dtype), ("device", k.device, first.device)):
        if a != b:
            raise ValueError(f"kvcaches[{i}] has {what} {a}; expected {b} like kvcaches[0]")


def _check_range(start: int, end: int, num_tokens: int, what: str) -> None:
    if not (0 <= start <= end <= num_tokens):
        raise ValueError(f"start/end out of range: got start={start}, end={end}; expected "
                         f"0 <= start <= end <= {num_tokens} ({what})")


def _memory_tensor(memory_obj: MemoryObj) -> torch.Tensor:
    tensor = memory_obj.tensor
    if tensor is None:
        # The seed documents an AssertionError; raised explicitly so that -O keeps it.
        raise AssertionError(f"{type(memory_obj).__name__} has no tensor; a KV_BLOB memory "
                             "object needs tensor memory")
    return tensor


def _check_memory_tensor(memory_obj: MemoryObj, tensor: torch.Tensor,
                         expected_shape: torch.Size, dtype: torch.dtype,
                         *, filling: bool) -> None:
    fmt = memory_obj.metadata.fmt
    if filling:
        if fmt not in (MemoryFormat.KV_BLOB, MemoryFormat.UNDEFINED):
            raise ValueError(f"memory object has format {fmt.name}; expected KV_BLOB "
                             "(or UNDEFINED, which from_gpu turns into KV_BLOB)")
    elif fmt != MemoryFormat.KV_BLOB:
        raise ValueError(f"memory object has format {fmt.name}; expected KV_BLOB")
    if tensor.dtype != dtype:
        raise ValueError(f"memory object has dtype {tensor.dtype}; expected {dtype}, the "
                         "dtype of the KV cache")
    if tensor.shape != expected_shape:
        raise ValueError(f"memory object has shape {tuple(tensor.shape)}; expected "
                         f"{tuple(expected_shape)} = get_shape(end - start)")
    if not tensor.is_contiguous():
        raise ValueError("memory object tensor is not contiguous; expected a contiguous "
                         "KV_BLOB tensor")


# ---------------------------------------------------------------------------------------
# Contiguous KV: one (K, V) pair per layer over the whole sequence
# ---------------------------------------------------------------------------------------


class VLLMNestedTupleGPUConnector(GPUConnectorInterface):
    """KV held as a nested tuple: one (K, V) pair per layer, over the whole sequence.

    ``kvcaches`` (a keyword argument of `from_gpu` and `to_gpu`) is a sequence of
    ``num_layers`` layers, each a ``(K, V)`` pair of tensors of shape
    ``[num_tokens, num_heads, head_size]`` or ``[num_tokens, hidden_dim]`` (or one tensor
    with K and V stacked on dim 0). The token dimension is dim 0 and row ``t`` is token
    ``t`` of the *whole* sequence. All layers share one shape, dtype and device; each
    layer's rows must be viewable as ``hidden_dim_size`` values (heads and head size
    contiguous, as in any dense tensor).

    Memory objects are KV_BLOB, ``[2, num_layers, end - start, hidden_dim]`` in the
    cache's dtype, on any device: the copy crosses devices when they differ.
    """

    class Options(PluginOptions):
        pass

    def __init__(self, hidden_dim_size: int, num_layers: int) -> None:
        _check_dims(hidden_dim_size, num_layers)
        self.hidden_dim_size = hidden_dim_size
        self.num_layers = num_layers

    @classmethod
    def from_options(cls, options: VLLMNestedTupleGPUConnector.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     **context: Any) -> VLLMNestedTupleGPUConnector:
        return cls(*_dims_from_metadata(metadata))

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden_dim_size])

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[list[KVPair], torch.Tensor]:
        kvcaches = _require(kwargs, "kvcaches", f"a sequence of {self.num_layers} (K, V) "
                            "pairs of [num_tokens, num_heads, head_size] tensors")
        tensor = _memory_tensor(memory_obj)
        pairs: list[KVPair] = []
        for i, layer in enumerate(_layers(kvcaches, self.num_layers)):
            k, v = _split_kv(layer, i, stacked_ndims=(3, 4))
            if i == 0 and (k.dim() not in (2, 3) or math.prod(k.shape[1:]) != self.hidden_dim_size):
                raise ValueError(
                    f"kvcaches[0]: K has shape {tuple(k.shape)}; expected [num_tokens, "
                    "num_heads, head_size] or [num_tokens, hidden_dim] with a hidden dim of "
                    f"{self.hidden_dim_size} (hidden_dim_size)")
            _check_layer(k, v, i, pairs[0][0] if pairs else k)
            pairs.append((k, v))
        first = pairs[0][0]
        _check_range(start, end, first.shape[0], "the tokens held by kvcaches")
        _check_memory_tensor(memory_obj, tensor, self.get_shape(end - start), first.dtype,
                             filling=filling)
        return pairs, tensor

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy tokens ``[start, end)`` of every layer into ``memory_obj`` and mark it
        KV_BLOB.

        :raises ValueError: ``kvcaches`` missing or malformed (layer count, shapes, hidden
            dim, dtypes, devices); ``[start, end)`` outside ``[0, num_tokens]``; a memory
            object whose shape is not ``get_shape(end - start)``, whose dtype is not the
            cache's, or whose format is neither KV_BLOB nor UNDEFINED.
        :raises AssertionError: the memory object has no tensor.
        """
        pairs, dst = self._prepare(memory_obj, start, end, kwargs, filling=True)
        n = end - start
        for i, (k, v) in enumerate(pairs):
            # view the contiguous destination like the source, so no temporary is made
            dst[0, i].view(n, *k.shape[1:]).copy_(k[start:end])
            dst[1, i].view(n, *v.shape[1:]).copy_(v[start:end])
        memory_obj.metadata.fmt = MemoryFormat.KV_BLOB

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy ``memory_obj`` into tokens ``[start, end)`` of every layer; nothing else
        of ``kvcaches`` is written.

        :raises ValueError: as `from_gpu`, and when the memory object is not KV_BLOB.
        :raises AssertionError: the memory object has no tensor.
        """
        pairs, src = self._prepare(memory_obj, start, end, kwargs, filling=False)
        n = end - start
        for i, (k, v) in enumerate(pairs):
            k[start:end].copy_(src[0, i].view(n, *k.shape[1:]))
            v[start:end].copy_(src[1, i].view(n, *v.shape[1:]))


# ---------------------------------------------------------------------------------------
# Paged KV addressed by a slot mapping (vLLM)
# ---------------------------------------------------------------------------------------


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
        _check_dims(hidden_dim_size, num_layers)
        self.hidden_dim_size = hidden_dim_size
        self.num_layers = num_layers
        self.use_gpu = bool(use_gpu)
        self._staging: torch.Tensor | None = None
        start_building()  # the CPU kernels compile in the background; torch serves meanwhile
        self._staging_lock = threading.Lock()

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden_dim_size])

    # -- validation ----------------------------------------------------------------------

    def _flat_layers(self, kvcaches: Any) -> list[Any]:
        """Per layer, a ``[2, num_slots, hidden]`` view (stacked layout) or a pair of
        ``[num_slots, hidden]`` views (pair layout), all in the layout of layer 0."""
        layers = _layers(kvcaches, self.num_layers)
        k0, v0 = _split_kv(layers[0], 0, stacked_ndims=(5,))
        if k0.dim() != 4 or k0.shape[2] * k0.shape[3] != self.hidden_dim_size:
            raise ValueError(
                f"kvcaches[0]: K has shape {tuple(k0.shape)}; expected [num_blocks, "
                "block_size, num_kv_heads, head_size] with num_kv_heads * head_size "
                f"= {self.hidden_dim_size} (hidden_dim_size)")
        _check_layer(k0, v0, 0, k0)
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
                k, v = _split_kv(layer, i, stacked_ndims=(5,))
                _check_layer(k, v, i, k0)
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
        # one device sync for all range checks (an out-of-range index would be a device
        # assert on CUDA, or silently wrong memory, so it is worth it)
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

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[list[Any], torch.Tensor, torch.Tensor, bool]:
        kvcaches = _require(kwargs, "kvcaches", f"a sequence of {self.num_layers} layers, "
                            "each a (K, V) pair of [num_blocks, block_size, num_kv_heads, "
                            "head_size] tensors or one [2, num_blocks, ...] tensor")
        slot_mapping = _require(kwargs, "slot_mapping", "a 1-D integer tensor with one slot "
                                "(block_id * block_size + offset) per token of the sequence")
        tensor = _memory_tensor(memory_obj)
        flat = self._flat_layers(kvcaches)
        first = flat[0][0]  # K of layer 0, [num_slots, hidden] in either layout
        slots, skipped = self._chunk_slots(slot_mapping, start, end, first.shape[0],
                                           first.device, allow_skipped=not filling)
        _check_memory_tensor(memory_obj, tensor, self.get_shape(end - start), first.dtype,
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
        device = flat[0][0].device
        if dst.device == device:
            if device.type == "cpu" and _cpu_kernel_move(
                    flat, slots, dst, _block_size(kwargs["kvcaches"]), to_cache=False):
                memory_obj.metadata.fmt = MemoryFormat.KV_BLOB
                return
            if device.type == "cpu" and _gather_blocks_cpu(
                    flat, slots, dst, _block_size(kwargs["kvcaches"])):
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
            if device.type == "cpu" and _cpu_kernel_move(
                    flat, slots, src, _block_size(kwargs["kvcaches"]), to_cache=True):
                return
            if device.type == "cpu" and not skipped and _scatter_blocks_cpu(
                    flat, slots, src, _block_size(kwargs["kvcaches"])):
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
            _scatter_rows_cpu(pairs, slots)
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
                     **context: Any) -> VLLMPagedMemGPUConnector:
        return cls(*_dims_from_metadata(metadata))


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
                     **context: Any) -> VLLMPagedMemGPUConnectorV2:
        # The staging buffer is made on first use unless the caller names the device.
        hidden_dim, num_layers = _dims_from_metadata(metadata)
        extra: dict[str, Any] = {}
        if context.get("device") is not None:
            extra = {"chunk_size": config.chunk_size, "dtype": metadata.kv_dtype,
                     "device": context["device"]}
        return cls(hidden_dim, num_layers, use_gpu=options.use_gpu, **extra)


# -- CPU scatter ---------------------------------------------------------------------------
# torch's index_copy_ on the CPU moves one element at a time (~1/3 of memcpy speed here);
# copying whole token rows as opaque NumPy items runs at memory speed, and NumPy releases
# the GIL, so the layers are spread over a small thread pool.

_scatter_pool: ThreadPoolExecutor | None = None
_scatter_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _scatter_pool
    with _scatter_pool_lock:
        if _scatter_pool is None:
            _scatter_pool = ThreadPoolExecutor(max(1, torch.get_num_threads()),
                                               thread_name_prefix="lmcache-scatter")
        return _scatter_pool


def _rows(t: torch.Tensor) -> np.ndarray:
    """A [n, hidden] tensor with contiguous rows as a 1-D NumPy array of n opaque rows."""
    raw = t.view(torch.uint8).numpy()
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(-1)


def _scatter_rows_cpu(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                      slots: torch.Tensor) -> None:
    index = slots.numpy()
    if index.size == 0:
        return
    jobs = [(_rows(dst), _rows(src.contiguous())) for dst, src in pairs]
    if len(jobs) == 1 or torch.get_num_threads() == 1:
        for dst, src in jobs:
            np.put(dst, index, src)
        return
    list(_pool().map(lambda job: np.put(job[0], index, job[1]), jobs))


# -- whole blocks ---------------------------------------------------------------------------
# A chunk usually covers whole pages of the serving engine (256-token chunks, 16-token
# blocks): then each page moves as one opaque row of block_size * hidden elements, which
# is several times faster than row-per-token on the CPU.


def _block_size(kvcaches: Any) -> int:
    layer = kvcaches[0]
    return int(layer.shape[2] if isinstance(layer, torch.Tensor) else layer[0].shape[1])


def _whole_blocks(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """Block ids if ``slots`` are whole blocks in order within each block, else None."""
    n = slots.numel()
    if n == 0 or n % block_size or block_size == 1:
        return None
    grid = slots.view(-1, block_size)
    first = grid[:, 0]
    if bool((first % block_size).any()):
        return None
    if not torch.equal(grid - first.unsqueeze(1),
                       torch.arange(block_size).expand_as(grid)):
        return None
    return first // block_size


def _kv_block_pairs(flat: list[Any], mem: torch.Tensor, block_size: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    hidden = mem.shape[-1]
    pairs = []
    for layer, mem_k, mem_v in zip(flat, mem[0].unbind(0), mem[1].unbind(0)):
        k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
        for cache, part in ((k, mem_k), (v, mem_v)):
            pairs.append((cache.view(-1, block_size * hidden),
                          part.view(-1, block_size * hidden)))
    return pairs


def _gather_blocks_cpu(flat: list[Any], slots: torch.Tensor, dst: torch.Tensor,
                       block_size: int) -> bool:
    blocks = _whole_blocks(slots, block_size)
    if blocks is None:
        return False
    for cache, part in _kv_block_pairs(flat, dst, block_size):
        torch.index_select(cache, 0, blocks, out=part)
    return True


def _scatter_blocks_cpu(flat: list[Any], slots: torch.Tensor, src: torch.Tensor,
                        block_size: int) -> bool:
    blocks = _whole_blocks(slots, block_size)
    if blocks is None:
        return False
    _scatter_rows_cpu(_kv_block_pairs(flat, src, block_size), blocks)
    return True


# -- native CPU kernels (lmcache.ops) -------------------------------------------------------

#: Below this many bytes per chunk, ordinary stores beat non-temporal ones.
_STREAM_MIN_BYTES = 1 << 20


def _cpu_kernel_move(flat: list[Any], slots: torch.Tensor, mem: torch.Tensor,
                     block_size: int, *, to_cache: bool) -> bool:
    """Move a chunk with the compiled row-copy kernels; False when they are not built.

    Whole pages move as one row each, otherwise one row per token; slots of -1 are
    skipped by the scatter (the gather never sees them: `_chunk_slots` refuses them).
    """
    ops = cpu_ops()
    if ops is None:
        return False
    blocks = _whole_blocks(slots, block_size)
    if blocks is not None:
        pairs, index = _kv_block_pairs(flat, mem, block_size), blocks
    else:
        pairs, index = [], slots
        for layer, mem_k, mem_v in zip(flat, mem[0].unbind(0), mem[1].unbind(0)):
            k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
            pairs += [(k, mem_k), (v, mem_v)]
    stream = mem.numel() * mem.element_size() >= _STREAM_MIN_BYTES
    move = ops.scatter_rows if to_cache else ops.gather_rows
    move([c for c, _ in pairs], [m for _, m in pairs], index.contiguous(), stream)
    return True


# ---------------------------------------------------------------------------------------
# vLLM's CPU backend: whole blocks as opaque pages
# ---------------------------------------------------------------------------------------


class VLLMCPUBlockConnector(GPUConnectorInterface):
    """vLLM's CPU attention layout, moved as whole blocks (opaque pages).

    vLLM's CPU backend keeps one tensor per layer of shape
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; inside each
    ``(block, head)`` page the keys are stored transposed (``[head_size, block_size]``)
    and followed by the values (``[block_size, head_size]``). A single token's KV is
    therefore not a row of the tensor, and this connector never tries to cut one out:
    it copies whole blocks, bit for bit, and a chunk must start on a block boundary
    (``chunk_size`` a multiple of ``block_size``).

    Keyword arguments of `from_gpu` and `to_gpu`:

    ``kvcaches``
        ``num_layers`` tensors ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
        sharing one shape, dtype and device (CPU).
    ``slot_mapping``
        A 1-D integer tensor with one slot per token of the whole sequence,
        ``slot = block_id * block_size + offset``. The connector reads the slot of the
        first token of each block in ``[start, end)``. A block whose first slot is
        ``-1`` is one the serving engine already holds (its prefix cache): `to_gpu`
        leaves it alone, `from_gpu` refuses it.

    Memory objects are KV_BLOB tensors of shape
    ``[num_layers, ceil((end - start) / block_size), num_kv_heads, block_size,
    2 * head_size]``: the pages of the chunk's blocks in order. A chunk that ends inside
    a block (the last chunk of a prompt) carries the whole last block; the positions
    past ``end`` are whatever the serving engine had there and are overwritten by the
    serving engine when it computes those tokens.
    """

    class Options(PluginOptions):
        block_size: int = Field(
            default=128, ge=1,
            description="Tokens per block of the serving engine's KV cache (vLLM's CPU "
            "backend uses 128). chunk_size must be a multiple of it.",
        )

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int,
                 block_size: int = 128) -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_size", head_size), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size

    @classmethod
    def from_options(cls, options: VLLMCPUBlockConnector.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     **context: Any) -> VLLMCPUBlockConnector:
        if config.chunk_size % options.block_size:
            raise ValueError(f"chunk_size {config.chunk_size} is not a multiple of the "
                             f"block size {options.block_size}; expected a chunk of whole "
                             "blocks for vllm_cpu_blocks")
        num_layers, _, _, num_kv_heads, head_size = metadata.kv_shape
        return cls(num_layers, num_kv_heads, head_size, options.block_size)

    def page_shape(self) -> tuple[int, int, int]:
        return (self.num_kv_heads, self.block_size, 2 * self.head_size)

    def get_shape(self, num_tokens: int) -> torch.Size:
        blocks = -(-num_tokens // self.block_size)
        return torch.Size((self.num_layers, blocks, *self.page_shape()))

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        kvcaches = _layers(_require(kwargs, "kvcaches", f"{self.num_layers} tensors "
                                    "[num_blocks, num_kv_heads, block_size, 2*head_size]"),
                           self.num_layers)
        slot_mapping = _require(kwargs, "slot_mapping", "a 1-D integer tensor of slots, one "
                                "per token of the sequence")
        first = kvcaches[0]
        expected = f"[num_blocks, {', '.join(map(str, self.page_shape()))}]"
        for i, layer in enumerate(kvcaches):
            if not isinstance(layer, torch.Tensor) or layer.dim() != 4 \
                    or tuple(layer.shape[1:]) != self.page_shape():
                shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else \
                    type(layer).__name__
                raise ValueError(f"kvcaches[{i}] is {shape}; expected a tensor {expected} "
                                 "(vLLM's CPU layout)")
            if layer.shape != first.shape or layer.dtype != first.dtype \
                    or layer.device != first.device:
                raise ValueError(f"kvcaches[{i}] is {tuple(layer.shape)} {layer.dtype} on "
                                 f"{layer.device}; expected the same as kvcaches[0]: "
                                 f"{tuple(first.shape)} {first.dtype} on {first.device}")
            if not layer.is_contiguous():
                raise ValueError(f"kvcaches[{i}] is not contiguous; expected contiguous "
                                 "pages")
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 \
                or slot_mapping.dtype.is_floating_point or slot_mapping.dtype == torch.bool:
            raise ValueError("slot_mapping must be a 1-D integer tensor, got "
                             f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}")
        _check_range(start, end, int(slot_mapping.shape[0]), "slot_mapping length")
        if start % self.block_size:
            raise ValueError(f"start={start} is not on a block boundary; expected a multiple "
                             f"of block_size={self.block_size}")
        tensor = _memory_tensor(memory_obj)
        _check_memory_tensor(memory_obj, tensor, self.get_shape(end - start), first.dtype,
                             filling=filling)
        slots = slot_mapping[start:end:self.block_size].to("cpu", torch.int64)
        num_blocks = int(first.shape[0])
        valid = slots >= 0
        if bool((slots[valid] % self.block_size).any()):
            raise ValueError("slot_mapping is not block aligned: the first token of a block "
                             "must have a slot that is a multiple of block_size")
        blocks = torch.where(valid, slots // self.block_size, -1)
        if bool((blocks >= num_blocks).any()):
            raise ValueError(f"slot_mapping addresses block {int(blocks.max())}; the cache "
                             f"has {num_blocks} blocks")
        if filling and not bool(valid.all()):
            raise ValueError("slot_mapping has -1 in the range to store; expected the slots "
                             "of tokens the serving engine computed")
        return list(kvcaches), tensor, blocks

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy the blocks holding tokens ``[start, end)`` into ``memory_obj``."""
        caches, dst, blocks = self._prepare(memory_obj, start, end, kwargs, filling=True)
        rows = [c.view(c.shape[0], -1) for c in caches]
        parts = [d.view(d.shape[0], -1) for d in dst.unbind(0)]
        ops = cpu_ops() if caches[0].device.type == "cpu" else None
        if ops is not None:
            ops.gather_rows(rows, parts, blocks.contiguous(),
                            dst.numel() * dst.element_size() >= _STREAM_MIN_BYTES)
        else:
            index = blocks.to(caches[0].device)
            for cache, part in zip(rows, parts):
                torch.index_select(cache, 0, index, out=part)
        memory_obj.metadata.fmt = MemoryFormat.KV_BLOB

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy ``memory_obj``'s pages into the blocks of tokens ``[start, end)``; blocks
        whose first slot is ``-1`` are skipped."""
        caches, src, blocks = self._prepare(memory_obj, start, end, kwargs, filling=False)
        rows = [c.view(c.shape[0], -1) for c in caches]
        parts = [s.view(s.shape[0], -1) for s in src.unbind(0)]
        ops = cpu_ops() if caches[0].device.type == "cpu" else None
        if ops is not None:
            ops.scatter_rows(rows, parts, blocks.contiguous(),
                             src.numel() * src.element_size() >= _STREAM_MIN_BYTES)
            return
        keep = torch.nonzero(blocks >= 0).squeeze(1)
        index = blocks.index_select(0, keep).to(caches[0].device)
        for cache, part in zip(rows, parts):
            cache.index_copy_(0, index, part.index_select(0, keep.to(part.device)))
