"""The seed's ``lmcache.experimental.token_database``: the contract in
`lmcache.abc.token_database`, the checks in `lmcache.kits.tokens`, ``chunked`` in
`lmcache.builtin.token_databases.chunked`."""

from lmcache.abc.token_database import SupportsCacheSalt, TokenDatabase
from lmcache.builtin.token_databases.chunked import HASH_ALGORITHMS, ChunkedTokenDatabase
from lmcache.kits.tokens import TokenInput, as_token_array, check_mask

__all__ = [
    "HASH_ALGORITHMS",
    "ChunkedTokenDatabase",
    "SupportsCacheSalt",
    "TokenDatabase",
    "TokenInput",
    "as_token_array",
    "check_mask",
]
