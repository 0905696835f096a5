"""lmcache's pytest plugin, loaded in every pytest run of an environment where lmcache is
installed (entry point ``pytest11: lmcache``).

It does two things for downstream suites, and nothing else at import time (no torch):

- registers the ``gpu`` marker: a test marked ``@pytest.mark.gpu`` needs a CUDA device and
  is skipped without one (so ``--strict-markers`` suites may use it without declaring it);
- reports, in the header, whether ``LMCACHE_REQUIRE_SERVICES=1`` turns missing servers
  (redis-server, SeaweedFS) into failures instead of skips.

The conformance base classes live in `lmcache.testing.conformance`; they are imported by
the test modules that use them, not by this plugin.
"""

from __future__ import annotations

import os

import pytest

GPU_MARKER = "gpu: needs a CUDA device (skipped without one)"


def pytest_configure(config: pytest.Config) -> None:
    # Registering a marker twice (our own pyproject also declares it) is harmless.
    config.addinivalue_line("markers", GPU_MARKER)


def pytest_report_header(config: pytest.Config) -> str | None:
    if os.environ.get("LMCACHE_REQUIRE_SERVICES") == "1":
        return "lmcache: LMCACHE_REQUIRE_SERVICES=1 (a missing server fails its tests)"
    return None


_cuda: bool | None = None


def _cuda_available() -> bool:
    global _cuda
    if _cuda is None:
        import torch  # only once a gpu-marked test is about to run

        _cuda = bool(torch.cuda.is_available())
    return _cuda


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("needs a CUDA device (gpu marker)")
