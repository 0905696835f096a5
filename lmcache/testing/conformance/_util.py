"""Helpers shared by the conformance classes."""

from __future__ import annotations

import uuid
from typing import Any

import torch

from lmcache.abc.memory import (
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
)
from lmcache.utils import CacheEngineKey

#: (shape, dtype) pairs every round-trip test covers: KV of several dtypes and sizes.
ROUND_TRIP_CASES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((2, 2, 16, 64), torch.float16),
    ((2, 2, 16, 64), torch.bfloat16),
    ((2, 1, 7, 33), torch.float32),
    ((2, 3, 5, 8), torch.int8),
    ((2, 4, 32, 128), torch.uint8),
]


def case_id(case: tuple[tuple[int, ...], torch.dtype]) -> str:
    shape, dtype = case
    return f"{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"


def new_key(model: str = "conformance/model") -> CacheEngineKey:
    """A key no other test uses (fresh random chunk hash)."""
    return CacheEngineKey("vllm", model, 1, 0, uuid.uuid4().hex + uuid.uuid4().hex)


def fill_random(tensor: torch.Tensor, seed: int) -> None:
    """Fill ``tensor`` with random bits (every bit pattern, NaNs included, for floats)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (tensor.numel() * tensor.element_size(),),
                        dtype=torch.uint8, generator=g)
    tensor.view(-1).view(torch.uint8).copy_(raw.to(tensor.device))


def make_chunk(allocator: MemoryAllocatorInterface, seed: int,
               shape: tuple[int, ...] = (2, 2, 16, 64), dtype: torch.dtype = torch.float16,
               fmt: MemoryFormat = MemoryFormat.KV_BLOB) -> MemoryObj:
    """A memory object from ``allocator`` filled with random bits (caller owns it)."""
    obj = allocator.allocate(shape, dtype, fmt)
    assert obj is not None, f"the allocator could not allocate {shape} {dtype}"
    fill_random(obj.tensor, seed)
    return obj


def snapshot(obj: MemoryObj) -> tuple[Any, ...]:
    """What must survive a round trip: shape, dtype, format and every payload byte."""
    return (tuple(obj.get_shape()), obj.get_dtype(), obj.get_memory_format(),
            bytes(obj.byte_array))


def assert_same(got: MemoryObj | None, want: tuple[Any, ...], what: str = "") -> None:
    assert got is not None, f"{what}: expected the stored chunk, got a miss"
    have = snapshot(got)
    assert have[:3] == want[:3], f"{what}: (shape, dtype, format) {have[:3]} != {want[:3]}"
    assert have[3] == want[3], f"{what}: payload bytes differ from what was stored"
