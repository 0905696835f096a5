"""``vllm_nested_tuple``: one contiguous (K, V) pair per layer over the whole sequence."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lmcache.abc.gpu_connector import ConnectorContext, GPUConnectorInterface
from lmcache.abc.memory import MemoryFormat
from lmcache.builtin.connectors._checks import (
    KVPair,
    check_dims,
    check_known,
    check_layer,
    check_memory_tensor,
    check_range,
    dims_from_metadata,
    kv_layers,
    memory_tensor,
    require,
    split_kv,
)
from lmcache.plugin.options import PluginOptions

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["VLLMNestedTupleGPUConnector"]


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
        check_dims(hidden_dim_size, num_layers)
        self.hidden_dim_size = hidden_dim_size
        self.num_layers = num_layers

    @classmethod
    def from_options(cls, options: VLLMNestedTupleGPUConnector.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> VLLMNestedTupleGPUConnector:
        return cls(*dims_from_metadata(metadata))

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden_dim_size])

    KWARGS = frozenset({"kvcaches"})

    def check_kwargs(self, num_tokens: int, **kwargs: Any) -> None:
        check_known(kwargs, self.KWARGS, self)
        pairs = self._pairs(kwargs)
        check_range(0, num_tokens, pairs[0][0].shape[0], "the tokens held by kvcaches")

    def _pairs(self, kwargs: dict[str, Any]) -> list[KVPair]:
        kvcaches = require(kwargs, "kvcaches", f"a sequence of {self.num_layers} (K, V) "
                            "pairs of [num_tokens, num_heads, head_size] tensors")
        pairs: list[KVPair] = []
        for i, layer in enumerate(kv_layers(kvcaches, self.num_layers)):
            k, v = split_kv(layer, i, stacked_ndims=(3, 4))
            if i == 0 and (k.dim() not in (2, 3) or math.prod(k.shape[1:]) != self.hidden_dim_size):
                raise ValueError(
                    f"kvcaches[0]: K has shape {tuple(k.shape)}; expected [num_tokens, "
                    "num_heads, head_size] or [num_tokens, hidden_dim] with a hidden dim of "
                    f"{self.hidden_dim_size} (hidden_dim_size)")
            check_layer(k, v, i, pairs[0][0] if pairs else k)
            pairs.append((k, v))
        return pairs

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[list[KVPair], torch.Tensor]:
        tensor = memory_tensor(memory_obj)
        pairs = self._pairs(kwargs)
        first = pairs[0][0]
        check_range(start, end, first.shape[0], "the tokens held by kvcaches")
        check_memory_tensor(memory_obj, tensor, self.get_shape(end - start), first.dtype,
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
        memory_obj.metadata.payload_checksum = None
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

