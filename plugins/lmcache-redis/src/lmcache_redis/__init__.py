"""Redis (standalone, TLS, Cluster) as a remote storage tier of lmcache."""

from lmcache_redis.backend import RedisBackend, RedisTransport, parse_redis_url

__all__ = ["RedisBackend", "RedisTransport", "parse_redis_url"]
