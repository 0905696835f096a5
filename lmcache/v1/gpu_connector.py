"""LMCache v1's ``lmcache.v1.gpu_connector``: the same face as
`lmcache.experimental.gpu_connector`, under the name later releases use."""

from lmcache.experimental.gpu_connector import *  # noqa: F403
from lmcache.experimental.gpu_connector import __all__  # noqa: F401
