"""Checks the connectors share: every input is validated before the first byte moves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmcache.abc.memory import MemoryFormat

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryObj
    from lmcache.kernel.metadata import LMCacheEngineMetadata


KVPair = tuple[torch.Tensor, torch.Tensor]


def version_of(tensor: torch.Tensor) -> int | None:
    """The version counter of ``tensor`` (bumped by every in-place write), or None for
    a tensor that has none (made under ``torch.inference_mode``)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def check_known(kwargs: dict[str, Any], accepted: frozenset[str], owner: object) -> None:
    """Unknown keyword arguments are an error, not silently ignored."""
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{type(owner).__name__} got unexpected keyword arguments "
                         f"{unknown}; expected {sorted(accepted)}")


def check_dims(hidden_dim_size: int, num_layers: int) -> None:
    for name, value in (("hidden_dim_size", hidden_dim_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def dims_from_metadata(metadata: LMCacheEngineMetadata) -> tuple[int, int]:
    """``(hidden_dim, num_layers)`` from ``kv_shape`` =
    ``(num_layers, 2, chunk_size, num_kv_heads, head_size)``."""
    shape = metadata.kv_shape
    return shape[3] * shape[4], shape[0]


def require(kwargs: dict[str, Any], name: str, expected: str) -> Any:
    value = kwargs.get(name)
    if value is None:
        raise ValueError(f"missing keyword argument {name!r}: expected {expected}")
    return value


def kv_layers(kvcaches: Any, num_layers: int) -> Any:
    if isinstance(kvcaches, (str, bytes, Mapping)) or not hasattr(kvcaches, "__len__"):
        raise ValueError(f"kvcaches must be a sequence of {num_layers} layers, got "
                         f"{type(kvcaches).__name__}")
    if len(kvcaches) != num_layers:
        raise ValueError(f"kvcaches has {len(kvcaches)} layers; expected {num_layers} "
                         "(num_layers)")
    return kvcaches


def split_kv(layer: Any, i: int, stacked_ndims: tuple[int, ...]) -> KVPair:
    """A layer's (K, V): a pair of tensors, or one tensor with K and V stacked on dim 0."""
    if isinstance(layer, torch.Tensor):
        if layer.dim() not in stacked_ndims or layer.shape[0] != 2:
            raise ValueError(
                f"kvcaches[{i}] is a tensor of shape {tuple(layer.shape)}; expected a (K, V) "
                f"pair or one {'/'.join(map(str, stacked_ndims))}-D tensor [2, ...] with K "
                "and V stacked on dim 0")
        return layer[0], layer[1]
    if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence) or len(layer) != 2:
        raise ValueError(f"kvcaches[{i}] must be a (K, V) pair of tensors, got "
                         f"{type(layer).__name__}")
    k, v = layer
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise ValueError(f"kvcaches[{i}] must be a (K, V) pair of tensors, got "
                         f"({type(k).__name__}, {type(v).__name__})")
    return k, v


def check_layer(k: torch.Tensor, v: torch.Tensor, i: int, first: torch.Tensor) -> None:
    # K against V, then every layer against layer 0 (whose own shape the caller checked).
    for what, a, b in (("shape", tuple(k.shape), tuple(v.shape)), ("dtype", k.dtype, v.dtype),
                       ("device", k.device, v.device)):
        if a != b:
            raise ValueError(f"kvcaches[{i}]: K has {what} {a} but V has {b}; expected the "
                             f"same {what} for K and V")
    for what, a, b in (("shape", tuple(k.shape), tuple(first.shape)),
                       ("dtype", k.dtype, first.dtype), ("device", k.device, first.device)):
        if a != b:
            raise ValueError(f"kvcaches[{i}] has {what} {a}; expected {b} like kvcaches[0]")


def check_range(start: int, end: int, num_tokens: int, what: str) -> None:
    if not (0 <= start <= end <= num_tokens):
        raise ValueError(f"start/end out of range: got start={start}, end={end}; expected "
                         f"0 <= start <= end <= {num_tokens} ({what})")


def memory_tensor(memory_obj: MemoryObj) -> torch.Tensor:
    tensor = memory_obj.tensor
    if tensor is None:
        # The seed documents an AssertionError; raised explicitly so that -O keeps it.
        raise AssertionError(f"{type(memory_obj).__name__} has no tensor; a KV_BLOB memory "
                             "object needs tensor memory")
    return tensor


def check_memory_tensor(memory_obj: MemoryObj, tensor: torch.Tensor,
                         expected_shape: torch.Size, dtype: torch.dtype,
                         *, filling: bool) -> None:
    fmt = memory_obj.metadata.fmt
    if filling:
        if fmt not in (MemoryFormat.KV_BLOB, MemoryFormat.UNDEFINED):
            raise ValueError(f"memory object has format {fmt.name}; expected KV_BLOB "
                             "(or UNDEFINED, which from_gpu turns into KV_BLOB)")
    elif fmt != MemoryFormat.KV_BLOB:
        raise ValueError(f"memory object has format {fmt.name}; expected KV_BLOB")
    if tensor.dtype != dtype:
        raise ValueError(f"memory object has dtype {tensor.dtype}; expected {dtype}, the "
                         "dtype of the KV cache")
    if tensor.shape != expected_shape:
        raise ValueError(f"memory object has shape {tuple(tensor.shape)}; expected "
                         f"{tuple(expected_shape)} = get_shape(end - start)")
    if not tensor.is_contiguous():
        raise ValueError("memory object tensor is not contiguous; expected a contiguous "
                         "KV_BLOB tensor")

