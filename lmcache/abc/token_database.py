"""The token database contract: how a token sequence becomes a list of chunk keys.

Who calls what
    The engine calls `TokenDatabase.process_tokens` once per ``store``, ``retrieve``,
    ``lookup`` and ``prefetch``, on the caller's thread (the serving engine's, or the
    vLLM scheduler's lookup channel): it must be fast, thread-safe and free of I/O.

Optional capability
    A database that keeps tenants apart by a per-request salt implements
    `SupportsCacheSalt`; the engine passes ``cache_salt`` only to such a database, and
    refuses a salted request otherwise.

lmcache's chained-hash database (``chunked``) is in `lmcache.builtin.token_databases`;
mask and token checks to reuse are in `lmcache.kits.tokens`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from lmcache.utils import CacheEngineKey

if TYPE_CHECKING:
    from lmcache.kernel.config import LMCacheEngineConfig
    from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["SupportsCacheSalt", "TokenDatabase", "supports_cache_salt"]


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
                     metadata: LMCacheEngineMetadata) -> TokenDatabase:
        """Build the database from its validated plugin options (plugin protocol)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options()")



@runtime_checkable
class SupportsCacheSalt(Protocol):
    """A token database whose keys can be salted per request.

    ``process_tokens(tokens, mask, cache_salt=salt)`` returns keys that depend on
    ``salt`` as well: two different salts never share a key, and ``cache_salt=None``
    gives the unsalted keys. Declare the capability with ``accepts_cache_salt = True``
    (a class attribute) and accept the keyword.
    """

    accepts_cache_salt: bool

    def process_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                       cache_salt: str | None = None
                       ) -> Iterable[tuple[int, int, CacheEngineKey]]: ...


def supports_cache_salt(token_database: object) -> bool:
    """Whether ``token_database`` takes a per-request ``cache_salt``."""
    return isinstance(token_database, SupportsCacheSalt) and \
        token_database.accepts_cache_salt is True
