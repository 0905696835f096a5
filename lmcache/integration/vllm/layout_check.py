"""The layout self-check of the vLLM connector, run once at ``register_kv_caches``.

A chunk is only right if lmcache reads and writes vLLM's KV cache the way vLLM's
attention does. Shapes alone cannot prove that (a vLLM upgrade may keep the shape and
move the bytes), so before the first request the connector makes one round trip
through the live cache:

1. Two blocks of the cache (the last two; their bytes are saved and put back) are
   cleared, and vLLM's own cache writer -- the op its attention backend calls to write
   the K and V of new tokens (``cpu_attn_reshape_and_cache`` on the CPU backend,
   ``reshape_and_cache_flash`` on the flash layout) -- writes random K and V for every
   token of the first block, in every layer.
2. The writes must fill that block's page and touch nothing of the other block: this
   proves the slot addressing (block size, which dimension is the block) and the dtype.
3. lmcache's connector copies the block out (``from_gpu``) and back into the other block
   (``to_gpu``); the two pages must then be equal bit for bit in every layer. For a
   connector whose memory objects hold K and V per token (``[2, layers, tokens,
   heads * head_size]``, the paged connectors) rather than opaque pages, the object must
   also hold exactly the K and V that vLLM wrote, K first: this proves K/V placement.

Any failure raises `LayoutMismatch` at start, naming what differed: lmcache refuses to
run rather than hand back wrong KV. When vLLM's writer for a layout cannot be found (a
layout lmcache knows but on a device without vLLM's ops) or does not take the cache at
all (so it is not the writer vLLM uses for it), steps 1-2 fall back to random bytes
written into the page directly, which still checks the connector's round trip, and a
warning says that K/V placement was not verified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmcache.abc.gpu_connector import GPUConnectorInterface
from lmcache.abc.memory import MemoryFormat
from lmcache.kits.memory import TensorMemoryAllocator

__all__ = ["LayoutMismatch", "CacheLayout", "check_layout", "vllm_writer"]

logger = logging.getLogger(__name__)

#: Writes K and V (``[num_tokens, num_kv_heads, head_size]``) of the tokens at ``slots``
#: into one layer of the cache, the way vLLM's attention backend does.
Writer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutMismatch(ValueError):
    """vLLM's KV cache is not laid out the way lmcache reads and writes it."""


@dataclass(frozen=True)
class CacheLayout:
    """What the connector believes about one layer tensor of vLLM's KV cache."""

    #: "cpu" (``[blocks, heads, block_size, 2*head]``), "flash" (``[2, blocks, ...]``)
    #: or "mla" (``[blocks, block_size, kv_lora_rank + rope_dim]``, one "head")
    name: str
    block_dim: int  #: the dimension of the tensor that indexes blocks
    block_size: int
    num_kv_heads: int
    head_size: int
    #: "mla": where the latent ends and the rope part begins (``kv_lora_rank``)
    kv_lora_rank: int = 0

    def page(self, layer: torch.Tensor, block: int) -> torch.Tensor:
        return layer.select(self.block_dim, block)

    def num_blocks(self, layer: torch.Tensor) -> int:
        return int(layer.shape[self.block_dim])


def vllm_writer(layout: CacheLayout, dtype: torch.dtype, cache_dtype: str,
                device: torch.device) -> Writer | None:
    """vLLM's own cache writer for ``layout``, or None where vLLM's ops are not there."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # vLLM's ops not built for this platform
        return None
    if layout.name == "cpu" and device.type == "cpu":
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
            isa = _get_attn_isa(dtype, layout.block_size, layout.head_size, cache_dtype)
        except Exception:
            return None

        def write_cpu(layer: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> None:
            # the view the CPU backend's forward takes of a layer before writing into it
            n, heads, bs, _ = layer.shape
            key_cache, value_cache = layer.view(n, heads, bs * 2, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                           kv_cache_dtype=cache_dtype)
        return write_cpu
    if layout.name == "mla" and 0 < layout.kv_lora_rank < layout.head_size and \
            hasattr(ops, "concat_and_cache_mla"):
        def write_mla(layer: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> None:
            # the latent and its rope part, as MLA attention writes them (value unused)
            latent = key[:, 0, :layout.kv_lora_rank].contiguous()
            rope = key[:, 0, layout.kv_lora_rank:].contiguous()
            scale = torch.ones((), dtype=torch.float32, device=layer.device)
            ops.concat_and_cache_mla(latent, rope, layer, slots, cache_dtype, scale)
        return write_mla
    if layout.name == "flash" and device.type == "cuda" and \
            hasattr(ops, "reshape_and_cache_flash"):
        def write_flash(layer: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> None:
            scale = torch.ones((), dtype=torch.float32, device=layer.device)
            ops.reshape_and_cache_flash(key, value, layer[0], layer[1], slots, cache_dtype,
                                        scale, scale)
        return write_flash
    return None


def _describe(layers: list[torch.Tensor], layout: CacheLayout,
              connector: GPUConnectorInterface) -> str:
    first = layers[0]
    return (f"{len(layers)} layers of shape {tuple(first.shape)}, stride {first.stride()}, "
            f"{first.dtype} on {first.device}; lmcache read it as the {layout.name} layout "
            f"(blocks on dim {layout.block_dim}, block_size {layout.block_size}, "
            f"{layout.num_kv_heads} KV heads of {layout.head_size}) with "
            f"{type(connector).__name__}")


def _nonzero_values(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> torch.Tensor:
    """Random values in +-[0.5, 1.5): never zero, in any dtype a KV cache uses."""
    magnitude = torch.rand(shape, generator=generator) + 0.5
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (magnitude * sign).to(dtype=dtype, device=device)


def check_layout(connector: GPUConnectorInterface, layers: list[torch.Tensor],
                 layout: CacheLayout, *, model_dtype: torch.dtype,
                 writer: Writer | None) -> bool:
    """Run the self-check described in the module docstring.

    :returns: True if vLLM's writer took part (K/V placement verified), False if the
        check fell back to writing the page directly.
    :raises LayoutMismatch: if any step shows a layout other than the one assumed.
    """
    first = layers[0]
    num_blocks = layout.num_blocks(first)
    if num_blocks < 2:
        raise LayoutMismatch(f"the KV cache has {num_blocks} block(s); the layout check "
                             f"needs two ({_describe(layers, layout, connector)})")
    src, dst = num_blocks - 1, num_blocks - 2
    bs = layout.block_size
    saved = [(layout.page(layer, src).clone(), layout.page(layer, dst).clone())
             for layer in layers]
    generator = torch.Generator().manual_seed(20261201)
    device = first.device
    head_shape = (bs, layout.num_kv_heads, layout.head_size)
    src_slots = torch.arange(bs, dtype=torch.int64) + src * bs
    dst_slots = torch.arange(bs, dtype=torch.int64) + dst * bs
    if device.type != "cpu":
        src_slots, dst_slots = src_slots.to(device), dst_slots.to(device)
    written: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for layer in layers:
            layout.page(layer, src).zero_()
            layout.page(layer, dst).zero_()
        for i, layer in enumerate(layers):
            if writer is None:
                page = layout.page(layer, src)
                page.copy_(_nonzero_values(tuple(page.shape), page.dtype, device, generator))
                continue
            key = _nonzero_values(head_shape, model_dtype, device, generator)
            value = _nonzero_values(head_shape, model_dtype, device, generator)
            try:
                writer(layer, src_slots, key, value)
            except Exception as exc:
                if i > 0:
                    raise LayoutMismatch(
                        f"vLLM's cache writer took layer 0 but refused layer {i} "
                        f"({type(exc).__name__}: {exc}); "
                        f"{_describe(layers, layout, connector)}") from exc
                # not the writer vLLM uses for this cache (it would have refused vLLM
                # too): check the round trip with pages written directly
                logger.info("lmcache: vLLM's %s cache writer does not take this cache "
                            "(%s: %s)", layout.name, type(exc).__name__, exc)
                writer = None
                page = layout.page(layer, src)
                page.copy_(_nonzero_values(tuple(page.shape), page.dtype, device, generator))
                continue
            written.append((key, value))
            page, other = layout.page(layer, src), layout.page(layer, dst)
            filled = float((page.view(torch.uint8) != 0).float().mean()) \
                if page.element_size() == 1 else float((page != 0).float().mean())
            if filled < 0.999 or bool((other != 0).any()):
                raise LayoutMismatch(
                    f"vLLM wrote the K and V of block {src} (slots {src * bs}.."
                    f"{src * bs + bs - 1}) into other places than that block's page "
                    f"({filled:.1%} of it filled; the neighbouring block "
                    f"{'touched' if bool((other != 0).any()) else 'untouched'}): "
                    f"{_describe(layers, layout, connector)}")
        _round_trip(connector, layers, layout, src_slots, dst_slots, written, src, dst,
                    model_dtype)
    finally:
        for layer, (src_page, dst_page) in zip(layers, saved):
            layout.page(layer, src).copy_(src_page)
            layout.page(layer, dst).copy_(dst_page)
    return writer is not None


def _round_trip(connector: GPUConnectorInterface, layers: list[torch.Tensor],
                layout: CacheLayout, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                written: list[tuple[torch.Tensor, torch.Tensor]], src: int, dst: int,
                model_dtype: torch.dtype) -> None:
    bs = layout.block_size
    dtype = layers[0].dtype
    shape = connector.get_shape(bs)
    nbytes = shape.numel() * dtype.itemsize
    arena = torch.empty(nbytes + 2 * TensorMemoryAllocator.ALIGN_BYTES, dtype=torch.uint8)
    obj = TensorMemoryAllocator(arena).allocate(shape, dtype, MemoryFormat.KV_BLOB)
    if obj is None:  # pragma: no cover - the arena is sized for the object
        raise RuntimeError("lmcache: no memory for the layout check")
    try:
        try:
            connector.from_gpu(obj, 0, bs, kvcaches=layers, slot_mapping=src_slots)
        except Exception as exc:
            raise LayoutMismatch(f"lmcache's connector could not read block {src} "
                                 f"({type(exc).__name__}: {exc}): "
                                 f"{_describe(layers, layout, connector)}") from exc
        tensor = obj.tensor
        assert tensor is not None
        if written and layers[0].dtype == model_dtype:  # (a quantized cache rounds)
            _check_kv_placement(tensor, written, layers, layout, connector)
        try:
            connector.to_gpu(obj, 0, bs, kvcaches=layers, slot_mapping=dst_slots)
        except Exception as exc:
            raise LayoutMismatch(f"lmcache's connector could not write block {dst} "
                                 f"({type(exc).__name__}: {exc}): "
                                 f"{_describe(layers, layout, connector)}") from exc
        for i, layer in enumerate(layers):
            a, b = layout.page(layer, src), layout.page(layer, dst)
            if not torch.equal(a.contiguous().view(torch.uint8),
                               b.contiguous().view(torch.uint8)):
                raise LayoutMismatch(
                    f"block {src} copied out by lmcache and back into block {dst} is not "
                    f"the same in layer {i}: {_describe(layers, layout, connector)}")
    finally:
        obj.ref_count_down()


def _check_kv_placement(tensor: torch.Tensor,
                        written: list[tuple[torch.Tensor, torch.Tensor]],
                        layers: list[torch.Tensor], layout: CacheLayout,
                        connector: GPUConnectorInterface) -> None:
    """A per-token memory object (``[2, layers, tokens, hidden]``) must hold what vLLM
    wrote: K of layer l, token t at ``[0, l, t]``, V at ``[1, l, t]``."""
    bs = layout.block_size
    expected_shape = (2, len(layers), bs, layout.num_kv_heads * layout.head_size)
    if tuple(tensor.shape) != expected_shape:
        return  # a layout of its own (a third party's connector): the round trip decides
    for i, (key, value) in enumerate(written):
        for which, (name, data) in enumerate((("K", key), ("V", value))):
            got = tensor[which, i].to(data.device)
            if not torch.equal(got, data.reshape(bs, -1).to(got.dtype)):
                swapped = torch.equal(tensor[1 - which, i].to(data.device),
                                      data.reshape(bs, -1).to(got.dtype))
                raise LayoutMismatch(
                    f"layer {i}: the {name} that vLLM wrote is not where lmcache's connector "
                    f"reads {name}{' (K and V are swapped)' if swapped else ''}: "
                    f"{_describe(layers, layout, connector)}")


def describe_writer_fallback(layout: CacheLayout, device: torch.device) -> str:
    return (f"lmcache: vLLM's KV cache writer for the {layout.name} layout on {device} was "
            "not found; the layout check moved a page through the connector but could not "
            "verify where vLLM puts K and V")


def run(connector: GPUConnectorInterface, layers: list[torch.Tensor], layout: CacheLayout,
        *, model_dtype: torch.dtype, cache_dtype: str) -> None:
    """The check as the adapter runs it (vLLM's writer when there is one)."""
    writer = vllm_writer(layout, model_dtype, cache_dtype, layers[0].device)
    try:
        with torch.no_grad():
            verified = check_layout(connector, layers, layout, model_dtype=model_dtype,
                                    writer=writer)
    except LayoutMismatch as exc:
        raise LayoutMismatch(f"lmcache refuses vLLM's KV cache: its layout is not the one "
                             f"lmcache reads and writes, so loaded chunks would be wrong KV "
                             f"({exc}); set gpu_connector to one for this layout, or "
                             "report it with this message") from exc
    if not verified:
        logger.warning(describe_writer_fallback(layout, layers[0].device))
    else:
        logger.info("lmcache: KV cache layout checked against vLLM's cache writer (%s "
                    "layout, %d layers)", layout.name, len(layers))
