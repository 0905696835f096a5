"""``chunked``: fixed-size chunks named by a chained hash of the whole prefix."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from lmcache.abc.token_database import TokenDatabase
from lmcache.kits.tokens import TokenInput, as_token_array, check_mask
from lmcache.plugin.options import PluginOptions
from lmcache.utils import CacheEngineKey

if TYPE_CHECKING:
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["HASH_ALGORITHMS", "ChunkedTokenDatabase"]

HASH_ALGORITHMS = ("sha256", "sha512", "blake2b", "sha3_256")
_CHAIN_DOMAIN = b"lmcache/chunked-prefix/v1\x00"


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

    #: Per-request salts are supported (`lmcache.abc.token_database.SupportsCacheSalt`).
    accepts_cache_salt = True

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
                     metadata: LMCacheEngineMetadata) -> ChunkedTokenDatabase:
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
