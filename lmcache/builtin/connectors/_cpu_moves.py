"""Moves of paged KV on the CPU at memory speed, shared by the paged connectors.

torch's ``index_copy_`` on the CPU moves one element at a time (~1/3 of memcpy speed);
these helpers move whole token rows or whole pages as opaque items instead, with the
compiled row kernels of `lmcache.ops` when they are built and NumPy otherwise.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmcache.kits.checksum import MASK64
from lmcache.ops import cpu_ops

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj

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


def scatter_rows_cpu(pairs: list[tuple[torch.Tensor, torch.Tensor]],
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


def block_size_of(kvcaches: Any) -> int:
    layer = kvcaches[0]
    return int(layer.shape[2] if isinstance(layer, torch.Tensor) else layer[0].shape[1])


def whole_blocks(slots: torch.Tensor, block_size: int) -> torch.Tensor | None:
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


def kv_block_pairs(flat: list[Any], mem: torch.Tensor, block_size: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    hidden = mem.shape[-1]
    pairs = []
    for layer, mem_k, mem_v in zip(flat, mem[0].unbind(0), mem[1].unbind(0)):
        k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
        for cache, part in ((k, mem_k), (v, mem_v)):
            pairs.append((cache.view(-1, block_size * hidden),
                          part.view(-1, block_size * hidden)))
    return pairs


def gather_blocks_cpu(flat: list[Any], slots: torch.Tensor, dst: torch.Tensor,
                       block_size: int) -> bool:
    blocks = whole_blocks(slots, block_size)
    if blocks is None:
        return False
    for cache, part in kv_block_pairs(flat, dst, block_size):
        torch.index_select(cache, 0, blocks, out=part)
    return True


def scatter_blocks_cpu(flat: list[Any], slots: torch.Tensor, src: torch.Tensor,
                        block_size: int) -> bool:
    blocks = whole_blocks(slots, block_size)
    if blocks is None:
        return False
    scatter_rows_cpu(kv_block_pairs(flat, src, block_size), blocks)
    return True


# -- native CPU kernels (lmcache.ops) -------------------------------------------------------

#: Below this many bytes per chunk, ordinary stores beat non-temporal ones.
STREAM_MIN_BYTES = 1 << 20


def cpu_kernel_move(flat: list[Any], slots: torch.Tensor, mem: torch.Tensor,
                     block_size: int, *, to_cache: bool,
                     memory_obj: MemoryObj | None = None) -> bool:
    """Move a chunk with the compiled row-copy kernels; False when they are not built.

    Whole pages move as one row each, otherwise one row per token; slots of -1 are
    skipped by the scatter (the gather never sees them: `_chunk_slots` refuses them).
    A gather leaves the payload's checksum in ``memory_obj`` (`gather_with_checksum`).
    """
    ops = cpu_ops()
    if ops is None:
        return False
    blocks = whole_blocks(slots, block_size)
    if blocks is not None:
        pairs, index = kv_block_pairs(flat, mem, block_size), blocks
    else:
        pairs, index = [], slots
        for layer, mem_k, mem_v in zip(flat, mem[0].unbind(0), mem[1].unbind(0)):
            k, v = layer.unbind(0) if isinstance(layer, torch.Tensor) else layer
            pairs += [(k, mem_k), (v, mem_v)]
    stream = mem.numel() * mem.element_size() >= STREAM_MIN_BYTES
    if to_cache:
        ops.scatter_rows([c for c, _ in pairs], [m for _, m in pairs], index.contiguous(),
                         stream)
    else:
        gather_with_checksum(ops, [c for c, _ in pairs], [m for _, m in pairs],
                             index.contiguous(), stream, mem, memory_obj)
    return True


def gather_with_checksum(ops: Any, paged: list[torch.Tensor], dense: list[torch.Tensor],
                          index: torch.Tensor, stream: bool, mem: torch.Tensor,
                          memory_obj: MemoryObj | None) -> None:
    """The row kernel's gather of ``paged`` rows into ``dense`` parts of ``mem`` (the
    memory object's whole payload), and the payload's ``sum64`` checksum computed from
    the rows on the way when ``memory_obj.metadata.want_checksum`` asks for it, kept in
    ``memory_obj.metadata.payload_checksum`` (None when not asked, or when the rows are
    not whole 8-byte words)."""
    nbytes = mem.numel() * mem.element_size()
    wanted = memory_obj is not None and getattr(
        memory_obj.metadata, "want_checksum", None) == "sum64"
    whole_words = wanted and nbytes % 8 == 0 and all(
        (d.shape[-1] * d.element_size()) % 8 == 0 for d in dense)
    a, b = ops.gather_rows(paged, dense, index, stream,
                           mem.data_ptr() if whole_words else -1)
    if memory_obj is not None:
        memory_obj.metadata.payload_checksum = (
            ("sum64", (a + 2 * b) & MASK64) if whole_words else None)

