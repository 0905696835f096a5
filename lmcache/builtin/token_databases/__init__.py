"""lmcache's token databases (group ``lmcache.token_databases``): ``chunked``."""
