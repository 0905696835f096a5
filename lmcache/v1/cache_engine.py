"""LMCache v1's ``lmcache.v1.cache_engine``: the same face as
`lmcache.experimental.cache_engine`, under the name later releases use."""

from lmcache.experimental.cache_engine import *  # noqa: F403
from lmcache.experimental.cache_engine import __all__  # noqa: F401
