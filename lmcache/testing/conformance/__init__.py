"""Conformance tests for lmcache components, shipped for plugin authors.

Subclass the class for your component's kind in a test module, provide the fixture its
docstring names, and pytest runs the whole contract against your implementation::

    from lmcache.testing.conformance import StorageBackendConformance

    class TestMyBackend(StorageBackendConformance):
        @pytest.fixture
        def backend_factory(self, allocator, tmp_path): ...

The same classes run against every first-party component in lmcache's own test suite.
"""

from lmcache.testing.conformance.storage_backend import StorageBackendConformance

__all__ = ["StorageBackendConformance"]
