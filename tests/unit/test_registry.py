"""The component registry: discovery, laziness, errors, and the pluggy manager."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcache.abc.storage_backend import TierContext
from lmcache.plugin import registry as registry_module
from lmcache.plugin.manager import DISABLE_ENV, get_plugin_manager
from lmcache.plugin.registry import (
    KINDS,
    DuplicatePluginError,
    PluginLoadError,
    UnknownPluginError,
)

BACKEND_SOURCE = """
from concurrent.futures import Future
from lmcache.abc.storage_backend import StorageBackendInterface
from lmcache.plugin.options import PluginOptions

class Tier(StorageBackendInterface):
    class Options(PluginOptions):
        depth: int = 1

    def __init__(self, depth):
        self.depth = depth

    @classmethod
    def from_options(cls, options, config, metadata, context):
        return cls(options.depth)

    def contains(self, key): return False
    def exists_in_put_tasks(self, key): return False
    def submit_put_task(self, key, memory_obj): return None
    def submit_prefetch_task(self, key): return None
    def get_blocking(self, key): return None
    def remove(self, key): return False
    def close(self): pass
"""


def test_builtins_are_entry_points_of_lmcache(plugin_registry):
    entries = {(e.kind, e.name): e for e in plugin_registry.entries()}
    for kind, name in [("allocator", "mixed"), ("allocator", "host"),
                       ("allocator", "pinned"), ("allocator", "gpu"),
                       ("token_database", "chunked")]:
        assert entries[(kind, name)].dist_name == "lmcache"
        assert entries[(kind, name)].first_party
    assert plugin_registry.load("token_database", "chunked").__name__ == "ChunkedTokenDatabase"


def test_installed_metadata_and_source_checkout_agree(plugin_registry, monkeypatch):
    from_source = {(e.kind, e.name, e.value) for e in plugin_registry.entries()
                   if e.first_party}
    monkeypatch.setattr(registry_module, "_source_checkout_entry_points", lambda: None)
    plugin_registry.refresh()
    from_metadata = {(e.kind, e.name, e.value) for e in plugin_registry.entries()
                     if e.first_party}
    assert from_source == from_metadata and from_source


def test_listing_imports_no_plugin_code():
    code = (
        "import sys\n"
        "from lmcache.plugin.registry import registry, KINDS\n"
        "names = {k: registry.names(k) for k in KINDS}\n"
        "assert 'mixed' in names['allocator'], names\n"
        "heavy = [m for m in ('torch', 'lmcache.experimental.memory_management',\n"
        "         'lmcache_example.backend') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_name_lists_installed_and_closest(plugin_registry):
    with pytest.raises(UnknownPluginError) as info:
        plugin_registry.entry("allocator", "mixd")
    msg = str(info.value)
    assert "unknown allocator 'mixd'" in msg
    for name in ("gpu", "host", "mixed", "pinned"):
        assert name in msg
    assert "did you mean 'mixed'" in msg


def test_unknown_kind_is_a_clear_error(plugin_registry):
    with pytest.raises(ValueError, match="unknown component kind 'allocators'"):
        plugin_registry.names("allocators")


def test_discovery_from_hand_written_dist_info(make_distribution, plugin_registry):
    make_distribution(
        "acme-tiers",
        {"lmcache.storage_backends": {"acme.tier": "acme_tiers_a:Tier"}},
        {"acme_tiers_a.py": BACKEND_SOURCE},
        version="2.3",
    )
    entry = plugin_registry.entry("storage_backend", "acme.tier")
    assert entry.distribution == "acme-tiers 2.3"
    assert "acme_tiers_a" not in sys.modules  # still lazy
    cls = plugin_registry.load("storage_backend", "acme.tier")
    backend = plugin_registry.create("storage_backend", "acme.tier", {"depth": 3}, None, None,
                                     TierContext())
    assert isinstance(backend, cls) and backend.depth == 3


def test_two_distributions_one_name_names_both(make_distribution, plugin_registry):
    make_distribution("acme-one", {"lmcache.storage_backends": {"acme.x": "acme_one:Tier"}},
                      {"acme_one.py": BACKEND_SOURCE})
    make_distribution("acme-two", {"lmcache.storage_backends": {"acme.x": "acme_two:Tier"}},
                      {"acme_two.py": BACKEND_SOURCE})
    assert "acme.x" in plugin_registry.names("storage_backend")
    with pytest.raises(DuplicatePluginError) as info:
        plugin_registry.load("storage_backend", "acme.x")
    assert "acme-one 0.1" in str(info.value) and "acme-two 0.1" in str(info.value)


def test_broken_plugin_fails_only_when_selected(make_distribution, plugin_registry):
    make_distribution(
        "acme-broken",
        {"lmcache.storage_backends": {"acme.broken": "acme_broken_mod:Tier"}},
        {"acme_broken_mod.py": "import not_a_real_module_xyz\n"},
    )
    assert "acme.broken" in plugin_registry.names("storage_backend")
    assert plugin_registry.load("allocator", "host")  # others unaffected
    with pytest.raises(PluginLoadError) as info:
        plugin_registry.load("storage_backend", "acme.broken")
    msg = str(info.value)
    assert "acme-broken 0.1" in msg and "not_a_real_module_xyz" in msg


def test_class_of_the_wrong_kind_is_refused(make_distribution, plugin_registry):
    make_distribution(
        "acme-wrong",
        {"lmcache.allocators": {"acme.wrong": "acme_wrong_mod:Tier"}},
        {"acme_wrong_mod.py": BACKEND_SOURCE},
    )
    with pytest.raises(PluginLoadError, match="must be a subclass of .*MemoryAllocatorInterface"):
        plugin_registry.load("allocator", "acme.wrong")


def test_options_must_derive_from_plugin_options(make_distribution, plugin_registry):
    source = BACKEND_SOURCE.replace("class Options(PluginOptions):", "class Options:")
    make_distribution("acme-opts", {"lmcache.storage_backends": {"acme.o": "acme_opts_mod:Tier"}},
                      {"acme_opts_mod.py": source})
    with pytest.raises(PluginLoadError, match="PluginOptions"):
        plugin_registry.load("storage_backend", "acme.o")


def test_all_kinds_have_groups():
    assert set(KINDS.values()) == {
        "lmcache.allocators", "lmcache.gpu_connectors", "lmcache.token_databases",
        "lmcache.storage_backends", "lmcache.serdes"}


HOOKS_SOURCE = """
from lmcache.plugin import hookimpl
CALLS = []

@hookimpl
def lmcache_register_components(registry):
    registry.register("storage_backend", "acme.runtime", "acme_hooks_tier:Tier", "acme-hooks 0.1")

@hookimpl
def lmcache_chunks_evicted(tier, num_bytes):
    CALLS.append((tier, num_bytes))
"""


def test_hook_module_from_entry_point(make_distribution, plugin_registry):
    make_distribution(
        "acme-hooks",
        {"lmcache.plugins": {"acme": "acme_hooks_mod"}},
        {"acme_hooks_mod.py": HOOKS_SOURCE, "acme_hooks_tier.py": BACKEND_SOURCE},
    )
    pm = get_plugin_manager()
    pm.hook.lmcache_chunks_evicted(engine_id="e", tier="local_cpu", keys=[], num_bytes=7)
    assert sys.modules["acme_hooks_mod"].CALLS == [("local_cpu", 7)]
    # the registration hook ran: the runtime component resolves like any other
    assert plugin_registry.entry("storage_backend", "acme.runtime").distribution == "acme-hooks 0.1"
    assert plugin_registry.load("storage_backend", "acme.runtime").__name__ == "Tier"


def test_hook_modules_can_be_disabled(make_distribution, plugin_registry, monkeypatch):
    make_distribution(
        "acme-off",
        {"lmcache.plugins": {"acmeoff": "acme_off_mod"}},
        {"acme_off_mod.py": "raise RuntimeError('must not be imported')\n"},
    )
    with pytest.raises(PluginLoadError, match="acme-off 0.1.*must not be imported"):
        get_plugin_manager()
    monkeypatch.setenv(DISABLE_ENV, "acmeoff")
    from lmcache.plugin.manager import reset_plugin_manager

    reset_plugin_manager()
    pm = get_plugin_manager()
    assert pm.is_blocked("acmeoff")


def test_hookspecs_are_prefixed_and_documented():
    from lmcache.plugin import hookspecs

    specs = [n for n in dir(hookspecs) if n.startswith("lmcache_")]
    assert len(specs) >= 8
    for name in specs:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip().splitlines()) >= 3, name
        assert fn.__annotations__, name
