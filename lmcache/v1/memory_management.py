"""LMCache v1's ``lmcache.v1.memory_management``: the same face as
`lmcache.experimental.memory_management`, under the name later releases use."""

from lmcache.experimental.memory_management import *  # noqa: F403
from lmcache.experimental.memory_management import __all__  # noqa: F401
