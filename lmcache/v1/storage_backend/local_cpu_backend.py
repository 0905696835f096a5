"""LMCache v1's ``lmcache.v1.storage_backend.local_cpu_backend``: the same face as
`lmcache.experimental.storage_backend.local_cpu_backend`, under the name later releases use."""

from lmcache.experimental.storage_backend.local_cpu_backend import *  # noqa: F403
from lmcache.experimental.storage_backend.local_cpu_backend import __all__  # noqa: F401
