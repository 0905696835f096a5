"""Helpers to make serving-engine KV caches for tests: paged and per-request layouts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Geometry:
    num_layers: int = 2
    num_heads: int = 2
    head_size: int = 16
    block_size: int = 16
    num_blocks: int = 24
    dtype: torch.dtype = torch.bfloat16

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_size

    def kv_shape(self, chunk_size: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, chunk_size, self.num_heads, self.head_size)


def random_values(shape, dtype, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def paged_cache(g: Geometry, seed: int = 0, stacked: bool = True, zero: bool = False):
    """vLLM's flash-attention layout: per layer [2, num_blocks, block_size, heads, head]
    (``stacked``) or a (K, V) pair of [num_blocks, block_size, heads, head]."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(g.num_layers):
        shape = (2, g.num_blocks, g.block_size, g.num_heads, g.head_size)
        t = torch.zeros(shape, dtype=g.dtype) if zero else random_values(shape, g.dtype, gen)
        layers.append(t if stacked else (t[0].clone(), t[1].clone()))
    return layers


def slot_mapping(g: Geometry, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """A shuffled full slot mapping: token i lives in slot perm[i]."""
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(g.num_blocks * g.block_size, generator=gen)
    return perm[:num_tokens].to(torch.long)


def slots_of(layer, slots: torch.Tensor) -> torch.Tensor:
    """The K and V values at ``slots`` of one paged layer, as [2, n, heads, head]."""
    if isinstance(layer, torch.Tensor):
        k, v = layer[0], layer[1]
    else:
        k, v = layer
    flat_k = k.reshape(-1, *k.shape[2:])
    flat_v = v.reshape(-1, *v.shape[2:])
    return torch.stack([flat_k[slots], flat_v[slots]])


def nested_cache(g: Geometry, num_tokens: int, seed: int = 0, zero: bool = False):
    """Per-request layout: per layer a (K, V) pair of [num_tokens, heads, head]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, g.num_heads, g.head_size)
    return [tuple(torch.zeros(shape, dtype=g.dtype) if zero else
                  random_values(shape, g.dtype, gen) for _ in range(2))
            for _ in range(g.num_layers)]


def wait_until(condition, within: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``within`` seconds pass (False)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
