"""LMCache v1's ``lmcache.v1.storage_backend.object_format``: the same face as
`lmcache.experimental.storage_backend.object_format`, under the name later releases use."""

from lmcache.experimental.storage_backend.object_format import *  # noqa: F403
from lmcache.experimental.storage_backend.object_format import __all__  # noqa: F401
