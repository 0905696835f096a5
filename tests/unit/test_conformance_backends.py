"""Every first-party storage backend runs the shipped conformance kit
(`lmcache.testing.conformance.StorageBackendConformance`)."""

from __future__ import annotations

import uuid

import pytest

from lmcache.experimental.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.experimental.storage_backend.local_disk_backend import LocalDiskBackend
from lmcache.experimental.storage_backend.remote_backend import FsspecTransport, RemoteBackend
from lmcache.experimental.storage_backend.serde import NaiveSerde, ZstdSerde
from lmcache.testing.conformance import StorageBackendConformance


class TestLocalCPUBackend(StorageBackendConformance):
    has_budget = True
    supports_pinning = True

    @pytest.fixture
    def backend_factory(self, allocator):
        return lambda budget_bytes=None: LocalCPUBackend(budget_bytes)


# --8<-- [start:damage]
def _damage_file(fs, path: str, how: str) -> None:
    if how == "lose":
        fs.rm(path)
        return
    data = bytearray(fs.cat_file(path))
    if how == "corrupt":
        data[-1] ^= 0xFF
        data[len(data) // 2] ^= 0x55
    else:
        data = data[: len(data) - 100]
    with fs.open(path, "wb") as f:
        f.write(bytes(data))
# --8<-- [end:damage]


class _DiskKit(StorageBackendConformance):
    has_budget = True
    persistent = True

    def url(self, tmp_path) -> str:
        raise NotImplementedError

    @pytest.fixture
    def backend_factory(self, allocator, tmp_path):
        url = self.url(tmp_path)

        def make(budget_bytes=None):
            gb = (budget_bytes or (1 << 30)) / 1024**3
            return LocalDiskBackend(url, allocator, gb)

        return make

    # --8<-- [start:disk-helpers]
    def corrupt(self, backend, key):
        _damage_file(backend.fs, backend.key_to_path(key), "corrupt")

    def truncate(self, backend, key):
        _damage_file(backend.fs, backend.key_to_path(key), "truncate")

    def lose(self, backend, key):
        _damage_file(backend.fs, backend.key_to_path(key), "lose")
    # --8<-- [end:disk-helpers]


class TestLocalDiskBackendOnFiles(_DiskKit):
    def url(self, tmp_path) -> str:
        return str(tmp_path / "disk")


class TestLocalDiskBackendOnFileURL(_DiskKit):
    def url(self, tmp_path) -> str:
        return f"file://{tmp_path}/disk"


class TestLocalDiskBackendInMemoryFS(_DiskKit):
    def url(self, tmp_path) -> str:
        return f"memory://lmcache-kit-{uuid.uuid4().hex}"


class _RemoteKit(StorageBackendConformance):
    persistent = True
    serde = NaiveSerde

    def url(self, tmp_path) -> str:
        raise NotImplementedError

    @pytest.fixture
    def backend_factory(self, allocator, tmp_path):
        url = self.url(tmp_path)

        def make(budget_bytes=None):
            return RemoteBackend(FsspecTransport(url, "kit", timeout_s=10), self.serde(),
                                 allocator, timeout_s=10)

        return make

    def _path(self, backend, key) -> tuple[object, str]:
        transport = backend.transport
        return transport.fs, transport.object_name(key.to_string())

    def corrupt(self, backend, key):
        _damage_file(*self._path(backend, key), "corrupt")

    def truncate(self, backend, key):
        _damage_file(*self._path(backend, key), "truncate")

    def lose(self, backend, key):
        _damage_file(*self._path(backend, key), "lose")


class TestRemoteOnMemoryFS(_RemoteKit):
    def url(self, tmp_path) -> str:
        return f"memory://lmcache-kit-{uuid.uuid4().hex}"


class TestRemoteOnFiles(_RemoteKit):
    serde = ZstdSerde

    def url(self, tmp_path) -> str:
        return f"file://{tmp_path}/remote"

