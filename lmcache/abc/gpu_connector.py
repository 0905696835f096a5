"""The GPU connector contract: how KV moves between the serving engine and chunks.

Who calls what
    The engine calls `GPUConnectorInterface.get_shape` to size the memory object of a
    chunk, then `from_gpu` (store) or `to_gpu` (retrieve) once per chunk, on the serving
    engine's thread, with the keyword arguments the serving engine gave ``store`` or
    ``retrieve`` (``kvcaches``, ``slot_mapping``, ...). A connector keeps no per-request
    state between calls; it may keep reusable buffers (behind its own lock).

lmcache's connectors for vLLM's layouts are in `lmcache.builtin.connectors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["ConnectorContext", "GPUConnectorInterface"]


@dataclass(frozen=True)
class ConnectorContext:
    """What the caller that builds a connector knows beyond the configuration.

    ``device`` is the device of the serving engine's KV cache when the caller knows it
    at construction (a connector may allocate reusable buffers there up front); ``None``
    lets the connector find out from its first call.
    """

    device: str | torch.device | None = None


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
        ``memory_obj``. Sub-classes define the format of the kwargs.

        Called once per chunk of a ``store``, on the serving engine's thread, after the
        engine computed the KV. When it returns, ``memory_obj`` holds the chunk (a copy
        to host memory is complete) and the connector keeps no reference to the
        serving engine's tensors.
        """

    @abstractmethod
    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Copy ``memory_obj`` into the serving engine's KV at tokens ``[start, end)``.
        Sub-classes define the format of the kwargs.

        Called once per chunk of a ``retrieve``, on the serving engine's thread, before
        the engine's forward pass. The caller releases ``memory_obj`` when it returns,
        so no copy out of it may still be pending on the host side.
        """

    def check_kwargs(self, num_tokens: int, **kwargs: Any) -> None:  # noqa: B027
        """Check the keyword arguments of a ``store`` or ``retrieve`` of ``num_tokens``
        tokens before any chunk moves: an unknown keyword, or a missing or malformed
        tensor, is a ``ValueError`` here -- also when no chunk will be copied (a retrieve
        that misses). Called once per call, on the serving engine's thread. The default
        accepts anything."""

    @abstractmethod
    def get_shape(self, num_tokens: int) -> torch.Size:
        """The shape of the memory object that holds ``num_tokens`` tokens."""

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata,
                     context: ConnectorContext | None = None) -> GPUConnectorInterface:
        """Build the connector from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")

