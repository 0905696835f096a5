"""LMCache v1's ``lmcache.v1.token_database``: the same face as
`lmcache.experimental.token_database`, under the name later releases use."""

from lmcache.experimental.token_database import *  # noqa: F403
from lmcache.experimental.token_database import __all__  # noqa: F401
