"""GPU connectors: move KV between the serving engine's cache and memory objects."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.memory_management import MemoryObj


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
