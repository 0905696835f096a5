"""Engine metadata: what model and which worker an engine serves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache.utils import CacheEngineKey

__all__ = ["LMCacheEngineMetadata"]


@dataclass
class LMCacheEngineMetadata:
    """What model and which worker an engine serves; part of every chunk's key.

    ``kv_shape`` is ``(num_layers, 2, chunk_size, num_kv_heads, head_size)``.
    """

    model_name: str
    world_size: int
    worker_id: int
    fmt: str
    kv_dtype: torch.dtype
    kv_shape: tuple[int, int, int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if not isinstance(self.world_size, int) or isinstance(self.world_size, bool) \
                or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        # Any int, as in the seed (whose own tests use -1, and 123 with world_size 3): it
        # only names the worker in chunk keys, so it cannot make KV wrong.
        if not isinstance(self.worker_id, int) or isinstance(self.worker_id, bool):
            raise ValueError(f"worker_id must be an int, got {self.worker_id!r}")
        # these fields end up in every chunk key: refuse what cannot make a key now
        CacheEngineKey(self.fmt, self.model_name, self.world_size, self.worker_id, "0" * 64)
        if not isinstance(self.kv_dtype, torch.dtype):
            raise ValueError(f"kv_dtype must be a torch.dtype, got {self.kv_dtype!r}")
        shape = tuple(self.kv_shape)
        if len(shape) != 5 or not all(isinstance(d, int) and d > 0 for d in shape) \
                or shape[1] not in (1, 2):
            raise ValueError(
                "kv_shape must be (num_layers, 2, chunk_size, num_kv_heads, head_size) "
                "(or, for MLA, (num_layers, 1, chunk_size, 1, latent_size)) of "
                f"positive ints, got {self.kv_shape!r}")
        self.kv_shape = shape  # type: ignore[assignment]
