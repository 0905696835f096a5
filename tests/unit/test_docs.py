"""Docs that cannot drift: every hook, entry-point group and config field is documented."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache.experimental.config import LMCacheEngineConfig
from lmcache.plugin import hookspecs
from lmcache.plugin.registry import KINDS, PLUGINS_GROUP, URL_SCHEMES_GROUP, registry

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _reference_hook():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "_hooks/reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hook", [n for n in dir(hookspecs) if n.startswith("lmcache_")])
def test_every_hook_is_in_the_hooks_page(hook):
    page = (DOCS / "extending/hooks.md").read_text()
    assert f"`{hook}`" in page
    assert "::: lmcache.plugin.hookspecs" in page


@pytest.mark.parametrize("group", [*KINDS.values(), PLUGINS_GROUP, URL_SCHEMES_GROUP])
def test_every_entry_point_group_is_documented(group):
    assert f"`{group}`" in (DOCS / "extending/index.md").read_text()


def test_the_layout_page_shows_every_package():
    """The tree on the architecture page names every package of lmcache, so that a
    newcomer learns where a new component goes from the docs as from the tree."""
    page = (DOCS / "extending/index.md").read_text()
    tree = page.split("<!-- lmcache:layout -->")[1].split("```")[1]
    for init in sorted((ROOT / "lmcache").rglob("__init__.py")):
        package = init.parent.relative_to(ROOT / "lmcache")
        if str(package) != ".":
            assert f" {package.name}/" in tree, package


def test_config_reference_lists_every_field():
    page = (DOCS / "user-guide/configuration.md").read_text()
    assert "<!-- lmcache:config-fields -->" in page
    table = _reference_hook().config_fields_table()
    for field in LMCacheEngineConfig.model_fields:
        assert f"| `{field}` |" in table


def test_plugin_options_reference_lists_every_first_party_option():
    tables = _reference_hook().plugin_options_tables()
    for entry in registry.entries():
        if entry.first_party:
            assert f"### `{entry.name}`" in tables
            for option in registry.options_model(entry.kind, entry.name).model_fields:
                assert f"| `{option}` |" in tables


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in nav, page


def test_remote_page_lists_every_remote_option():
    page = (DOCS / "user-guide/remote.md").read_text()
    hook = _reference_hook()
    rendered = hook.ONE_OPTIONS_MARK.sub(
        lambda m: hook.plugin_options_table(m[1], m[2]), page)
    for kind, name in [("storage_backend", "remote"), ("storage_backend", "redis"),
                       ("serde", "naive"), ("serde", "zstd")]:
        assert f"<!-- lmcache:options {kind} {name} -->" in page
        for option in registry.options_model(kind, name).model_fields:
            assert f"| `{option}` |" in rendered, (name, option)


# --- code in the docs comes from files the tests run ----------------------------------------

_FENCE = re.compile(r"```python\n(.*?)```", re.S)
_INCLUDE = re.compile(r'--8<-- "([^"]+)"')


@pytest.mark.parametrize("snippet", sorted((DOCS / "snippets").glob("*.py")),
                         ids=lambda p: p.name)
def test_doc_snippets_run(snippet, tmp_path):
    done = subprocess.run([sys.executable, str(snippet)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]


def test_python_listings_are_included_from_files():
    """A Python listing is an excerpt of a file that the tests run (``--8<--``), or
    imports only; never code typed into a page where no test sees it."""
    for page in DOCS.rglob("*.md"):
        for body in _FENCE.findall(page.read_text()):
            if "--8<--" in body:
                continue
            tree = ast.parse(body)
            assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), \
                f"{page.relative_to(DOCS)}: a Python listing typed into the page:\n{body}"


def test_included_sections_exist():
    for page in DOCS.rglob("*.md"):
        for target in _INCLUDE.findall(page.read_text()):
            path, _, section = target.partition(":")
            text = (ROOT / path).read_text()
            if section and not section.isdigit():
                assert f"--8<-- [start:{section}]" in text, (page, target)
                assert f"--8<-- [end:{section}]" in text, (page, target)


def test_a_broken_link_fails_the_docs_target(tmp_path):
    """The docs build of `make test` can fail: the Makefile's own command, on a copy of the
    tree whose index links to a page that does not exist."""
    import shlex
    import shutil

    recipe = re.search(r"^docs:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile has no docs target"
    command = recipe.group(1).replace("$(BIN)", str(Path(sys.executable).parent))
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "site", ".demo", ".lmcache", "__pycache__", "*.egg-info"))
    env_words = shlex.split(command)
    env = dict(os.environ)
    while env_words and "=" in env_words[0] and not env_words[0].startswith("-"):
        name, value = env_words.pop(0).split("=", 1)
        env[name] = value
    ok = subprocess.run(env_words, cwd=tree, env=env, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(tree / "docs/index.md", "a") as f:
        f.write("\nSee [nowhere](no-such-page.md).\n")
    broken = subprocess.run(env_words, cwd=tree, env=env, capture_output=True, text=True,
                            timeout=600)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stdout + broken.stderr
