"""Conformance tests for lmcache components, shipped for plugin authors.

Subclass the class for your component's kind in a test module, provide the fixture its
docstring names, and pytest runs the whole contract against your implementation::

    from lmcache.testing.conformance import StorageBackendConformance

    class TestMyBackend(StorageBackendConformance):
        @pytest.fixture
        def backend_factory(self, allocator, tmp_path): ...

The same classes run against every first-party component in lmcache's own test suite.
"""

from lmcache.testing.conformance.allocator import AllocatorConformance
from lmcache.testing.conformance.gpu_connector import GPUConnectorConformance
from lmcache.testing.conformance.serde import SerdeConformance
from lmcache.testing.conformance.storage_backend import StorageBackendConformance
from lmcache.testing.conformance.token_database import TokenDatabaseConformance

__all__ = [
    "AllocatorConformance",
    "GPUConnectorConformance",
    "SerdeConformance",
    "StorageBackendConformance",
    "TokenDatabaseConformance",
]
