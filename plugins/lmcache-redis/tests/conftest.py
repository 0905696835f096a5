"""Real servers for the redis tier's tests (lmcache.testing starts them on loopback)."""

from lmcache.testing.fixtures import redis_cluster, redis_server  # noqa: F401
