# make test — set up .venv (pinned CPU torch, dev extras, first-party plugins) and run
#             ruff, pytest and the strict docs build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is pinned: an open range can pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: venv test lint unit docs clean

$(STAMP): pyproject.toml plugins/lmcache-example/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) numpy
	$(BIN)/python -m pip install -q -e '.[dev]' -e plugins/lmcache-example
	touch $@

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .

unit: venv
	$(BIN)/python -m pytest

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

test: lint unit docs

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis
