"""What code written against upstream LMCache relies on: the import paths of both eras,
the seed's constructor spellings, and allocator misuse that the seed tolerated."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest
import torch

import lmcache.experimental
import lmcache.v1
from lmcache.experimental.cache_engine import LMCacheEngineBuilder
from lmcache.experimental.config import ConfigError, LMCacheEngineConfig
from lmcache.experimental.memory_management import (
    HostMemoryAllocator,
    MixedMemoryAllocator,
    PinMemoryAllocator,
    TensorMemoryAllocator,
)
from lmcache.integration.vllm import utils as vllm_utils


def _modules(package) -> list[str]:
    return sorted(m.name[len(package.__name__) + 1:] for m in
                  pkgutil.walk_packages(package.__path__, package.__name__ + "."))


def test_v1_paths_are_the_experimental_faces():
    faces = set(_modules(lmcache.experimental)) - {"server"}
    assert faces <= set(_modules(lmcache.v1)), "a face of lmcache.experimental is missing"
    for name in sorted(faces):
        old = importlib.import_module(f"lmcache.experimental.{name}")
        new = importlib.import_module(f"lmcache.v1.{name}")
        assert getattr(new, "__all__", None) == getattr(old, "__all__", None), name
        for attr in getattr(old, "__all__", ()):
            assert getattr(new, attr) is getattr(old, attr), (name, attr)


def test_lmcache_config_holds_metadata_and_config():
    from lmcache.config import LMCacheEngineConfig as Config
    from lmcache.config import LMCacheEngineMetadata
    from lmcache.experimental.config import LMCacheEngineMetadata as Metadata

    assert Config is LMCacheEngineConfig and LMCacheEngineMetadata is Metadata


@pytest.mark.parametrize("spelling", [False, None])
def test_from_defaults_local_disk_false_means_no_disk_tier(spelling):
    config = LMCacheEngineConfig.from_defaults(local_cpu=True, max_local_cpu_size=5,
                                               local_disk=spelling, remote_url=None,
                                               lookup_url=None, distributed_url=None)
    assert config.local_disk is None
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu"]
    assert LMCacheEngineConfig(local_disk=False) == LMCacheEngineConfig()
    with pytest.raises(ConfigError, match="local_disk"):
        LMCacheEngineConfig(local_disk=True)  # True names no directory


def test_vllm_utils_engine_name_and_config(monkeypatch, tmp_path):
    assert vllm_utils.ENGINE_NAME == "vllm-instance"
    assert vllm_utils.lmcache_get_config is vllm_utils.lmcache_get_or_create_config
    monkeypatch.setattr(vllm_utils, "_config", None)
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "64")
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    config = vllm_utils.lmcache_get_or_create_config()
    assert config.chunk_size == 64
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "128")
    assert vllm_utils.lmcache_get_config() is config  # read once per process
    assert all(vllm_utils.is_false(v) for v in ("False", "0", " no ", "OFF", "n"))
    assert not any(vllm_utils.is_false(v) for v in ("True", "1", "yes", ""))


def test_destroy_engine_name_where_no_engine_was_made_is_a_no_op():
    assert LMCacheEngineBuilder.get(vllm_utils.ENGINE_NAME) is None
    LMCacheEngineBuilder.destroy(vllm_utils.ENGINE_NAME)
    with pytest.raises(KeyError, match="no LMCache engine"):
        LMCacheEngineBuilder.add_alias(vllm_utils.ENGINE_NAME, "nothing-here")


# -- allocators: the seed's memcheck, second free and freed tensor ------------------------


def _allocators():
    return [
        pytest.param(lambda: TensorMemoryAllocator(torch.zeros(1 << 22, dtype=torch.uint8)),
                     id="tensor"),
        pytest.param(lambda: HostMemoryAllocator(1 << 22), id="host"),
        pytest.param(lambda: PinMemoryAllocator(1 << 22), id="pinned"),
        pytest.param(lambda: MixedMemoryAllocator(1 << 22), id="mixed"),
    ]


@pytest.mark.filterwarnings("ignore::lmcache.experimental.memory_management."
                            "PinnedMemoryUnavailableWarning")
@pytest.mark.parametrize("make", _allocators())
def test_seed_allocator_misuse_neither_crashes_nor_corrupts(make, caplog):
    allocator = make()
    a = allocator.allocate([256, 256], torch.float)
    b = allocator.allocate([64, 64], torch.bfloat16)
    assert allocator.memcheck()
    allocator.free(a)
    with caplog.at_level(logging.DEBUG, logger="lmcache.kits.memory"):
        assert a.tensor is None
        allocator.free(a)  # the seed: "This should not crash"
    assert "already freed" in caplog.text and allocator.memcheck()
    c = allocator.allocate([256, 256], torch.float)  # a's memory, handed out again
    c.tensor.fill_(3.0)
    allocator.free(a)
    assert torch.all(c.tensor == 3.0) and allocator.memcheck()
    for obj in (b, c):
        allocator.free(obj)
    assert allocator.memcheck() and allocator.total_allocated_size == 0


def test_memcheck_reports_a_broken_free_list(caplog):
    allocator = TensorMemoryAllocator(torch.zeros(1 << 16, dtype=torch.uint8))
    obj = allocator.allocate([16], torch.uint8)
    assert allocator.memcheck()
    allocator._free_blocks[0].start -= 512  # now overlaps the live object
    with caplog.at_level(logging.ERROR, logger="lmcache.kits.memory"):
        assert not allocator.memcheck()
    assert "overlaps" in caplog.text
    allocator._free_blocks[0].start += 512
    assert allocator.memcheck()
    obj.ref_count_down()
