"""The example backend against lmcache's conformance kit: the contract every storage
backend meets. Keep this file when you copy the template; adapt the factory."""

from __future__ import annotations

import pytest

from lmcache.testing.conformance import StorageBackendConformance
from lmcache.testing.conformance.storage_backend import CHUNK_BYTES
from lmcache_example.backend import InMemoryBackend


class TestInMemoryBackend(StorageBackendConformance):
    # Capabilities this backend has (see the class docstring of the kit):
    has_budget = True  # max_entries evicts least recently used chunks

    @pytest.fixture
    def backend_factory(self, allocator):
        def make(budget_bytes=None):
            if budget_bytes is None:
                return InMemoryBackend(allocator)
            return InMemoryBackend(allocator, max_entries=max(1, budget_bytes // CHUNK_BYTES))

        return make
