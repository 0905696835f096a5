"""Shared fixtures: plugin isolation, and helpers for tests that need real servers."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmcache.plugin import manager
from lmcache.plugin.registry import registry as _registry
from lmcache.testing.fixtures import (  # noqa: F401 - session fixtures of real servers
    redis_cluster,
    redis_server,
    s3_bucket,
    s3_server,
)

REQUIRE_SERVICES = os.environ.get("LMCACHE_REQUIRE_SERVICES") == "1"


def missing_service(what: str) -> None:
    """Skip the calling test — or fail it when CI demands every service."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (LMCACHE_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def plugin_registry() -> Iterator:
    """The process-wide registry, re-read before and after the test."""
    _registry.refresh()
    manager.reset_plugin_manager()
    yield _registry
    for kind, names in list(_registry._runtime.items()):
        for name in list(names):
            _registry.unregister(kind, name)
    _registry.refresh()
    manager.reset_plugin_manager()


@pytest.fixture
def make_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      plugin_registry) -> Callable[..., Path]:
    """Write a hand-made ``*.dist-info`` (and optional modules) and put it on sys.path.

    This is how an installed distribution looks to importlib.metadata, without pip.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(name: str, entry_points: dict[str, dict[str, str]],
             modules: dict[str, str] | None = None, version: str = "0.1") -> Path:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{k} = {v}" for k, v in eps.items())
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines))
        for mod_path, source in (modules or {}).items():
            target = site / mod_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(source))
        plugin_registry.refresh()
        manager.reset_plugin_manager()
        return info

    return make


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_ready():
    """Build (or load) the CPU kernels once, so tests take the same path every time;
    tests/unit/test_cpu_ops.py compares them with the pure-torch path."""
    from lmcache.ops import cpu_ops

    cpu_ops(wait=True)
