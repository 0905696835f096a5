"""LMCache v1's ``lmcache.v1.storage_backend.abstract_backend``: the same face as
`lmcache.experimental.storage_backend.abstract_backend`, under the name later releases use."""

from lmcache.experimental.storage_backend.abstract_backend import *  # noqa: F403
from lmcache.experimental.storage_backend.abstract_backend import __all__  # noqa: F401
