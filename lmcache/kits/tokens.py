"""The token kit: the checks every token database applies to its input.

`as_token_array` turns any token input into the contiguous little-endian int32 array
whose bytes a database hashes; `check_mask` validates the ``FFF…TTT`` mask of the seed's
API. A third-party database that uses both refuses exactly what lmcache's own does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["TokenInput", "as_token_array", "check_mask"]

TokenInput = torch.Tensor | Sequence[int] | np.ndarray

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def as_token_array(tokens: TokenInput) -> np.ndarray:
    """The tokens as a contiguous little-endian int32 array: the bytes that get hashed.

    Accepts a 1-D integer tensor (any device), a sequence of ints or a 1-D NumPy array.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        arr = tokens.detach().cpu().numpy()
    else:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<i4"):
        if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
            raise ValueError("token ids must fit in int32")
        arr = arr.astype("<i4")
    return np.ascontiguousarray(arr)


def check_mask(mask: torch.Tensor | None, num_tokens: int, chunk_size: int) -> int:
    """Validate a ``FFF…TTT`` mask and return its number of leading ``False`` entries."""
    if mask is None:
        return 0
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dim() != 1 or mask.shape[0] != num_tokens:
        raise ValueError(
            f"mask must be 1-D with one entry per token ({num_tokens}), "
            f"got shape {tuple(mask.shape)}")
    m = mask.detach().cpu()
    if m.dtype != torch.bool:
        # upstream's callers pass 0/1 masks of other dtypes: those are unambiguous; any
        # other value (2, 0.5, NaN) is not coerced
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"mask must be a bool tensor (or hold only 0 and 1), got "
                             f"dtype {mask.dtype} with other values")
        m = m != 0
    num_false = num_tokens - int(m.sum())
    if not (bool(m[num_false:].all()) and not bool(m[:num_false].any())):
        raise ValueError("mask must look like FFF...TTT: the False entries form a prefix")
    if num_false % chunk_size != 0:
        raise ValueError(
            f"the number of False entries in the mask ({num_false}) must be a multiple of "
            f"the chunk size ({chunk_size})")
    return num_false

