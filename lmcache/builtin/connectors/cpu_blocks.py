"""``vllm_cpu_blocks`` and ``vllm_mla_blocks``: vLLM's KV cache moved as whole blocks
(opaque pages) -- the CPU backend's layout, and the one latent tensor per layer of MLA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from lmcache.abc.gpu_connector import ConnectorContext, GPUConnectorInterface
from lmcache.abc.memory import MemoryFormat
from lmcache.builtin.connectors._checks import (
    check_known,
    check_memory_tensor,
    check_range,
    kv_layers,
    memory_tensor,
    require,
    version_of,
)
from lmcache.builtin.connectors._cpu_moves import STREAM_MIN_BYTES, gather_with_checksum
from lmcache.ops import cpu_ops
from lmcache.plugin.options import PluginOptions

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["VLLMCPUBlockConnector", "VLLMMLABlockConnector"]


def _check_whole_blocks(chunk_size: int, block_size: int, plugin: str) -> None:
    if chunk_size % block_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of the block size "
                         f"{block_size}; expected a chunk of whole blocks for {plugin}")


class _Checked:
    """The arguments of one call, checked: the layers (held, so that no other tensor can
    take their identity while they are remembered), each as ``[num_blocks, page]`` rows,
    the slot mapping with its version counter, and the block of every block's first
    slot (-1 for a block the serving engine holds). Reused while the layers are the
    same objects and the slot mapping is the same object, unwritten since."""

    __slots__ = ("layers", "rows", "slot_mapping", "version", "blocks", "all_valid")

    def __init__(self, layers: Any, slot_mapping: torch.Tensor, blocks: torch.Tensor,
                 all_valid: bool) -> None:
        self.layers = list(layers)
        self.rows = [c.view(c.shape[0], -1) for c in self.layers]
        self.slot_mapping = slot_mapping
        self.version = version_of(slot_mapping)
        self.blocks = blocks.contiguous()
        self.all_valid = all_valid

    def matches(self, layers: Any, slot_mapping: Any) -> bool:
        # a slot mapping without a version counter (an inference tensor) may have been
        # written since: it is checked again every time
        return (slot_mapping is self.slot_mapping and self.version is not None
                and version_of(slot_mapping) == self.version
                and len(layers) == len(self.layers)
                and all(a is b for a, b in zip(layers, self.layers)))


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
        self._checked: _Checked | None = None

    @classmethod
    def from_options(cls, options: VLLMCPUBlockConnector.Options,
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> VLLMCPUBlockConnector:
        _check_whole_blocks(config.chunk_size, options.block_size, "vllm_cpu_blocks")
        num_layers, _, _, num_kv_heads, head_size = metadata.kv_shape
        return cls(num_layers, num_kv_heads, head_size, options.block_size)

    def page_shape(self) -> tuple[int, ...]:
        return (self.num_kv_heads, self.block_size, 2 * self.head_size)

    def get_shape(self, num_tokens: int) -> torch.Size:
        blocks = -(-num_tokens // self.block_size)
        return torch.Size((self.num_layers, blocks, *self.page_shape()))

    KWARGS = frozenset({"kvcaches", "slot_mapping"})
    LAYOUT = "vLLM's CPU layout"

    def check_kwargs(self, num_tokens: int, **kwargs: Any) -> None:
        check_known(kwargs, self.KWARGS, self)
        caches = self._caches(kwargs)
        check_range(0, num_tokens, int(caches.slot_mapping.shape[0]), "slot_mapping length")

    def _caches(self, kwargs: dict[str, Any]) -> _Checked:
        """The checked ``kvcaches`` and ``slot_mapping`` of a call, and the block of every
        block's first slot. A store or retrieve moves many chunks with the same
        arguments: they are checked once, and again only when a layer or the slot
        mapping is another object or the slot mapping was written to."""
        kvcaches = kv_layers(require(kwargs, "kvcaches", f"{self.num_layers} tensors "
                                    "[num_blocks, num_kv_heads, block_size, 2*head_size]"),
                           self.num_layers)
        slot_mapping = require(kwargs, "slot_mapping", "a 1-D integer tensor of slots, one "
                                "per token of the sequence")
        last = self._checked
        if last is not None and last.matches(kvcaches, slot_mapping):
            return last
        first = kvcaches[0]
        expected = f"[num_blocks, {', '.join(map(str, self.page_shape()))}]"
        for i, layer in enumerate(kvcaches):
            if not isinstance(layer, torch.Tensor) or \
                    tuple(layer.shape[1:]) != self.page_shape():
                shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else \
                    type(layer).__name__
                raise ValueError(f"kvcaches[{i}] is {shape}; expected a tensor {expected} "
                                 f"({self.LAYOUT})")
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
        slots = slot_mapping[::self.block_size].to("cpu", torch.int64)
        num_blocks = int(first.shape[0])
        valid = slots >= 0
        if bool((slots[valid] % self.block_size).any()):
            raise ValueError("slot_mapping is not block aligned: the first token of a block "
                             "must have a slot that is a multiple of block_size")
        blocks = torch.where(valid, slots // self.block_size, -1)
        if bool((blocks >= num_blocks).any()):
            raise ValueError(f"slot_mapping addresses block {int(blocks.max())}; the cache "
                             f"has {num_blocks} blocks")
        checked = _Checked(kvcaches, slot_mapping, blocks, bool(valid.all()))
        self._checked = checked
        return checked

    def _prepare(self, memory_obj: MemoryObj, start: int, end: int, kwargs: dict[str, Any],
                 *, filling: bool) -> tuple[_Checked, torch.Tensor, torch.Tensor]:
        caches = self._caches(kwargs)
        check_range(start, end, int(caches.slot_mapping.shape[0]), "slot_mapping length")
        if start % self.block_size:
            raise ValueError(f"start={start} is not on a block boundary; expected a multiple "
                             f"of block_size={self.block_size}")
        tensor = memory_tensor(memory_obj)
        check_memory_tensor(memory_obj, tensor, self.get_shape(end - start),
                            caches.layers[0].dtype, filling=filling)
        blocks = caches.blocks[start // self.block_size: -(-end // self.block_size)]
        if filling and not caches.all_valid and bool((blocks < 0).any()):
            raise ValueError("slot_mapping has -1 in the range to store; expected the slots "
                             "of tokens the serving engine computed")
        return caches, tensor, blocks

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy the blocks holding tokens ``[start, end)`` into ``memory_obj``."""
        checked, dst, blocks = self._prepare(memory_obj, start, end, kwargs, filling=True)
        memory_obj.metadata.payload_checksum = None  # unless the gather computes it
        rows = checked.rows
        parts = [d.view(d.shape[0], -1) for d in dst.unbind(0)]
        ops = cpu_ops() if rows[0].device.type == "cpu" else None
        if ops is not None:
            gather_with_checksum(ops, rows, parts, blocks,
                                 dst.numel() * dst.element_size() >= STREAM_MIN_BYTES, dst,
                                 memory_obj)
        else:
            index = blocks.to(rows[0].device)
            for cache, part in zip(rows, parts):
                torch.index_select(cache, 0, index, out=part)
        memory_obj.metadata.fmt = MemoryFormat.KV_BLOB

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy ``memory_obj``'s pages into the blocks of tokens ``[start, end)``; blocks
        whose first slot is ``-1`` are skipped."""
        checked, src, blocks = self._prepare(memory_obj, start, end, kwargs, filling=False)
        rows = checked.rows
        parts = [s.view(s.shape[0], -1) for s in src.unbind(0)]
        ops = cpu_ops() if rows[0].device.type == "cpu" else None
        if ops is not None:
            ops.scatter_rows(rows, parts, blocks,
                             src.numel() * src.element_size() >= STREAM_MIN_BYTES)
            return
        keep = torch.nonzero(blocks >= 0).squeeze(1)
        index = blocks.index_select(0, keep).to(rows[0].device)
        for cache, part in zip(rows, parts):
            cache.index_copy_(0, index, part.index_select(0, keep.to(part.device)))


class VLLMMLABlockConnector(VLLMCPUBlockConnector):
    """vLLM's KV cache of an MLA model (DeepSeek-V2/V3 style), moved as whole blocks.

    Every layer keeps one latent tensor ``[num_blocks, block_size, latent_size]``
    (``latent_size = kv_lora_rank + qk_rope_head_dim``), the same on every tensor-parallel
    rank; the vLLM integration therefore has one rank store it and every rank load it.
    Pages, keyword arguments and memory objects are those of `VLLMCPUBlockConnector`
    with the page ``[block_size, latent_size]``: objects are KV_BLOB tensors
    ``[num_layers, ceil((end - start) / block_size), block_size, latent_size]``.
    The engine metadata's ``kv_shape`` is ``(num_layers, 1, chunk_size, 1,
    latent_size)``.
    """

    class Options(PluginOptions):
        block_size: int = Field(
            default=16, ge=1,
            description="Tokens per block of the serving engine's KV cache (vLLM uses 16 "
            "for MLA on the CPU). chunk_size must be a multiple of it.",
        )

    def __init__(self, num_layers: int, latent_size: int, block_size: int = 16) -> None:
        super().__init__(num_layers, 1, latent_size, block_size)
        self.latent_size = latent_size

    @classmethod
    def from_options(cls, options: VLLMMLABlockConnector.Options,  # type: ignore[override]
                     config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> VLLMMLABlockConnector:
        _check_whole_blocks(config.chunk_size, options.block_size, "vllm_mla_blocks")
        num_layers, _, _, _, latent_size = metadata.kv_shape
        return cls(num_layers, latent_size, options.block_size)

    LAYOUT = "vLLM's MLA layout"

    def page_shape(self) -> tuple[int, ...]:
        return (self.block_size, self.latent_size)
