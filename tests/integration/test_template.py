"""The template an extension author copies (plugins/lmcache-example) works under a new
name: copied, renamed, installed into a private folder, listed, selected from YAML, and
its own conformance tests pass."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "plugins" / "lmcache-example"

# What an author renames: distribution, package, entry-point name (with their prefix).
RENAMES = [("lmcache-example", "acme-store"), ("lmcache_example", "acme_store"),
           ("example.inmemory", "acme.store")]


def copy_template(dest: Path) -> Path:
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns(
        "*.egg-info", "__pycache__", ".pytest_cache", "build"))
    (dest / "src" / "lmcache_example").rename(dest / "src" / "acme_store")
    for path in dest.rglob("*"):
        if path.suffix in (".py", ".toml", ".md") and path.is_file():
            text = path.read_text()
            for old, new in RENAMES:
                text = text.replace(old, new)
            path.write_text(text)
    return dest


def run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_template_copied_under_a_new_name_installs_and_passes_its_kit(tmp_path):
    package = copy_template(tmp_path / "acme-store")
    assert "lmcache_example" not in (package / "pyproject.toml").read_text()
    site = tmp_path / "site"
    # a private target folder: the test environment's own site-packages is left alone
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(package)], dict(os.environ), tmp_path)
    assert (site / "acme_store").is_dir()
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")

    listing = run([sys.executable, "-c", "import sys; from lmcache.cli import main; "
                   "sys.exit(main(['plugins', 'list']))"], env, tmp_path)
    [line] = [ln for ln in listing.splitlines() if "acme.store" in ln]
    assert "storage_backend" in line and "acme-store" in line, line

    out = run([sys.executable, str(package / "examples" / "select_from_yaml.py")], env,
              tmp_path)
    assert "stored and retrieved 48 tokens through acme.store" in out

    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 str(package / "tests")], env, package)
    assert " passed" in tests and "failed" not in tests and "error" not in tests, tests
    assert "test_conformance.py" in run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
         str(package / "tests")], env, package)
