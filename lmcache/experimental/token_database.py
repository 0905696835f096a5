"""Token databases: how a token sequence becomes a list of chunk keys."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmcache.plugin.options import PluginOptions
from lmcache.utils import CacheEngineKey

if TYPE_CHECKING:
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata

TokenInput = torch.Tensor | Sequence[int] | np.ndarray

HASH_ALGORITHMS = ("sha256", "sha512", "blake2b", "sha3_256")
_CHAIN_DOMAIN = b"lmcache/chunked-prefix/v1\x00"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class TokenDatabase(ABC):
    """Turns input tokens into a list of cache engine keys.

    There are several ways to do this: `ChunkedTokenDatabase` cuts the tokens
    into fixed-size chunks and names each chunk by a hash of the whole prefix up to and
    including it; a radix-tree database could name variable-length spans instead.

    Implementations are plugins (group ``lmcache.token_databases``) and must:

    - return keys that depend only on the tokens, the salt and the engine metadata —
      identical across processes, machines and ``PYTHONHASHSEED`` values, so a cache
      written by one process is found by another;
    - make a key depend on the *whole* prefix, so that two prompts share a key only
      when they share everything before and inside that chunk;
    - validate the mask as documented in `process_tokens` and raise
      ``ValueError`` naming what was expected.
    """

    @abstractmethod
    def process_tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> Iterable[tuple[int, int, CacheEngineKey]]:
        """Process the tokens and return the corresponding cache engine keys.

        :param tokens: the tokens to process, a 1-D CPU tensor of integer token ids.
        :param mask: the mask for the tokens, the same length as ``tokens``. It is
            always like ``FFFFFTTTTTTT``: ``True`` marks the tokens that need to be
            matched, and the ``False`` entries are always a prefix.
        :returns: an iterable of ``(start, end, key)``: the start and end index of the
            tokens the key covers, and the cache engine key of those tokens.
        :raises ValueError: if the number of ``False`` entries in the mask is not a
            multiple of the chunk size, or the mask is not of the documented form.
        """

    @classmethod
    def from_options(cls, options: Any, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> TokenDatabase:
        """Build the database from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")


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
    m = mask.detach().cpu().to(torch.bool)
    num_false = num_tokens - int(m.sum())
    if not (bool(m[num_false:].all()) and not bool(m[:num_false].any())):
        raise ValueError("mask must look like FFF...TTT: the False entries form a prefix")
    if num_false % chunk_size != 0:
        raise ValueError(
            f"the number of False entries in the mask ({num_false}) must be a multiple of "
            f"the chunk size ({chunk_size})")
    return num_false


class ChunkedTokenDatabase(TokenDatabase):
    """Fixed-size chunks named by a chained hash of the whole prefix.

    For chunk ``i`` covering tokens ``[i*chunk_size, (i+1)*chunk_size)`` (the last
    chunk may be shorter) the hash is ``h_i = H(h_{i-1} ‖ bytes(tokens_i))`` with
    ``h_{-1} = H(domain ‖ salt)``, where ``bytes`` is the little-endian int32 encoding
    and ``H`` is a cryptographic hash (sha256 by default). A salt (per engine from the
    options, or per request) separates tenants: different salts never share a key.
    Chunks hidden by the mask still feed the chain, so a chunk's key does not depend
    on the mask.
    """

    class Options(PluginOptions):
        hash: Literal["sha256", "sha512", "blake2b", "sha3_256"] = Field(
            "sha256", description="Hash function of the prefix chain.")
        salt: str | None = Field(
            None, description="Engine-wide cache salt: engines with different salts never "
            "share chunks (per-request salts add to it).")

    def __init__(self, config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata,
                 hash_name: str = "sha256", salt: str | None = None):
        if hash_name not in HASH_ALGORITHMS:
            raise ValueError(f"hash must be one of {HASH_ALGORITHMS}, got {hash_name!r}")
        self.chunk_size = int(config.chunk_size)
        self.metadata = metadata
        self.hash_name = hash_name
        self.salt = salt
        self._new_hash = getattr(hashlib, hash_name)

    @classmethod
    def from_options(cls, options: Options, config: LMCacheEngineConfig,
                     metadata: LMCacheEngineMetadata, **context: Any) -> ChunkedTokenDatabase:
        return cls(config, metadata, hash_name=options.hash, salt=options.salt)

    def _seed(self, cache_salt: str | None) -> bytes:
        h = self._new_hash(_CHAIN_DOMAIN)
        for part in (self.salt, cache_salt):
            data = b"" if part is None else part.encode("utf-8")
            # length-prefixed, so ("ab", None) and ("a", "b") differ
            h.update(len(data).to_bytes(8, "little") + data if part is not None else b"\xff")
        return h.digest()

    def prefix_hashes(self, tokens: TokenInput, cache_salt: str | None = None) -> list[str]:
        """Hex hash of every chunk of ``tokens``, the last partial chunk included."""
        arr = as_token_array(tokens)
        view = memoryview(arr).cast("B")
        step = self.chunk_size * 4
        prev = self._seed(cache_salt)
        out = []
        new = self._new_hash
        for offset in range(0, len(view), step):
            h = new(prev)
            h.update(view[offset:offset + step])
            prev = h.digest()
            out.append(prev.hex())
        return out

    def make_key(self, chunk_hash: str) -> CacheEngineKey:
        m = self.metadata
        return CacheEngineKey(m.fmt, m.model_name, m.world_size, m.worker_id, chunk_hash)

    def process_tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
        cache_salt: str | None = None,
    ) -> Iterable[tuple[int, int, CacheEngineKey]]:
        arr = as_token_array(tokens)
        n = int(arr.shape[0])
        num_false = check_mask(mask, n, self.chunk_size)
        hashes = self.prefix_hashes(arr, cache_salt)
        out = []
        for i, chunk_hash in enumerate(hashes):
            start = i * self.chunk_size
            if start < num_false:
                continue
            out.append((start, min(start + self.chunk_size, n), self.make_key(chunk_hash)))
        return out
