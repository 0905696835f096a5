"""LMCache v1's ``lmcache.v1.storage_backend.storage_manager``: the same face as
`lmcache.experimental.storage_backend.storage_manager`, under the name later releases use."""

from lmcache.experimental.storage_backend.storage_manager import *  # noqa: F403
from lmcache.experimental.storage_backend.storage_manager import __all__  # noqa: F401
