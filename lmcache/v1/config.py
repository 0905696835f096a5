"""LMCache v1's ``lmcache.v1.config``: the same face as
`lmcache.experimental.config`, under the name later releases use."""

from lmcache.experimental.config import *  # noqa: F403
from lmcache.experimental.config import __all__  # noqa: F401
