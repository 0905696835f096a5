"""LMCache v1's ``lmcache.v1.storage_backend.serde``: the same face as
`lmcache.experimental.storage_backend.serde`, under the name later releases use."""

from lmcache.experimental.storage_backend.serde import *  # noqa: F403
from lmcache.experimental.storage_backend.serde import __all__  # noqa: F401
