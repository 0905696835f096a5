"""The ``lmcache`` command, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def lmcache(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lmcache", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "lmcache.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_plugins_list_shows_kind_name_distribution_status():
    out = lmcache("plugins", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.match(r"KIND\s+NAME\s+DISTRIBUTION\s+STATUS$", lines[0])
    for pattern in (r"allocator\s+mixed\s+lmcache 0\.1\.0\s+ok$",
                    r"allocator\s+gpu\s+lmcache 0\.1\.0\s+ok$",
                    r"token_database\s+chunked\s+lmcache 0\.1\.0\s+ok$",
                    r"storage_backend\s+example\.inmemory\s+lmcache-example 0\.1\.0\s+ok$",
                    r"url_scheme\s+rediss://\s+lmcache-redis 0\.1\.0\s+served by 'redis'$"):
        assert any(re.match(pattern, line) for line in lines), (pattern, out.stdout)


def test_plugins_list_reports_a_broken_plugin(make_distribution, tmp_path, monkeypatch):
    info = make_distribution(
        "acme-cli-broken",
        {"lmcache.storage_backends": {"acme.cli": "acme_cli_missing:Tier"}},
    )
    monkeypatch.setenv("PYTHONPATH", str(info.parent))
    out = lmcache("plugins", "list")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "acme.cli" in x)
    assert "acme-cli-broken 0.1" in line and "error: cannot load" in line
    assert "acme_cli_missing" in line
    out = lmcache("plugins", "list", "--no-load")
    assert re.search(r"acme\.cli\s+acme-cli-broken 0\.1\s+not loaded", out.stdout)


def test_config_check_ok_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("chunk_size: 128\nstorage_backends: [{name: example.inmemory}]\n")
    out = lmcache("config", "check", str(good))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "example.inmemory" in out.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 0\nstorage_backends: [{name: example.inmemory, max_entrie: 3}]\n")
    out = lmcache("config", "check", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert str(bad) in out.stderr
    assert "chunk_size: Input should be greater than 0" in out.stderr


def test_config_schema_is_json_with_plugin_options():
    out = lmcache("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    titles = [v.get("title") for v in schema["$defs"]["storage_backend_selection"]["oneOf"]]
    assert "storage_backend example.inmemory" in titles
    assert "allocator host" in [v.get("title") for v in schema["$defs"]["allocator_selection"]
                                ["oneOf"]]


@pytest.mark.parametrize("args", [[], ["plugins"], ["config", "check"]])
def test_usage_errors(args):
    out = lmcache(*args)
    assert out.returncode == 2 and "usage:" in out.stderr


def test_kernels_build_reports_where_they_are():
    from lmcache.ops import cpu_ops, library_path

    done = lmcache("kernels", "build")
    if cpu_ops(wait=True) is None:
        assert done.returncode == 1 and "torch path" in done.stdout
    else:
        assert done.returncode == 0 and str(library_path()) in done.stdout
    off = subprocess.run([sys.executable, "-m", "lmcache.cli", "kernels", "build"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LMCACHE_CPU_KERNELS": "0"})
    assert off.returncode == 1 and "turned off" in off.stdout


@pytest.mark.parametrize("argv, mode", [([], "background"), (["--prefault"], True),
                                        (["--prefault", "now"], True),
                                        (["--prefault", "off"], False),
                                        (["--prefault", "background"], "background")])
def test_server_prefault_modes(argv, mode):
    from lmcache.cli import build_parser
    from lmcache.server.main import _PREFAULT_MODES

    args = build_parser().parse_args(["server", "127.0.0.1", "9", *argv])
    assert _PREFAULT_MODES[args.prefault] == mode
