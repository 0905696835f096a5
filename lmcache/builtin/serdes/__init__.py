"""lmcache's serdes (group ``lmcache.serdes``): ``naive`` (`naive`) and ``zstd`` (`zstd`)."""
