"""Faces of the serdes: the contract (`lmcache.abc.serde`) and ``naive`` and ``zstd``
(`lmcache.builtin.serdes`)."""

from lmcache.abc.serde import Serde
from lmcache.builtin.serdes.naive import NaiveSerde
from lmcache.builtin.serdes.zstd import ZstdSerde

__all__ = ["NaiveSerde", "Serde", "ZstdSerde"]
