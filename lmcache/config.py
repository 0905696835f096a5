"""The seed's ``lmcache.config``, where code of the experimental era imports
`LMCacheEngineMetadata` from (and `LMCacheEngineConfig`, which is the one of
`lmcache.experimental.config`: the pre-experimental configuration, with fields such as
``local_device``, is not part of this lmcache)."""

from lmcache.kernel.config import LMCacheEngineConfig
from lmcache.kernel.metadata import LMCacheEngineMetadata

__all__ = ["LMCacheEngineConfig", "LMCacheEngineMetadata"]
