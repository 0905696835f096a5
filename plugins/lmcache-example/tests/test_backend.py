"""The example backend's own tests: what a plugin author ships beside the code."""

from __future__ import annotations

import torch

from lmcache.experimental.memory_management import HostMemoryAllocator, MemoryFormat
from lmcache.utils import CacheEngineKey
from lmcache_example.backend import InMemoryBackend


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}")


def test_put_get_remove_and_lru():
    allocator = HostMemoryAllocator(1 << 20)
    backend = InMemoryBackend(allocator, max_entries=2)
    for i in range(3):
        obj = allocator.allocate((2, 1, 4, 8), torch.bfloat16, MemoryFormat.KV_BLOB)
        obj.tensor.fill_(i)
        backend.submit_put_task(key(i), obj).result()
        obj.ref_count_down()
    assert not backend.contains(key(0))
    assert backend.get_blocking(key(0)) is None
    got = backend.get_blocking(key(1))
    assert got.get_shape() == torch.Size((2, 1, 4, 8)) and got.get_dtype() == torch.bfloat16
    assert torch.all(got.tensor == 1)
    got.ref_count_down()
    assert backend.remove(key(1)) and not backend.remove(key(1))
    backend.close()
    assert allocator.num_active_allocations == 0


def test_unknown_options_are_refused():
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        InMemoryBackend.Options(max_entries=1, colour="blue")
