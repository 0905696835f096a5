"""LMCacheEngineConfig: the seed's fields and constructors, selections, errors."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from lmcache.experimental.config import (
    ConfigError,
    LMCacheEngineConfig,
    LMCacheEngineMetadata,
    config_json_schema,
)
from lmcache.experimental.storage_backend.abstract_backend import StorageBackendInterface
from lmcache.plugin.options import PluginOptions

SEED_DEFAULTS = dict(
    chunk_size=256, local_cpu=True, max_local_cpu_size=5.0, local_disk=None,
    max_local_disk_size=0, remote_url="lm://localhost:65432", remote_serde="naive",
    save_decode_cache=False, enable_blending=False, blend_recompute_ratio=0.15,
    blend_min_tokens=256, enable_p2p=False, lookup_url=None, distributed_url=None,
    error_handling=False,
)
LEGACY_DEFAULTS = dict(
    chunk_size=256, backend="cpu", remote_url="lm://localhost:65432", remote_serde="naive",
    save_decode_cache=False, enable_blending=False, blend_recompute_ratio=0.15,
    blend_min_tokens=256, max_local_disk_size=0.0, enable_p2p=False, lookup_url=None,
    distributed_url=None, error_handling=False,
)


class _Tier(StorageBackendInterface):
    def contains(self, key): return False
    def exists_in_put_tasks(self, key): return False
    def submit_put_task(self, key, memory_obj): return None
    def submit_prefetch_task(self, key): return None
    def get_blocking(self, key): return None
    def remove(self, key): return False
    def close(self): pass

    @classmethod
    def from_options(cls, options, config, metadata, **context):
        return cls()


class _CpuTier(_Tier):
    class Options(PluginOptions):
        max_size_gb: float | None = None


class _DiskTier(_Tier):
    class Options(PluginOptions):
        path: str
        max_size_gb: float = 0


@pytest.fixture
def tiers(plugin_registry):
    """local_cpu / local_disk tiers for selection tests (stand-ins until they are built)."""
    for name, cls in (("local_cpu", _CpuTier), ("local_disk", _DiskTier)):
        if name not in plugin_registry.names("storage_backend"):
            plugin_registry.register("storage_backend", name, cls)
    return plugin_registry


def write(tmp_path: Path, text: str, name: str = "lmcache.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def issues_of(exc: ConfigError) -> dict[str, str]:
    return {i.loc: i.message for i in exc.issues}


# -- the seed's API ----------------------------------------------------------------------


def test_constructor_signatures_follow_the_seed():
    params = inspect.signature(LMCacheEngineConfig.from_defaults).parameters
    assert {k: p.default for k, p in params.items()} == SEED_DEFAULTS
    assert list(params) == list(LMCacheEngineConfig.SEED_FIELDS)
    legacy = inspect.signature(LMCacheEngineConfig.from_legacy).parameters
    assert {k: p.default for k, p in legacy.items()} == LEGACY_DEFAULTS
    assert list(inspect.signature(LMCacheEngineConfig.from_file).parameters) == ["file_path"]
    assert list(inspect.signature(LMCacheEngineConfig.from_env).parameters) == []


def test_from_defaults_values_and_derived_tiers():
    config = LMCacheEngineConfig.from_defaults()
    for field, value in SEED_DEFAULTS.items():
        assert getattr(config, field) == value
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu", "remote"]
    assert config.storage_backend_specs()[1].options == {
        "url": "lm://localhost:65432", "serde": "naive", "timeout_s": 10.0}
    assert config.allocator.name == "mixed" and config.token_database.name == "chunked"


def test_positional_construction_in_seed_order():
    args = [512, False, 1.0, "/tmp/x", 2.0, None, "naive", True, False, 0.2, 10, False,
            None, None, True]
    config = LMCacheEngineConfig(*args)
    assert [getattr(config, f) for f in LMCacheEngineConfig.SEED_FIELDS] == args
    with pytest.raises(TypeError, match="multiple values for 'chunk_size'"):
        LMCacheEngineConfig(256, chunk_size=128)


def test_equality_and_round_trip():
    a = LMCacheEngineConfig.from_defaults(chunk_size=128, local_disk="/tmp/d",
                                          max_local_disk_size=1)
    assert a == LMCacheEngineConfig.from_defaults(chunk_size=128, local_disk="/tmp/d",
                                                  max_local_disk_size=1)
    assert a != LMCacheEngineConfig.from_defaults(chunk_size=64)
    assert LMCacheEngineConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("backend, tiers", [
    ("cpu", ["local_cpu"]),
    ("local_disk", ["local_disk"]),
    ("local_cpu_disk", ["local_cpu", "local_disk"]),
    ("remote", ["remote"]),
    ("local_cpu_disk_remote", ["local_cpu", "local_disk", "remote"]),
])
def test_from_legacy_backends(backend, tiers, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = LMCacheEngineConfig.from_legacy(backend=backend, chunk_size=64)
    assert [s.name for s in config.storage_backend_specs()] == tiers
    assert config.chunk_size == 64
    if "disk" in backend:
        assert config.local_disk == str(tmp_path / "lmcache" / "local_disk")
        assert config.max_local_disk_size == 5.0


def test_from_legacy_unknown_backend():
    with pytest.raises(ConfigError, match="unknown legacy backend 'gpu'.*local_cpu_disk"):
        LMCacheEngineConfig.from_legacy(backend="gpu")


# -- files ---------------------------------------------------------------------------------


def test_from_file_with_selections(tmp_path, tiers):
    path = write(tmp_path, """
        chunk_size: 128
        allocator: host
        token_database: {name: chunked, hash: blake2b}
        storage_backends:
          - local_cpu
          - {name: local_disk, path: file:///tmp/lmcache-x, max_size_gb: 3}
          - {name: example.inmemory, max_entries: 10}
    """)
    config = LMCacheEngineConfig.from_file(str(path))
    assert config.chunk_size == 128
    assert config.allocator.name == "host"
    assert config.token_database.options == {"hash": "blake2b"}
    assert [s.name for s in config.storage_backend_specs()] == [
        "local_cpu", "local_disk", "example.inmemory"]
    # flat fields that were not set are filled from the selections
    assert config.local_cpu is True
    assert config.local_disk == "file:///tmp/lmcache-x"
    assert config.max_local_disk_size == 3
    assert config.remote_url is None


def test_errors_name_file_path_and_expectation(tmp_path, tiers):
    path = write(tmp_path, """
        chunk_size: many
        storage_backends:
          - local_cpu
          - {name: example.inmemory, max_entries: lots, colour: blue}
          - {name: exampel.inmemory}
        chunk_sise: 3
    """)
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_file(str(path))
    text = str(info.value)
    assert str(path) in text.splitlines()[0]
    found = issues_of(info.value)
    assert "valid integer" in found["chunk_size"] and "'many'" in found["chunk_size"]
    assert "did you mean 'chunk_size'" in found["chunk_sise"]
    # pydantic stops at field-level errors before plugin checks; fix those and retry
    path = write(tmp_path, """
        storage_backends:
          - local_cpu
          - {name: example.inmemory, max_entries: lots, colour: blue}
          - {name: exampel.inmemory}
    """)
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_file(str(path))
    found = issues_of(info.value)
    assert "valid integer" in found["storage_backends[1].max_entries"]
    assert "'lots'" in found["storage_backends[1].max_entries"]
    assert "unknown key" in found["storage_backends[1].colour"]
    assert "max_entries" in found["storage_backends[1].colour"]
    assert "did you mean 'example.inmemory'" in found["storage_backends[2].name"]
    assert "unknown storage_backend 'exampel.inmemory'" in found["storage_backends[2].name"]


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        LMCacheEngineConfig.from_file(str(tmp_path / "missing.yaml"))
    bad = write(tmp_path, "chunk_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        LMCacheEngineConfig.from_file(str(bad))
    top = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        LMCacheEngineConfig.from_file(str(top))


def test_empty_file_is_the_default_local_cache(tmp_path):
    config = LMCacheEngineConfig.from_file(str(write(tmp_path, "")))
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu"]


@pytest.mark.parametrize("yaml_text, loc, needle", [
    ("local_cpu: false\nstorage_backends: [local_cpu]\n", "local_cpu", "lists the 'local_cpu'"),
    ("local_disk: /a\nmax_local_disk_size: 1\nstorage_backends: [local_cpu]\n",
     "local_disk", "does not list the 'local_disk'"),
    ("local_disk: /a\nstorage_backends: [{name: local_disk, path: /b, max_size_gb: 1}]\n",
     "local_disk", "storage_backends[0].path is '/b'"),
    ("max_local_disk_size: 2\nstorage_backends: [{name: local_disk, path: /b, max_size_gb: 1}]\n",
     "max_local_disk_size", "expected both to agree"),
    ("max_local_cpu_size: 2\nstorage_backends: [{name: local_cpu, max_size_gb: 1}]\n",
     "max_local_cpu_size", "storage_backends[0].max_size_gb is 1"),
    ("storage_backends: [local_cpu, local_cpu]\n", "storage_backends[1].name", "listed twice"),
])
def test_contradictions_between_flat_fields_and_selections(tmp_path, tiers, yaml_text, loc,
                                                           needle):
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_file(str(write(tmp_path, yaml_text)))
    assert needle in issues_of(info.value)[loc]


def test_agreeing_flat_fields_and_selections(tmp_path, tiers):
    config = LMCacheEngineConfig.from_file(str(write(tmp_path, """
        local_disk: file:///b/
        max_local_disk_size: 1
        storage_backends: [{name: local_disk, path: /b, max_size_gb: 1.0}]
    """)))
    assert config.local_cpu is False and config.local_disk == "file:///b/"


@pytest.mark.parametrize("field, value, needle", [
    ("enable_blending", True, "not implemented"),
    ("lookup_url", "x:1", "only used with enable_p2p"),
    ("remote_url", "localhost:6379", "scheme://"),
    ("blend_recompute_ratio", 2.0, "less than or equal to 1"),
    ("chunk_size", 0, "greater than 0"),
    ("max_local_cpu_size", -1, "greater than 0"),
])
def test_bad_flat_values(field, value, needle):
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig(**{field: value})
    assert needle in issues_of(info.value)[field]


@pytest.mark.parametrize("field", ["lookup_url", "distributed_url"])
def test_p2p_needs_both_addresses(field):
    other = {"lookup_url": "localhost:8100", "distributed_url": "localhost:8200"}
    other.pop(field)
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig(enable_p2p=True, **other)
    assert "required by enable_p2p" in issues_of(info.value)[field]


def test_p2p_addresses_as_lmcache_writes_them():
    # LMCache's P2P example writes host:port, without a scheme
    config = LMCacheEngineConfig(enable_p2p=True, lookup_url="localhost:8100",
                                 distributed_url="localhost:8200")
    [cpu, p2p] = config.storage_backend_specs()
    assert (cpu.name, p2p.name) == ("local_cpu", "p2p")
    assert p2p.options == {"lookup_url": "localhost:8100", "distributed_url": "localhost:8200"}
    with pytest.raises(ConfigError, match="expected host:port"):
        LMCacheEngineConfig(enable_p2p=True, lookup_url="localhost",
                            distributed_url="localhost:8200")


def test_disk_needs_a_budget():
    with pytest.raises(ConfigError, match="max_local_disk_size: must be > 0"):
        LMCacheEngineConfig(local_disk="/tmp/x")


def test_plugin_option_errors_without_a_file():
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig(allocator={"name": "host", "prefault": "sometimes"},
                            token_database={"name": "chunked", "hash": "md5"})
    found = issues_of(info.value)
    assert "'background'" in found["allocator.prefault"]
    assert "'sha256'" in found["token_database.hash"] and "'md5'" in found["token_database.hash"]


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        LMCacheEngineConfig(chunk_size=-5)


# -- environment ---------------------------------------------------------------------------


def test_from_env_defaults_to_a_local_cpu_cache(monkeypatch):
    for var in ("LMCACHE_CONFIG_FILE", "LMCACHE_CHUNK_SIZE", "LMCACHE_REMOTE_URL"):
        monkeypatch.delenv(var, raising=False)
    config = LMCacheEngineConfig.from_env()
    assert config.chunk_size == 256
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu"]


def test_from_env_variables_override_the_file(monkeypatch, tmp_path, tiers):
    path = write(tmp_path, "chunk_size: 128\nlocal_disk: /tmp/a\nmax_local_disk_size: 4\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "64")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "false")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", "None")
    monkeypatch.setenv("LMCACHE_TOKEN_DATABASE", "{name: chunked, salt: tenant-a}")
    monkeypatch.setenv("LMCACHE_SOMETHING_ELSE", "ignored")
    config = LMCacheEngineConfig.from_env()
    assert config.chunk_size == 64 and config.local_cpu is False
    assert config.max_local_disk_size == 4 and config.remote_url is None
    assert config.token_database.options == {"salt": "tenant-a"}
    assert [s.name for s in config.storage_backend_specs()] == ["local_disk"]


def test_from_env_errors_name_the_variable(monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "big")
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_env()
    assert "$LMCACHE_CHUNK_SIZE: chunk_size: Input should be a valid integer" in str(info.value)


def test_from_env_structured_selection(monkeypatch, tiers):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("LMCACHE_STORAGE_BACKENDS", '[local_cpu, {name: example.inmemory}]')
    config = LMCacheEngineConfig.from_env()
    assert [s.name for s in config.storage_backend_specs()] == ["local_cpu", "example.inmemory"]


# -- schema and metadata -------------------------------------------------------------------


def test_json_schema_includes_installed_plugins():
    schema = config_json_schema()
    assert set(LMCacheEngineConfig.SEED_FIELDS) <= set(schema["properties"])
    variants = schema["$defs"]["storage_backend_selection"]["oneOf"]
    example = next(v for v in variants if v.get("title") == "storage_backend example.inmemory")
    assert example["properties"]["name"] == {"const": "example.inmemory"}
    assert "max_entries" in example["properties"]
    assert example["additionalProperties"] is False


def test_metadata_validation():
    meta = LMCacheEngineMetadata("m", 2, 1, "vllm", torch.float16, [4, 2, 256, 8, 64])
    assert meta.kv_shape == (4, 2, 256, 8, 64)
    # the seed's worker ids beyond world_size, and -1, name a worker like any other
    assert LMCacheEngineMetadata("m", 3, 123, "vllm", torch.float16, (4, 2, 256, 8, 64))
    assert LMCacheEngineMetadata("m", 1, -1, "vllm", torch.float16, (4, 2, 256, 8, 64))
    with pytest.raises(ValueError, match="worker_id"):
        LMCacheEngineMetadata("m", 2, "1", "vllm", torch.float16, (4, 2, 256, 8, 64))
    with pytest.raises(ValueError, match="world_size"):
        LMCacheEngineMetadata("m", 0, 0, "vllm", torch.float16, (4, 2, 256, 8, 64))
    with pytest.raises(ValueError, match="kv_shape"):
        LMCacheEngineMetadata("m", 1, 0, "vllm", torch.float16, (4, 3, 256, 8, 64))
    with pytest.raises(ValueError, match="kv_dtype"):
        LMCacheEngineMetadata("m", 1, 0, "vllm", "fp16", (4, 2, 256, 8, 64))


# -- the load deadline ---------------------------------------------------------------------


def test_load_timeout_s_from_yaml_and_the_environment(monkeypatch, tmp_path):
    assert LMCacheEngineConfig().load_timeout_s == 2.0
    assert LMCacheEngineConfig.from_file(str(write(tmp_path, "load_timeout_s: 0.25\n"))
                                         ).load_timeout_s == 0.25
    assert LMCacheEngineConfig.from_file(str(write(tmp_path, "load_timeout_s: null\n"))
                                         ).load_timeout_s is None
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("LMCACHE_LOAD_TIMEOUT_S", "0.5")
    assert LMCacheEngineConfig.from_env().load_timeout_s == 0.5
    for spelling in ("None", "null"):
        monkeypatch.setenv("LMCACHE_LOAD_TIMEOUT_S", spelling)
        assert LMCacheEngineConfig.from_env().load_timeout_s is None
    monkeypatch.setenv("LMCACHE_LOAD_TIMEOUT_S", "0")
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_env()
    assert "$LMCACHE_LOAD_TIMEOUT_S: load_timeout_s: Input should be greater than 0" in \
        str(info.value)


@pytest.mark.parametrize("yaml_value, needle", [
    ("0", "greater than 0"),
    ("-1.5", "greater than 0"),
    (".inf", "finite number"),
    (".nan", "finite number"),
    ("true", "not a boolean"),
    ("soon", "valid number"),
])
def test_load_timeout_s_must_be_a_finite_number_of_seconds(tmp_path, yaml_value, needle):
    path = write(tmp_path, f"load_timeout_s: {yaml_value}\n")
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_file(str(path))
    assert needle in issues_of(info.value)["load_timeout_s"]
    assert str(path) in str(info.value)
